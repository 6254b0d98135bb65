import math

import numpy as np
import pytest
from search_synth import SyntheticEvaluator, make_specs

from hirelc.policy import check_layer
from hirelc.search.config import SearchConfig
from hirelc.search.hla import BlockAllocation, blocks_of
from hirelc.search.lla import LLAEnv, acc_reward, combine_actions, ensemble_weights, propose_block
from hirelc.search.space import Constraints, Strategy, policy_key, uniform_policy

CFG = SearchConfig(lla_timesteps=32, lla_episode_len=4)


@pytest.fixture
def specs():
    return make_specs()


def test_combine_actions_is_a_weighted_mean_rounded_half_up():
    actions = np.array([[0, 2, 1, 3], [2, 2, 0, 1], [1, 5, 1, 1]])
    assert list(combine_actions(actions, np.array([1.0, 1.0, 2.0]))) == [1, 4, 1, 2]  # 1, 3.5, .75, 1.5
    assert list(combine_actions(actions, np.array([1.0, 0.0, 0.0]))) == [0, 2, 1, 3]


def test_ensemble_weights_favour_the_better_agent():
    w = ensemble_weights(np.array([100.0, 90.0, 100.0]))
    assert w.sum() == pytest.approx(1.0) and w[0] == pytest.approx(w[2]) and w[0] / w[1] == pytest.approx(math.e)


def test_acc_reward_is_the_documented_piecewise_function():
    for drop, r in ((0, 100), (0.99, 100), (1, 100), (3, 80), (5, 60), (10, 35), (15, 10), (20, 0), (100, -50)):
        assert acc_reward(drop) == pytest.approx(r)
    values = [acc_reward(d) for d in np.linspace(0, 60, 200)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_lla_reward_follows_the_formula(specs):
    blocks = blocks_of(specs)
    specs_b, ev = blocks["blocks.1"], SyntheticEvaluator(specs)
    c = Constraints.from_config(CFG).narrowed(4, Strategy.BOTH)
    base = uniform_policy(specs, 8, 1.0)
    env = LLAEnv(specs_b, c, 0.15, 0.2, base, ev.proxy_drop, CFG, alpha=1.0, beta=1.0)
    env.reset()
    a1, a2 = np.zeros(16, int), np.tile([3, 3, 0, 1], 4)
    layers, cr, drop, b1 = env.evaluate(a1)
    expected = acc_reward(drop) + (1 - cr) * 60 + 20 * math.exp(-10 * abs(cr - 0.15)) - 12 * (1 - cr) * 0.2
    assert b1 == pytest.approx(expected) and drop == pytest.approx(ev.proxy_drop({**base, **layers}))
    assert env.step(a1)[1] == pytest.approx(b1)  # a single reward has no spread
    b2 = env.evaluate(a2)[3]
    assert env.step(a2)[1] == pytest.approx(b2 - 2 * np.std([b1, b2]))
    assert cr > env._cr  # the second action compresses more


def test_propose_block_votes_a_valid_policy_within_the_hla_decision(specs):
    blocks = blocks_of(specs)
    ev = SyntheticEvaluator(specs)
    base = uniform_policy(specs, 8, 1.0)
    for strategy, min_bits in ((Strategy.QUANTIZE, 5), (Strategy.BOTH, 4)):
        alloc = BlockAllocation(0.15, 3, strategy, min_bits)
        prop = propose_block(blocks["blocks.0"], alloc, 0.4, base, ev.proxy_drop, CFG, cycle=1, block_index=1)
        assert prop.options[0] == prop.voted and len(prop.weights) == 3
        keys = [policy_key(blocks["blocks.0"], o) for o in prop.options]
        assert len(set(keys)) == len(keys)
        for layers in prop.options:
            for s in blocks["blocks.0"]:
                lp = layers[s.name]
                assert check_layer(s, lp) is None and lp.bits >= min_bits
                assert strategy != Strategy.QUANTIZE or lp.keep_ratio == 1.0
