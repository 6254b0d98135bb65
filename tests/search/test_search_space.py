import numpy as np
import pytest
from search_synth import SENS, make_specs

from hirelc.cost import effective_ratio
from hirelc.errors import HirelcError
from hirelc.policy import LayerPolicy, PerChannel, PerGroup, Scheme, check_layer
from hirelc.search.config import Budget, SearchConfig
from hirelc.search.space import (
    Constraints,
    Strategy,
    check_budget_feasible,
    decode,
    decode_block,
    loosen,
    max_achievable_ratio,
    nearest_valid,
    random_policy,
    tighten,
    uniform_policy,
    valid_mask,
)
from hirelc.topology import LayerSpec

CFG = SearchConfig(bit_levels=(2, 3, 4, 5, 6, 8))
BASE = Constraints.from_config(CFG)


@pytest.fixture
def specs():
    return make_specs()


@pytest.mark.parametrize(
    "min_bits,strategy", [(2, Strategy.BOTH), (6, Strategy.QUANTIZE), (5, Strategy.PRUNE), (4, Strategy.BOTH)]
)
def test_random_policies_are_always_valid(specs, min_bits, strategy):
    c = BASE.narrowed(min_bits, strategy)
    by_name = {s.name: s for s in specs}
    rng = np.random.default_rng(0)
    seen_bits, seen_keep, seen_group = set(), set(), False
    for _ in range(150):
        layers = random_policy(specs, rng, c)
        for name, lp in layers.items():
            s = by_name[name]
            assert check_layer(s, lp) is None
            assert lp.bits >= min_bits
            if strategy == Strategy.PRUNE:
                assert lp.bits == 8
            if strategy == Strategy.QUANTIZE or not s.prunable:
                assert lp.keep_ratio == 1.0
            if s.kind == "dwconv" or s.in_features == 3 or lp.bits > 4:
                assert not isinstance(lp.granularity, PerGroup)
            seen_bits.add(lp.bits)
            seen_keep.add(lp.keep_ratio)
            seen_group |= isinstance(lp.granularity, PerGroup)
        assert layers["head.fc"].keep_ratio == 1.0
    assert seen_group == (min_bits <= 4 and strategy != Strategy.PRUNE)  # the mask forbids no more than it must
    if strategy != Strategy.PRUNE:
        assert min(seen_bits) == min_bits
    if strategy != Strategy.QUANTIZE:
        assert min(seen_keep) == pytest.approx(0.4)


def test_decode_maps_an_invalid_raw_action_to_the_nearest_valid_choice(specs):
    dw, head, pw = specs[2], specs[-1], specs[1]
    c = Constraints.from_config(SearchConfig()).narrowed(6, Strategy.BOTH)  # bits (8, 6, 5, 4), min 6
    g32 = c.granularities.index(PerGroup(32))
    lp = decode(dw, np.array([3, 0, 0, g32]), c)  # 4 bits < min_bits; per-group on a depthwise conv
    assert lp.bits == 6 and lp.granularity == PerChannel()
    assert decode(head, np.array([0, 6, 1, 0]), c).keep_ratio == 1.0  # classifier is not prunable
    low = c.narrowed(4, Strategy.BOTH)
    valid = decode(pw, np.array([3, 6, 1, g32]), low)  # valid choices pass through
    assert valid == LayerPolicy(4, c.keeps[6], Scheme.ASYMMETRIC, PerGroup(32))
    assert decode(pw, np.array([1, 6, 1, g32]), c).granularity == PerChannel()  # min 6 bits: no per-group at all
    # per-group with 8 bits: ONNX Runtime's int8 kernels cannot run it, so it decodes to per-channel
    assert decode(pw, np.array([0, 6, 1, g32]), low).granularity == PerChannel()
    assert decode(pw, np.array([2, 0, 0, 0]), c.narrowed(4, Strategy.PRUNE)).bits == 8
    assert nearest_valid(1, np.array([True, False, True])) == 0  # ties go to the milder level
    assert nearest_valid(3, np.array([False, True, False, False])) == 1


def test_prunable_members_of_a_group_share_the_leaders_keep():
    specs = [LayerSpec(n, "linear", 16, 16, (), 272, 272, "b", 7, p) for n, p in (("a", 1), ("b", 1), ("c", 0))]
    c = Constraints.from_config(SearchConfig())
    layers = decode_block(specs, np.array([0, 3, 0, 1, 0, 6, 0, 1, 0, 5, 0, 1]), c)
    assert layers["a"].keep_ratio == layers["b"].keep_ratio == c.keeps[3]
    assert layers["c"].keep_ratio == 1.0


def test_uniform_policy_respects_what_the_export_supports(specs):
    layers = uniform_policy(specs, 4, 0.5, granularity=PerGroup(32))
    assert layers["head.fc"].keep_ratio == 1.0 and layers["blocks.0.pw"].keep_ratio == 0.5
    assert layers["blocks.0.dw"].granularity == PerChannel() and layers["stem.conv"].granularity == PerChannel()
    assert layers["blocks.0.proj"].granularity == PerGroup(32)
    assert all(check_layer(s, layers[s.name]) is None for s in specs)


def test_impossible_target_ratio_is_refused_with_the_reachable_ratio(specs):
    best = max_achievable_ratio(specs, SearchConfig())
    assert best < max_achievable_ratio(specs, CFG)  # 2-bit levels reach further
    with pytest.raises(HirelcError, match=rf"target ratio 500x is impossible: .* reaches {best:.1f}x"):
        check_budget_feasible(specs, SearchConfig(), Budget(target_ratio=500))
    check_budget_feasible(specs, SearchConfig(), Budget(target_ratio=0.99 * best))
    with pytest.raises(HirelcError, match="max size 10 bytes is impossible"):
        check_budget_feasible(specs, SearchConfig(), Budget(max_size_bytes=10))
    with pytest.raises(HirelcError, match="latency budget needs"):
        check_budget_feasible(specs, SearchConfig(), Budget(max_latency_ms=1.0))


def test_tighten_meets_a_ratio_cheapest_layers_first(specs):
    start = uniform_policy(specs, 8, 1.0)
    out = tighten(specs, start, BASE, SENS, lambda lay: effective_ratio(specs, lay) >= 6.0)
    assert effective_ratio(specs, out) >= 6.0
    assert all(check_layer(s, out[s.name]) is None for s in specs)
    assert out["stem.conv"].bits >= out["blocks.1.mlp.fc1"].bits  # sensitive stem is spared


def _synthetic_latency(specs):
    """A latency where 4-bit layers run twice as slow as 8-bit ones (DQ + float kernel) and scale with MACs."""
    from hirelc.cost import group_keeps, kept_shape

    def latency(layers) -> float:
        keeps = group_keeps(specs, layers)
        total = 0.0
        for s in specs:
            out, inn = kept_shape(s, layers, keeps)
            total += (2.0 if (layers[s.name].bits or 32) <= 4 else 1.0) * out * inn / (s.out_features * s.in_features)
        return total

    return latency


def test_tighten_on_latency_prunes_instead_of_cutting_bits(specs):
    latency = _synthetic_latency(specs)
    start = uniform_policy(specs, 8, 1.0)
    budget = 0.7 * latency(start)
    out = tighten(specs, start, BASE, SENS, lambda lay: latency(lay) <= budget, cost=latency)
    assert latency(out) <= budget
    assert all(lp.bits == 8 for lp in out.values())  # 4 bits would be slower: never taken for latency
    assert any(lp.keep_ratio < 1.0 for lp in out.values())
    # storage tightening that may not break the latency budget afterwards
    fits = lambda lay: latency(lay) <= budget  # noqa: E731
    both = tighten(specs, out, BASE, SENS, lambda lay: effective_ratio(specs, lay) >= 6.0 and fits(lay), allowed=fits)
    assert effective_ratio(specs, both) >= 6.0 and fits(both)
    assert all(check_layer(s, both[s.name]) is None for s in specs)


def test_pruning_that_breaks_a_group_size_masks_it_to_per_channel():
    from hirelc.policy import LayerPolicy, PerChannel, PerGroup
    from hirelc.search.space import share_group_keeps
    from hirelc.topology import LayerSpec

    a = LayerSpec("a", "conv", 64, 64, (3, 3), 36864, 1, "b0", 0, True)
    b = LayerSpec("b", "conv", 64, 64, (3, 3), 36864, 1, "b1", 1, True, input_group=0)
    keep_all = {"a": LayerPolicy(bits=4), "b": LayerPolicy(bits=4, granularity=PerGroup(32))}
    assert share_group_keeps([a, b], keep_all)["b"].granularity == PerGroup(32)  # 64 inputs: 32 divides
    pruned = {**keep_all, "a": LayerPolicy(bits=4, keep_ratio=0.75)}  # 48 inputs left: 32 does not divide
    out = share_group_keeps([a, b], pruned)
    assert out["b"].granularity == PerChannel()
    assert out["a"] == pruned["a"]


def test_loosen_spends_the_leftover_budget_on_the_most_sensitive_layers(specs):
    fits = lambda lay: effective_ratio(specs, lay) >= 6.0  # noqa: E731
    start = uniform_policy(specs, 2, 1.0 - CFG.max_prune)  # far past the 6x budget
    assert effective_ratio(specs, start) > 12.0
    out = loosen(specs, start, BASE, SENS, fits)
    assert fits(out) and effective_ratio(specs, out) < 7.0  # ends near the budget's edge, not past it
    assert all(check_layer(s, out[s.name]) is None for s in specs)
    assert out["stem.conv"].bits > out["blocks.1.mlp.fc1"].bits  # the sensitive stem got its bits back first
    # no move left that would still fit: one more bit on the least sensitive layer breaks the budget
    again = loosen(specs, out, BASE, SENS, fits)
    assert again == out


def test_loosen_respects_the_constraints_and_leaves_misfits_alone(specs):
    fits = lambda lay: effective_ratio(specs, lay) >= 4.5  # noqa: E731
    start = uniform_policy(specs, 4, 1.0)  # about 8x
    assert fits(start)
    quant_only = BASE.narrowed(4, Strategy.QUANTIZE)
    out = loosen(specs, start, quant_only, SENS, fits)
    assert out != start and fits(out)
    assert all(lp.keep_ratio == 1.0 and lp.bits >= 4 for lp in out.values())
    heavy = uniform_policy(specs, 8, 1.0)
    assert not fits(heavy) and loosen(specs, heavy, BASE, SENS, fits) == heavy


def test_formats_the_space_does_not_offer_are_never_chosen(specs):
    """The latency table's slow formats (here: asymmetric and per-group) are masked or decoded away."""
    from hirelc.policy import format_key

    config = SearchConfig(bit_levels=(2, 4, 8), formats=("w8", "w4"))
    c = Constraints.from_config(config)
    rng = np.random.default_rng(0)
    for _ in range(50):
        layers = random_policy(specs, rng, c)
        assert {format_key(lp) for lp in layers.values()} <= {"w8", "w4", "fp32"}
    s = next(sp for sp in specs if check_layer(sp, LayerPolicy(4, granularity=PerGroup(32))) is None)
    i_asym, i_group = 1, len(c.granularities) - 1
    lp = decode(s, np.array([c.bits.index(4), 0, i_asym, i_group]), c)  # asks for w4-asym-group
    assert lp.scheme is Scheme.SYMMETRIC and isinstance(lp.granularity, PerChannel) and lp.bits == 4
    _, _, scheme, gran = valid_mask(s, c)
    assert scheme.tolist() == [True, False] and not gran[i_group]


def test_formats_without_4_bit_drop_the_low_widths_and_w8_is_required():
    assert SearchConfig(bit_levels=(2, 4, 6, 8), formats=("w8", "w8-asym")).bit_levels == (6, 8)
    assert SearchConfig(formats=("w4-asym", "w8")).formats == ("w8", "w4-asym")  # canonical order
    with pytest.raises(HirelcError, match="containing w8"):
        SearchConfig(formats=("w4",))
    with pytest.raises(HirelcError, match="subset"):
        SearchConfig(formats=("w8", "w3"))


def test_fast_formats_reads_the_latency_table():
    from hirelc.latency import fast_formats

    table = {"layers": {
        "a": {"fp32": 2.0, "w8": 1.0, "w8-asym": 3.0, "w4": 1.05, "w4-asym": 1.0, "w4-group": 6.0},
        "b": {"fp32": 4.0, "w8": 2.0, "w8-asym": 2.1, "w4": 2.1, "w4-asym": 2.0},  # no group format fits b
    }}
    # w8-asym: 5.1 vs 3.0 (slow); w4: 3.15 vs 3.0 (fast, within 10 %); w4-group: 6.0 vs 1.0 on the one layer
    assert fast_formats(table) == ("w8", "w4", "w4-asym")
    assert fast_formats(table, tolerance=1.02) == ("w8", "w4-asym")
