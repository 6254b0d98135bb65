"""Import timm on machines where torchvision is installed but cannot load.

timm's model code needs torchvision only for ``FrozenBatchNorm2d`` and for its data transforms, which hirelc
does not use (preprocessing is done in torch). Where the real torchvision imports, it is used unchanged.
Where it fails (for example a CUDA-only build beside a CPU torch), a stand-in package is registered whose
``ops.misc.FrozenBatchNorm2d`` is a real module and whose other attributes are placeholders that raise a
clear error if anything actually calls them.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types

import torch
from torch import nn

_STUB_FLAG = "__hirelc_stub__"
_state: dict[str, bool] = {}


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters (same buffers as torchvision's)."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


class _Missing:
    """Placeholder for a torchvision feature that is unavailable; fails loudly only when used."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, item: str) -> "_Missing":
        if item.startswith("__"):
            raise AttributeError(item)
        return _Missing(f"{self._name}.{item}")

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self._name} needs a working torchvision, which is not available here")

    def __mro_entries__(self, bases):
        return (object,)

    def __hash__(self) -> int:
        return hash(self._name)

    def __eq__(self, other) -> bool:
        return isinstance(other, _Missing) and other._name == self._name

    def __repr__(self) -> str:
        return f"<unavailable {self._name}>"


class _StubModule(types.ModuleType):
    def __getattr__(self, item: str):
        if item.startswith("__"):
            raise AttributeError(item)
        return _Missing(f"{self.__name__}.{item}")


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        mod = _StubModule(spec.name)
        mod.__path__ = []
        setattr(mod, _STUB_FLAG, True)
        if spec.name == "torchvision.ops.misc":
            mod.FrozenBatchNorm2d = FrozenBatchNorm2d
        if spec.name == "torchvision":
            mod.__version__ = "0.0+hirelc-stub"
        return mod

    def exec_module(self, module):
        return None


def torchvision_is_stub() -> bool:
    """True when the stand-in torchvision is registered instead of the real one."""
    tv = sys.modules.get("torchvision")
    return bool(tv is not None and getattr(tv, _STUB_FLAG, False))


def ensure_timm_importable() -> None:
    """Make ``import timm`` work: keep the real torchvision if it loads, else register the stand-in."""
    if _state.get("done"):
        return
    try:
        import torchvision  # noqa: F401
    except Exception:
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        sys.meta_path.insert(0, _StubFinder())
    _state["done"] = True


def import_timm():
    """Return the timm module, importable whatever the state of torchvision."""
    ensure_timm_importable()
    import timm  # imported after the torchvision guard is in place

    return timm
