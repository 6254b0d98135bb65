"""Tests for hirelc.train: the cached, atomically written fp32 baseline and the evaluation loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hirelc import runs
from hirelc import train as train_mod
from hirelc.errors import HirelcError
from hirelc.models import model_config
from hirelc.train import TrainConfig, evaluate, load_baseline, train_baseline

CFG = TrainConfig(epochs=1, max_steps=3)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, bundle):
    """(run dir, ModelConfig, metadata) of a test_resnet baseline trained for 3 steps."""
    rd = tmp_path_factory.mktemp("train") / "run"
    mcfg = model_config("test_resnet", bundle.num_classes, bundle.in_chans, 32)
    meta = train_baseline(rd, mcfg, bundle, CFG, progress=False)
    return rd, mcfg, meta


def _stat(rd):
    return {p.name: p.stat().st_mtime_ns for p in rd.iterdir()}


def test_baseline_writes_checkpoint_and_metadata_only(trained, bundle):
    rd, mcfg, meta = trained
    assert sorted(p.name for p in rd.iterdir()) == [runs.BASELINE_META, runs.BASELINE_CKPT]  # no temp files
    on_disk = runs.read_json(rd / runs.BASELINE_META)
    assert on_disk == meta
    assert meta["reused"] is False
    assert meta["model"] == mcfg.to_dict()
    assert meta["key"]["train"]["max_steps"] == 3
    # the recorded accuracies are the saved weights' top-1 on the whole val and test splits
    model = load_baseline(rd)[0].eval()
    for k, split in (("val_acc", bundle.val), ("test_acc", bundle.test)):
        with torch.no_grad():
            hits = (model(split.x).argmax(1) == split.y).sum().item()
        assert meta[k] == pytest.approx(100.0 * hits / len(split.y), abs=1e-9), k


def test_baseline_checkpoint_reproduces_recorded_accuracy(trained, bundle):
    rd, mcfg, meta = trained
    model, cfg, meta2 = load_baseline(rd)
    assert cfg == mcfg and meta2 == meta
    assert evaluate(model, bundle.loader("val", 256)) == meta["val_acc"]


def test_identical_second_call_is_reused_without_training(trained, bundle, monkeypatch, copy_run):
    rd, mcfg = copy_run(trained[0]), trained[1]
    before = _stat(rd)

    def no_training(*a, **k):
        raise AssertionError("must not train again")

    monkeypatch.setattr(train_mod, "fit", no_training)
    meta = train_baseline(rd, mcfg, bundle, CFG, progress=False)
    assert meta["reused"] is True
    assert _stat(rd) == before


def test_other_model_in_same_dir_is_rejected(trained, bundle):
    rd, _, _ = trained
    before = _stat(rd)
    other = model_config("test_vit", bundle.num_classes, bundle.in_chans, 32)
    with pytest.raises(HirelcError, match="already holds a baseline for another model or dataset"):
        train_baseline(rd, other, bundle, CFG, progress=False)
    assert _stat(rd) == before


def test_interrupted_save_leaves_no_partial_file(trained, bundle, tmp_path, monkeypatch):
    """A crash while writing the checkpoint must leave neither a half file nor a temp file behind."""
    src, mcfg, _ = trained

    def crash(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    rd = tmp_path / "run"
    with pytest.raises(OSError, match="disk full"):
        train_baseline(rd, mcfg, bundle, CFG, progress=False, checkpoint=src / runs.BASELINE_CKPT)
    assert list(rd.iterdir()) == []


def test_baseline_from_checkpoint_skips_training(trained, bundle, tmp_path, monkeypatch):
    src, mcfg, meta = trained
    monkeypatch.setattr(train_mod, "fit", lambda *a, **k: pytest.fail("must not train"))
    got = train_baseline(tmp_path, mcfg, bundle, CFG, progress=False, checkpoint=src / runs.BASELINE_CKPT)
    assert got["val_acc"] == meta["val_acc"] and got["test_acc"] == meta["test_acc"]
    assert got["key"]["init_checkpoint"] == runs.file_digest(src / runs.BASELINE_CKPT)  # content, not path


def test_checkpoint_reuse_is_keyed_on_content_not_path(trained, bundle, tmp_path):
    """The same path with other weights in it is another baseline: it is loaded again, not reused."""
    import torch

    src, mcfg, _ = trained
    ck = tmp_path / "init.pt"
    sd = torch.load(src / runs.BASELINE_CKPT, weights_only=True)
    torch.save(sd, ck)
    first = train_baseline(tmp_path / "run", mcfg, bundle, CFG, progress=False, checkpoint=ck)
    torch.save({k: v * 0.5 if v.is_floating_point() else v for k, v in sd.items()}, ck)
    second = train_baseline(tmp_path / "run", mcfg, bundle, CFG, progress=False, checkpoint=ck)
    assert second["reused"] is False and second["key"]["init_checkpoint"] != first["key"]["init_checkpoint"]
    third = train_baseline(tmp_path / "run", mcfg, bundle, CFG, progress=False, checkpoint=ck)
    assert third["reused"] is True


class _Constant(nn.Module):
    """Predicts class ``c`` for every input."""

    def __init__(self, c: int, k: int = 10):
        super().__init__()
        self.register_buffer("logits", torch.eye(k)[c])

    def forward(self, x):
        return self.logits.expand(len(x), -1)


@pytest.mark.parametrize("c", [0, 3])
def test_evaluate_returns_top1_percent(bundle, c):
    y = bundle.test.y
    acc = evaluate(_Constant(c), bundle.loader("test", 128))
    assert acc == pytest.approx(100.0 * (y == c).float().mean().item())
    assert 0.0 < acc < 100.0


class _Oracle(nn.Module):
    """Reads the label off the input: x[:, 0] % 4."""

    def forward(self, x):
        return nn.functional.one_hot(x[:, 0].long() % 4, 4).float()


def test_evaluate_is_100_for_an_oracle_across_uneven_batches():
    x = torch.arange(12).float().reshape(12, 1)
    y = torch.arange(12) % 4
    assert evaluate(_Oracle(), [(x[:5], y[:5]), (x[5:], y[5:])]) == 100.0
    assert evaluate(_Oracle(), [(x[:5], (y[:5] + 1) % 4), (x[5:], y[5:])]) == pytest.approx(100.0 * 7 / 12)


@pytest.mark.parametrize(
    "broken, match",
    [("no-dir", "run directory not found"), ("no-ckpt", "baseline.pt is missing"),
     ("corrupt-json", "baseline metadata .* is corrupt")],
)
def test_load_baseline_reports_missing_or_corrupt_run(tmp_path, broken, match):
    rd = tmp_path / "run"
    if broken != "no-dir":
        rd.mkdir()
        (rd / runs.BASELINE_META).write_text("{oops")
    if broken == "corrupt-json":
        (rd / runs.BASELINE_CKPT).write_bytes(b"")
    with pytest.raises(HirelcError, match=match):
        load_baseline(rd)


def test_learning_rate_defaults_to_the_model_family_and_an_explicit_one_is_kept(trained, tmp_path, bundle):
    rd, mcfg, meta = trained
    assert meta["key"]["train"]["lr"] == train_mod.CNN_LR == 2e-3  # test_resnet: a CNN
    vit = model_config("test_vit", bundle.num_classes, bundle.in_chans, 32)
    assert train_mod.default_lr(vit) == train_mod.VIT_LR == 1e-3
    vmeta = train_baseline(tmp_path / "vit", vit, bundle, TrainConfig(epochs=1, max_steps=1), progress=False)
    assert vmeta["key"]["train"]["lr"] == 1e-3
    again = train_baseline(tmp_path / "vit", vit, bundle, TrainConfig(epochs=1, max_steps=1, lr=1e-3), progress=False)
    assert again["reused"] is True  # the default resolved to the same config as giving it
    cnn = train_baseline(tmp_path / "cnn", mcfg, bundle, TrainConfig(epochs=1, max_steps=1, lr=5e-4), progress=False)
    assert cnn["key"]["train"]["lr"] == 5e-4
