import math

import numpy as np
import pytest
from search_synth import SENS, make_specs, synthetic_accuracy

from hirelc.search.config import SearchConfig
from hirelc.search.space import Constraints, random_policy
from hirelc.search.surrogate import ProxyLine, Surrogate, policy_features, spearman


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


def test_a_prior_lets_few_results_rank_unseen_policies_as_the_prior_does():
    """Six real results teach the plain MLP little; fitted as a correction to a prior that tracks accuracy (here
    a noisy copy of it), the surrogate ranks unseen policies about as well as the prior, starts from it, and
    refuses to mix the two ways of predicting."""
    specs = make_specs()
    rng = np.random.default_rng(1)
    c = Constraints.from_config(SearchConfig())
    policies = [random_policy(specs, rng, c) for _ in range(66)]
    acc = np.array([synthetic_accuracy(p) for p in policies])
    prior = acc + rng.normal(0, 0.3 * acc.std(), acc.size)
    plain, on_prior = Surrogate(specs, SENS, members=3, seed=0), Surrogate(specs, SENS, members=3, seed=0)
    plain.fit(policies[:6], acc[:6])
    on_prior.fit(policies[:6], acc[:6], prior=prior[:6])
    unseen = slice(6, None)
    rho_prior = spearman(prior[unseen], acc[unseen])
    rho_plain = spearman(plain.predict(policies[unseen])[0], acc[unseen])
    mean, std = on_prior.predict(policies[unseen], prior=prior[unseen])
    assert spearman(mean, acc[unseen]) > max(0.8 * rho_prior, rho_plain + 0.2)
    assert (std >= 0).all() and np.abs(mean - prior[unseen]).mean() < 0.5 * np.abs(prior[unseen] - acc.mean()).mean()
    restored = Surrogate(specs, SENS, members=3)
    restored.load_state_dict(on_prior.state_dict())
    np.testing.assert_allclose(restored.predict(policies[unseen], prior=prior[unseen])[0], mean)
    with pytest.raises(ValueError, match="fitted with a prior"):
        on_prior.predict(policies[unseen])
    with pytest.raises(ValueError, match="fitted without a prior"):
        plain.predict(policies[unseen], prior=prior[unseen])
    with pytest.raises(ValueError, match="one finite accuracy per policy"):
        on_prior.predict(policies[unseen], prior=[float("nan")] * 60)


def test_proxy_line_falls_with_the_drop_or_stays_flat():
    line = ProxyLine([10.0, 20.0, 30.0], [88.0, 86.0, 84.0])
    np.testing.assert_allclose(line([10.0, 25.0, 40.0]), [88.0, 85.0, 82.0])
    rising = ProxyLine([10.0, 20.0], [80.0, 90.0])  # accuracy rising with the drop: the proxy says nothing here
    np.testing.assert_allclose(rising([0.0, 50.0]), [85.0, 85.0])
    np.testing.assert_allclose(ProxyLine([5.0, 5.0], [80.0, 82.0])([1.0, 9.0]), [81.0, 81.0])
    with pytest.raises(ValueError, match="as many finite drops"):
        ProxyLine([1.0], [float("inf")])


def test_unknown_surrogate_prior_is_refused():
    from hirelc.errors import HirelcError

    with pytest.raises(HirelcError, match="unknown surrogate prior 'fisher'"):
        SearchConfig(surrogate_prior="fisher")
