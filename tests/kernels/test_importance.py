import pytest
import torch

from hirelc.errors import HirelcError
from hirelc.kernels import (
    channel_importance,
    fisher_channel_importance,
    head_channel_indices,
    head_importance,
    taylor_channel_importance,
    topk_keep,
)


def test_channel_importance_known_norms():
    w = torch.tensor([[3.0, 4.0], [0.0, 0.0], [-1.0, 1.0]])
    assert torch.allclose(channel_importance(w), torch.tensor([5.0, 0.0, 2**0.5]))
    assert torch.allclose(channel_importance(w, p=1), torch.tensor([7.0, 0.0, 2.0]))


def test_channel_importance_conv():
    w = torch.zeros(3, 2, 2, 2)
    w[0] = 1.0  # 8 ones -> L2 = sqrt(8)
    w[2, 1, 1, 1] = -2.0
    s = channel_importance(w)
    assert s.shape == (3,)
    assert torch.allclose(s, torch.tensor([8**0.5, 0.0, 2.0]))


def test_fisher_channel_importance():
    w = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    fisher = torch.tensor([[2.0, 0.5], [0.1, 9.0]])
    assert torch.allclose(fisher_channel_importance(w, fisher), torch.tensor([2.0 + 2.0, 0.9]))
    conv = torch.randn(4, 3, 3, 3)
    ones = torch.ones_like(conv)
    assert torch.allclose(fisher_channel_importance(conv, ones), channel_importance(conv) ** 2, rtol=1e-5)
    with pytest.raises(HirelcError):
        fisher_channel_importance(w, torch.ones(2, 3))


def _qkv(num_heads=2, dim=4, d_in=3, big_head=1):
    w = torch.full((3 * dim, d_in), 0.1)
    for idx in head_channel_indices([big_head], num_heads, dim):
        w[idx] = 1.0
    return w


def test_head_importance_picks_larger_head():
    w = _qkv(big_head=1)
    s = head_importance(w, 2)
    assert s.shape == (2,)
    # each head has 6 rows (2 per q/k/v) of 3 inputs
    assert torch.allclose(s, torch.tensor([18 * 0.01, 18 * 1.0]))
    assert int(s.argmax()) == 1
    assert int(head_importance(_qkv(big_head=0), 2).argmax()) == 0


def test_head_importance_with_fisher():
    w = _qkv(big_head=1)
    fisher = torch.ones_like(w)
    for idx in head_channel_indices([0], 2, 4):
        fisher[idx] = 1000.0  # makes head 0 the salient one despite smaller weights
    s = head_importance(w, 2, fisher)
    assert torch.allclose(s, torch.tensor([18 * 0.01 * 1000, 18.0]))
    assert int(s.argmax()) == 0
    with pytest.raises(HirelcError):
        head_importance(w, 2, torch.ones(3, 3))


def test_head_importance_counts_q_k_and_v():
    w = torch.zeros(12, 2)
    w[10, 0] = 3.0  # a v row of head 1 (v rows 8..11, head 1 -> 10, 11)
    w[1, 1] = 2.0  # a q row of head 0
    assert head_importance(w, 2).tolist() == [4.0, 9.0]


def test_head_importance_rejects_bad_layout():
    with pytest.raises(HirelcError):
        head_importance(torch.zeros(10, 4), 2)
    with pytest.raises(HirelcError):
        head_importance(torch.zeros(12, 4), 3)


@pytest.mark.parametrize(
    "heads, num_heads, dim, expected",
    [
        ([1], 2, 4, [2, 3, 6, 7, 10, 11]),
        ([0], 2, 4, [0, 1, 4, 5, 8, 9]),
        ([1, 0], 2, 4, list(range(12))),
        ([], 2, 4, []),
        ([2, 0], 3, 6, [0, 1, 4, 5, 6, 7, 10, 11, 12, 13, 16, 17]),
        ([1], 4, 4, [1, 5, 9]),
    ],
)
def test_head_channel_indices(heads, num_heads, dim, expected):
    assert head_channel_indices(heads, num_heads, dim) == expected


def test_head_channel_indices_rejects():
    with pytest.raises(HirelcError):
        head_channel_indices([2], 2, 4)
    with pytest.raises(HirelcError):
        head_channel_indices([0], 3, 4)


@pytest.mark.parametrize(
    "scores, keep, expected",
    [
        ([0.1, 0.9, 0.5, 0.7], 2, [1, 3]),
        ([0.1, 0.9, 0.5, 0.7], 3, [1, 2, 3]),
        ([0.1, 0.9, 0.5, 0.7], 0, [1]),  # clamped up to 1
        ([0.1, 0.9, 0.5, 0.7], -3, [1]),
        ([0.1, 0.9, 0.5, 0.7], 10, [0, 1, 2, 3]),  # clamped down to len
        ([1.0, 1.0, 1.0, 1.0], 2, [0, 1]),  # ties -> lower index
        ([0.5, 2.0, 0.5, 0.5, 2.0], 3, [0, 1, 4]),
        ([3.0], 1, [0]),
    ],
)
def test_topk_keep(scores, keep, expected):
    assert topk_keep(torch.tensor(scores), keep) == expected


def test_topk_keep_many_ties_and_empty():
    scores = torch.zeros(1000)
    scores[500:] = 1.0
    assert topk_keep(scores, 600) == list(range(100)) + list(range(500, 1000))
    with pytest.raises(HirelcError):
        topk_keep(torch.tensor([]), 1)


def test_taylor_channel_importance_exact_on_hand_made_maps():
    # 2 samples x 2 channels of 1x2 maps; per sample and channel sum(a * g), then |.| averaged over samples:
    # channel 0: |1*2 + 3*(-1)| = 1 and |2 + 2| = 4 -> 2.5; channel 1: |0*5 + 2*1| = 2 and |-3 - 1| = 4 -> 3
    act = torch.tensor([[[[1.0, 3.0]], [[0.0, 2.0]]], [[[2.0, 2.0]], [[1.0, 1.0]]]])
    grad = torch.tensor([[[[2.0, -1.0]], [[5.0, 1.0]]], [[[1.0, 1.0]], [[-3.0, -1.0]]]])
    s = taylor_channel_importance(act, grad)
    assert torch.allclose(s, torch.tensor([2.5, 3.0]))


def test_taylor_channel_importance_tokens_last_dim():
    act = torch.ones(2, 3, 4)  # (B, N, C)
    grad = torch.zeros(2, 3, 4)
    grad[:, :, 2] = 1.0  # only channel 2 matters: 3 tokens * 1 each
    s = taylor_channel_importance(act, grad, channel_dim=-1)
    assert s.tolist() == [0.0, 0.0, 3.0, 0.0]


def test_taylor_channel_importance_rejects_bad_shapes():
    with pytest.raises(HirelcError, match="does not match"):
        taylor_channel_importance(torch.ones(2, 3), torch.ones(2, 4))
    with pytest.raises(HirelcError, match="batch and a channel"):
        taylor_channel_importance(torch.ones(3), torch.ones(3))
