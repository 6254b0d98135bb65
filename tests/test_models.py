"""Tests for hirelc.models: timm kwargs per architecture, and checkpoints that must fit exactly."""

from __future__ import annotations

import pytest
import torch

from hirelc.errors import HirelcError
from hirelc.models import ModelConfig, build_model, load_checkpoint, load_state_dict_file, model_config


def test_vit_config_gets_img_and_patch_size():
    cfg = model_config("test_vit", 10, 1, 32)
    assert cfg.kwargs == {"img_size": 32, "patch_size": 8}
    assert model_config("test_vit", 10, 1, 32, patch_size=4).kwargs["patch_size"] == 4
    with torch.no_grad():
        assert build_model(cfg).eval()(torch.zeros(2, 1, 32, 32)).shape == (2, 10)


def test_cnn_config_has_no_extra_kwargs():
    cfg = model_config("test_resnet", 7, 3, 32)
    assert (cfg.kwargs, cfg.num_classes, cfg.in_chans) == ({}, 7, 3)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_build_model_is_deterministic():
    cfg = model_config("test_resnet", 10, 1, 32)
    a, b = build_model(cfg).state_dict(), build_model(cfg).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "args, match",
    [
        (("resnet_does_not_exist", 10, 1, 32), "unknown model 'resnet_does_not_exist'"),
        (("test_vit", 10, 1, 32, 5), "patch size 5 does not divide the image size 32"),
        (("test_vit", 10, 1, 30), "patch size 7 does not divide the image size 30"),  # default 30 // 4
        (("test_resnet", 10, 1, 32, 4), "applies only to Vision Transformers"),
    ],
)
def test_bad_model_configs_are_rejected(args, match):
    with pytest.raises(HirelcError, match=match):
        model_config(*args)


@pytest.fixture(scope="module")
def resnet():
    return build_model(model_config("test_resnet", 10, 1, 32))


def _perturbed(model) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return {k: (v + torch.randn_like(v) if v.is_floating_point() else v).contiguous()
            for k, v in model.state_dict().items()}


def _save(sd: dict, path) -> None:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save(sd, path)


@pytest.mark.parametrize("fname", ["w.pt", "w.safetensors", "wrapped.pth"])
def test_checkpoint_round_trip(tmp_path, resnet, fname):
    sd = _perturbed(resnet)
    path = tmp_path / fname
    _save({"state_dict": sd} if fname.startswith("wrapped") else sd, path)
    model = load_checkpoint(build_model(model_config("test_resnet", 10, 1, 32)), path)
    got = model.state_dict()
    assert all(torch.equal(got[k], sd[k]) for k in sd)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(HirelcError, match="checkpoint not found"):
        load_state_dict_file(tmp_path / "nope.pt")


@pytest.mark.parametrize("fname", ["garbage.pt", "garbage.safetensors"])
def test_corrupt_checkpoint(tmp_path, fname):
    path = tmp_path / fname
    path.write_bytes(b"\x00\x01 definitely not a checkpoint \xff" * 10)
    with pytest.raises(HirelcError, match="is corrupt or not a state_dict") as e:
        load_state_dict_file(path)
    assert fname in str(e.value)


def test_checkpoint_that_is_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(HirelcError, match="does not hold a state_dict"):
        load_state_dict_file(path)


def test_checkpoint_of_another_architecture(tmp_path):
    path = tmp_path / "vit.pt"
    torch.save(build_model(model_config("test_vit", 10, 1, 32)).state_dict(), path)
    with pytest.raises(HirelcError, match=r"does not fit this architecture: \d+ missing .*\d+ unexpected"):
        load_checkpoint(build_model(model_config("test_resnet", 10, 1, 32)), path)


def test_checkpoint_with_other_shapes(tmp_path, resnet):
    path = tmp_path / "classes3.pt"
    torch.save(build_model(model_config("test_resnet", 3, 1, 32)).state_dict(), path)
    with pytest.raises(HirelcError, match=r"shape mismatches \(e\.g\. fc\.weight: \(3, 96\) vs \(10, 96\)\)"):
        load_checkpoint(resnet, path)
