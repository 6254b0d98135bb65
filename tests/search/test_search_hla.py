import numpy as np
import pytest
from search_synth import BLOCK_SENS, SyntheticEvaluator, make_specs

from hirelc.search.config import Budget, SearchConfig
from hirelc.search.hla import (
    BlockAllocation,
    HLAEnv,
    allocate,
    block_floor,
    blocks_of,
    fisher_shift,
    level_grid,
    make_allocation,
    meet_budget,
    predicted_fraction,
    target_fraction,
    vote_levels,
    vote_strategies,
)
from hirelc.search.space import Constraints, Strategy

CFG = SearchConfig(hla_timesteps=32)


@pytest.fixture
def specs():
    return make_specs()


def test_fisher_shift_moves_sensitive_blocks_milder_and_robust_blocks_harsher():
    assert fisher_shift(2, 0.8, 5) == 1 and fisher_shift(2, 0.2, 5) == 3 and fisher_shift(2, 0.5, 5) == 2
    assert fisher_shift(0, 0.9, 5) == 0 and fisher_shift(4, 0.1, 5) == 4  # clamped to the grid
    assert fisher_shift(2, 0.7, 5) == 2 and fisher_shift(2, 0.3, 5) == 2  # strict thresholds


def test_env_applies_the_shift_after_the_agent(specs):
    env = HLAEnv(specs, BLOCK_SENS, 0.25, CFG, lambda layers: 0.0, -2.0)  # stem 1.0, b0 0.4, b1 0.2, head 0.75
    idx, fractions, strategies = env.decode(np.array([2, 0] * 4))
    assert list(idx) == [1, 2, 3, 1]
    np.testing.assert_allclose(fractions, [0.30, 0.25, 0.20, 0.30])
    assert strategies == [Strategy.QUANTIZE] * 4
    uniform = HLAEnv(specs, {b: 0.5 for b in BLOCK_SENS}, 0.25, CFG, lambda layers: 0.0, -2.0)
    assert list(uniform.decode(np.array([2, 0] * 4))[0]) == [2, 2, 2, 2]  # the fisher_guided=False ablation


def test_level_grid_is_centred_on_the_target():
    np.testing.assert_allclose(level_grid(CFG, 0.25), [0.35, 0.30, 0.25, 0.20, 0.15])
    assert level_grid(CFG, 1 / 8)[2] == pytest.approx(1 / 8)


def test_votes_average_budgets_and_majority_vote_strategies():
    np.testing.assert_allclose(vote_levels([[0.3, 0.2], [0.2, 0.2], [0.25, 0.15]]), [0.25, 0.18333333])
    votes = np.array([[0, 1, 2, 2, 1],
                      [0, 2, 1, 2, 2],
                      [1, 0, 0, 2, 2]])  # (agents, blocks)
    q, p, b = Strategy.QUANTIZE, Strategy.PRUNE, Strategy.BOTH
    assert vote_strategies(votes) == [q, q, q, b, b]  # blocks 1 and 2: three-way ties -> safest (quantize)
    assert vote_strategies(np.array([[1, 2], [2, 1]])) == [p, p]  # 1-1 ties -> the safer of the two


def test_levels_set_min_bits_and_are_lowered_only_when_unreachable(specs):
    blocks = blocks_of(specs)
    base = Constraints.from_config(CFG)
    grid = level_grid(CFG, 0.25)
    for i, expected in enumerate((6, 6, 5, 5, 4)):
        alloc = make_allocation(blocks, [grid[i]] * 4, [Strategy.QUANTIZE] * 4, grid, base, CFG)
        assert {a.min_bits for a in alloc.values()} == {expected}
    cfg2 = SearchConfig(bit_levels=(2, 3, 4, 5, 6, 8))
    base2, grid2 = Constraints.from_config(cfg2), level_grid(cfg2, 0.09)
    alloc = make_allocation(blocks, [grid2[2]] * 4, [Strategy.QUANTIZE] * 4, grid2, base2, cfg2)
    assert all(a.min_bits < 5 for a in alloc.values())  # nominal 5 bits cannot reach 0.09 without pruning
    for name in ("blocks.0", "blocks.1"):  # (the tiny stem's float biases keep it above 0.09 at any width)
        assert block_floor(blocks[name], base2.narrowed(alloc[name].min_bits, Strategy.QUANTIZE)) <= 0.09


def test_meet_budget_tightens_the_least_sensitive_blocks_first(specs):
    blocks, base = blocks_of(specs), Constraints.from_config(CFG)
    target = 1 / 6
    grid = level_grid(CFG, target)
    alloc = make_allocation(blocks, [grid[0]] * 4, [Strategy.QUANTIZE] * 4, grid, base, CFG)
    assert predicted_fraction(blocks, alloc, base) > target
    out = meet_budget(blocks, alloc, BLOCK_SENS, target, grid, base, CFG)
    assert predicted_fraction(blocks, out, base) <= target
    assert out["stem"] == alloc["stem"] and out["head"] == alloc["head"]  # sensitive blocks untouched
    assert out["blocks.1"].level_index > 0  # the least sensitive block moved first


def test_allocation_from_the_trained_ensemble_meets_the_budget(specs):
    ev = SyntheticEvaluator(specs)
    for ensemble, ratio in ((True, 6.0), (False, 9.0)):
        cfg = SearchConfig(hla_timesteps=24, ensemble=ensemble)
        budget = Budget(target_ratio=ratio)
        alloc = allocate(specs, BLOCK_SENS, budget, cfg, ev.proxy_drop, cycle=1)
        assert set(alloc) == set(blocks_of(specs))
        assert all(isinstance(a, BlockAllocation) for a in alloc.values())
        base = Constraints.from_config(cfg)
        assert predicted_fraction(blocks_of(specs), alloc, base) <= target_fraction(specs, budget, cfg) + 1e-9
        again = allocate(specs, BLOCK_SENS, budget, cfg, ev.proxy_drop, cycle=1)
        assert again == alloc  # seeded from (seed, cycle)
