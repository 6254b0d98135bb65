"""timm models adapted to the data: never downloaded, always built with ``pretrained=False``.

``num_classes`` and ``in_chans`` follow the dataset; Vision Transformers also get ``img_size`` and a
``patch_size`` so that small inputs (32x32) work. A checkpoint (``.pt`` state_dict or ``.safetensors``) can
replace the random initialisation; it must fit the architecture exactly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from hirelc.compat import import_timm
from hirelc.errors import HirelcError


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the same architecture later (stored in every run directory)."""

    name: str
    num_classes: int
    in_chans: int
    img_size: int
    kwargs: dict = field(default_factory=dict)  # extra timm kwargs actually passed (img_size, patch_size ...)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return cls(**d)


def model_config(name: str, num_classes: int, in_chans: int, img_size: int, patch_size: int | None = None) -> ModelConfig:
    """Resolve timm kwargs for ``name`` at this input size (patch size for ViTs: img_size // 4 by default)."""
    timm = import_timm()
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:5]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise HirelcError(f"unknown model {name!r}: not a timm model name{hint}")
    kwargs: dict = {}
    # ViT-like models take img_size/patch_size through **kwargs; detect them by their defining module.
    module = getattr(timm.model_entrypoint(name), "__module__", "")
    is_vit = any(k in module for k in ("vision_transformer", "deit", "beit", "cait", "xcit", "eva"))
    if is_vit:
        kwargs["img_size"] = img_size
        kwargs["patch_size"] = patch_size or max(1, img_size // 4)
        if img_size % kwargs["patch_size"]:
            raise HirelcError(f"patch size {kwargs['patch_size']} does not divide the image size {img_size}")
    elif patch_size is not None:
        raise HirelcError(f"--patch-size applies only to Vision Transformers, not {name!r}")
    return ModelConfig(name=name, num_classes=num_classes, in_chans=in_chans, img_size=img_size, kwargs=kwargs)


def build_model(cfg: ModelConfig) -> nn.Module:
    """A fresh, randomly initialised model for ``cfg`` (nothing is downloaded)."""
    timm = import_timm()
    torch.manual_seed(0)
    try:
        return timm.create_model(
            cfg.name, pretrained=False, num_classes=cfg.num_classes, in_chans=cfg.in_chans, **cfg.kwargs
        )
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        raise HirelcError(f"cannot build {cfg.name!r} for {cfg.img_size}x{cfg.img_size} inputs: {e}") from None


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state_dict from ``.pt``/``.pth`` (optionally wrapped as {'state_dict': ...}) or ``.safetensors``."""
    p = Path(path)
    if not p.is_file():
        raise HirelcError(f"checkpoint not found: {p}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file  # imported for .safetensors checkpoints only

            sd = load_file(str(p))
        else:
            sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise HirelcError(f"checkpoint {p} is corrupt or not a state_dict: {type(e).__name__}: {e}") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise HirelcError(f"checkpoint {p} does not hold a state_dict of tensors")
    return sd


def load_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a state_dict into ``model``; any missing/unexpected key or shape mismatch is a clear error."""
    sd = load_state_dict_file(path)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    bad = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if bad:
            k = bad[0]
            parts.append(f"{len(bad)} shape mismatches (e.g. {k}: {tuple(sd[k].shape)} vs {tuple(own[k].shape)})")
        raise HirelcError(f"checkpoint {path} does not fit this architecture: {'; '.join(parts)}")
    bad_values = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad_values:
        raise HirelcError(f"checkpoint {path} holds non-finite values (NaN or inf) in {len(bad_values)} tensor(s), "
                          f"e.g. {bad_values[0]}")
    model.load_state_dict(sd)
    return model

