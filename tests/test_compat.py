"""Tests for hirelc.compat: timm imports whatever the state of torchvision, and the stand-in is honest."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from hirelc import compat


@pytest.fixture(scope="module")
def real_torchvision_imports() -> bool:
    """Whether ``import torchvision`` succeeds in a fresh interpreter (this process may hold the stand-in)."""
    proc = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True, timeout=120)
    return proc.returncode == 0


def test_import_timm_creates_a_model():
    timm = compat.import_timm()
    model = timm.create_model("test_resnet", pretrained=False, num_classes=3, in_chans=1).eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 3)


def test_ensure_timm_importable_is_idempotent():
    compat.ensure_timm_importable()
    finders = list(sys.meta_path)
    compat.ensure_timm_importable()
    assert sys.meta_path == finders


def test_stub_is_active_exactly_when_real_torchvision_fails(real_torchvision_imports):
    compat.ensure_timm_importable()
    assert compat.torchvision_is_stub() is (not real_torchvision_imports)
    import torchvision.ops.misc as misc

    if real_torchvision_imports:
        assert misc.FrozenBatchNorm2d is not compat.FrozenBatchNorm2d
    else:
        assert misc.FrozenBatchNorm2d is compat.FrozenBatchNorm2d


def test_frozen_batchnorm_matches_eval_batchnorm():
    torch.manual_seed(0)
    c = 6
    bn = nn.BatchNorm2d(c, eps=1e-3).eval()
    frozen = compat.FrozenBatchNorm2d(c, eps=1e-3)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean"):
            getattr(bn, name).copy_(torch.randn(c))
        bn.running_var.copy_(torch.rand(c) + 0.1)
    missing, unexpected = frozen.load_state_dict(
        {k: v for k, v in bn.state_dict().items() if k != "num_batches_tracked"}, strict=True
    )
    assert not missing and not unexpected
    x = torch.randn(3, c, 5, 4)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), bn(x), atol=1e-5, rtol=1e-5)
    assert not list(frozen.parameters())  # statistics and affine terms are frozen buffers


def test_placeholder_raises_a_clear_error_when_called():
    missing = compat._Missing("torchvision.transforms").Resize
    assert "torchvision.transforms.Resize" in repr(missing)
    with pytest.raises(RuntimeError, match=r"torchvision\.transforms\.Resize needs a working torchvision"):
        missing(32)


def test_placeholder_can_be_subclassed_and_compared():
    base = compat._Missing("torchvision.models.Foo")

    class Sub(base):  # timm subclasses some torchvision classes at import time
        pass

    assert Sub.__bases__ == (object,) and isinstance(Sub(), Sub)
    assert base == compat._Missing("torchvision.models.Foo")
    assert base != compat._Missing("torchvision.models.Bar")
    with pytest.raises(AttributeError):
        base.__wrapped__  # noqa: B018  (dunder lookups must not fabricate placeholders)


def test_stub_features_raise_when_used(real_torchvision_imports):
    if real_torchvision_imports:
        pytest.skip("the real torchvision works here, so no stand-in is registered")
    compat.ensure_timm_importable()
    import torchvision
    import torchvision.transforms as T

    assert torchvision.__version__.endswith("hirelc-stub")
    with pytest.raises(RuntimeError, match="needs a working torchvision"):
        T.Resize(32)
