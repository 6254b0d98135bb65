import math

import numpy as np
import pytest
from search_synth import SENS, make_specs, synthetic_accuracy

from hirelc.search.config import SearchConfig
from hirelc.search.space import Constraints, random_policy
from hirelc.search.surrogate import Surrogate, policy_features, spearman


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 100]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833)  # ties share the average rank
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_surrogate_learns_a_known_function_better_with_more_data():
    specs = make_specs()
    rng = np.random.default_rng(0)
    c = Constraints.from_config(SearchConfig())
    policies = [random_policy(specs, rng, c) for _ in range(160)]
    acc = [synthetic_accuracy(p) for p in policies]
    test_p, test_a = policies[100:], acc[100:]
    assert policy_features(specs, policies[0], SENS).shape == (len(specs) * 8 + 5,)
    rho = {}
    for n in (6, 100):
        sur = Surrogate(specs, SENS, members=3, seed=0)
        sur.fit(policies[:n], acc[:n])
        mean, std = sur.predict(test_p)
        assert mean.shape == std.shape == (60,) and (std >= 0).all() and ((mean > 0) & (mean < 100)).all()
        rho[n] = spearman(mean, test_a)
    assert rho[100] > 0.6 and rho[100] > rho[6]
    again = Surrogate(specs, SENS, members=3, seed=0)
    again.fit(policies[:100], acc[:100])
    np.testing.assert_allclose(again.predict(test_p)[0], mean)  # seeded: same data, same model
    restored = Surrogate(specs, SENS, members=3)
    restored.load_state_dict(again.state_dict())
    np.testing.assert_allclose(restored.predict(test_p)[0], mean)
