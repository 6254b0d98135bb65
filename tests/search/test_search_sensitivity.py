import torch
from torch import nn

from hirelc.search.sensitivity import fisher_sensitivity, normalise


class TwoBranch(nn.Module):
    """The logits depend 100x more on ``big`` than on ``small``."""

    def __init__(self):
        super().__init__()
        self.big, self.small = nn.Linear(6, 3), nn.Linear(6, 3)

    def forward(self, x):
        return self.big(x) + 0.01 * self.small(x)


def _batches(n_batches=4, batch=8, features=6, classes=3):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, features, generator=g), torch.randint(0, classes, (batch,), generator=g))
            for _ in range(n_batches)]


def test_fisher_ranks_the_layer_that_matters_more_higher():
    torch.manual_seed(0)
    model = TwoBranch().train()
    out = fisher_sensitivity(model, _batches(), ["big", "small"], {"big": "b1", "small": "b2"}, n_samples=20)
    assert out["layer"]["big"] == 1.0 and 0 < out["layer"]["small"] < 0.01
    assert out["block"] == {"b1": 1.0, "b2": out["layer"]["small"]}
    assert model.training  # mode restored


def test_fisher_on_a_sequential_uses_single_samples_and_sums_blocks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    sizes = []
    model[0].register_forward_hook(lambda m, i, o: sizes.append(i[0].shape[0]))
    names = ["0", "2", "4"]
    out = fisher_sensitivity(model, _batches(), names, {"0": "a", "2": "a", "4": "b"}, n_samples=10)
    assert sizes == [1] * 10  # batch of 1, stops at n_samples
    assert max(out["layer"].values()) == 1.0 and all(0 < v <= 1 for v in out["layer"].values())
    raw = {"a": out["layer"]["0"] + out["layer"]["2"], "b": out["layer"]["4"]}
    assert out["block"] == normalise(raw)


def test_normalise():
    assert normalise({"a": 2.0, "b": 1.0}) == {"a": 1.0, "b": 0.5}
    assert normalise({"a": 0.0}) == {"a": 0.0}
