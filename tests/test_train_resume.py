"""An interrupted training continues from its saved state and ends on the same weights as one that never stopped."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hirelc import runs
from hirelc.pipeline import DataOptions, train_stage
from hirelc.train import TrainConfig, fit

CFG = TrainConfig(epochs=3, batch_size=16, lr=1e-2, seed=3)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Dropout(0.3), nn.Flatten(),
                         nn.Linear(4 * 8 * 8, 3))


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 3, (64,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(7))


class _Killed(Exception):
    pass


class _DiesAfter:
    """A loader whose process 'dies' when it is asked for batch number ``after`` + 1."""

    def __init__(self, loader: DataLoader, after: int):
        self.loader, self.after, self.n = loader, after, 0

    @property
    def generator(self):
        return self.loader.generator

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            if self.n == self.after:
                raise _Killed
            self.n += 1
            yield batch


@pytest.mark.parametrize("after", [4, 6, 9])  # at an epoch's end (4 batches an epoch), inside the 2nd and 3rd
def test_resumed_training_ends_on_the_uninterrupted_weights(tmp_path, after):
    ref = _model()
    fit(ref, _loader(), CFG, progress=False)

    state = tmp_path / "state.pt"
    with pytest.raises(_Killed):
        fit(_model(), _DiesAfter(_loader(), after), CFG, progress=False, state_path=state, state_key={"k": 1},
            save_every_s=0.0)
    assert torch.load(state, weights_only=True)["step"] == after

    resumed = _model()
    stats = fit(resumed, _loader(), CFG, progress=False, state_path=state, state_key={"k": 1})
    assert stats["resumed_at_step"] == after and stats["steps"] == 12
    for (name, a), b in zip(ref.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_a_state_of_another_training_is_not_resumed(tmp_path):
    state = tmp_path / "state.pt"
    with pytest.raises(_Killed):
        fit(_model(), _DiesAfter(_loader(), 5), CFG, progress=False, state_path=state, state_key={"k": 1},
            save_every_s=0.0)
    other = TrainConfig(**{**CFG.__dict__, "lr": 5e-3})
    assert fit(_model(), _loader(), other, progress=False, state_path=state,
               state_key={"k": 2})["resumed_at_step"] is None
    state.write_bytes(b"torn file")
    assert fit(_model(), _loader(), CFG, progress=False, state_path=state,
               state_key={"k": 1})["resumed_at_step"] is None


def test_the_baseline_leaves_no_state_behind(tmp_path):
    rd = tmp_path / "r"
    rd.mkdir()
    (rd / runs.BASELINE_STATE).write_bytes(b"left over by something else")
    meta = train_stage(rd, "test_resnet", DataOptions(spec="fashion-mnist-mini", max_train=200),
                       TrainConfig(epochs=1, max_steps=4), progress=False)
    assert meta["resumed_at_step"] is None and (rd / runs.BASELINE_CKPT).is_file()
    assert not (rd / runs.BASELINE_STATE).exists()
