"""The lowered-model file (``lowered.pt``): tensors and a JSON recipe, never pickled Python objects."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from hirelc import runs
from hirelc.errors import HirelcError
from hirelc.lower.fold import fold_batchnorm
from hirelc.lower.prune import prune
from hirelc.lower.quantize import freeze, lowered_structure, swap_quantized
from hirelc.models import ModelConfig, build_model
from hirelc.options import LowerConfig
from hirelc.policy import LayerPolicy, Policy
from hirelc.qmodules import ActQuant, attach_block_quantizers, quant_layers
from hirelc.topology import Topology, build_topology

LOWERED_FORMAT = "hirelc-lowered"
LOWERED_VERSION = 2  # 2: state_dict + JSON recipe (1 pickled the modules)


def save_lowered(path: str | Path, model: nn.Module, model_cfg, policy: Policy, layers: dict[str, LayerPolicy],
                 topo: Topology, lower_cfg: LowerConfig) -> None:
    """Save a lowered model as tensors and JSON only: its state_dict beside the recipe that rebuilds its modules
    (model config, per-layer policy, lowering options, where quantizers sit). No Python objects are pickled, so
    loading the file (``weights_only=True``) can never run code from it."""
    runs.atomic_torch_save(
        {
            "format": LOWERED_FORMAT,
            "version": LOWERED_VERSION,
            "state_dict": {k: v.detach().contiguous() for k, v in model.state_dict().items()},
            "model_config": model_cfg.to_dict(),
            "policy": policy.to_dict(),
            "layers": {k: v.to_dict() for k, v in layers.items()},
            "topology": topo.to_dict(),
            "lower_config": asdict(lower_cfg),
            "structure": lowered_structure(model),
        },
        path,
    )


def rebuild_lowered(model_cfg, layers: dict[str, LayerPolicy], lower_cfg: LowerConfig, structure: dict) -> nn.Module:
    """The modules of a lowered model, without its values: a fresh timm model cut to the policy's kept counts,
    BatchNorms folded, quantized layers swapped in and frozen, quantizers where ``structure`` says. Which
    channels were kept does not matter here; the saved state_dict supplies every value."""
    model = build_model(model_cfg).eval()
    shape = (1, model_cfg.in_chans, model_cfg.img_size, model_cfg.img_size)
    topo = build_topology(model, shape)
    unknown = sorted(set(layers) ^ set(topo.names))
    if unknown:
        raise ValueError(f"the policy's layers do not match the model ({unknown[0]!r})")
    prune(model, topo, layers)  # weight norms of the fresh model: any choice of the same counts will do
    fold_batchnorm(model, shape)
    swap_quantized(model, layers, lower_cfg.act_signed, lower_cfg.percentile, lower_cfg.reduce_range)
    qls = quant_layers(model)
    for n in structure.get("output_quantized", []):
        qls[n].out_act = ActQuant(signed=lower_cfg.act_signed, percentile=lower_cfg.percentile)
    outs = set(structure.get("block_output_quantized", []))
    for b in structure.get("block_quantized", []):
        attach_block_quantizers(model.get_submodule(b), output=b in outs, signed=lower_cfg.act_signed,
                                percentile=lower_cfg.percentile)
    freeze(model)
    return model


def load_lowered(path: str | Path) -> dict:
    """Read a lowered-model file (tensors and JSON, loaded with ``weights_only=True``) and rebuild the model.

    Corrupt, foreign, older or tampered files are a one-line error; nothing in the file is ever executed.
    """
    p = Path(path)
    if not p.is_file():
        raise HirelcError(f"lowered model not found: {p} (run `hirelc lower` first)")
    try:
        blob = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise HirelcError(f"lowered model {p} is corrupt or holds more than tensors and plain data "
                          f"({type(e).__name__}: {first[:160]}); run `hirelc lower` again") from None
    if not isinstance(blob, dict) or blob.get("format") != LOWERED_FORMAT:
        raise HirelcError(f"{p} is not a hirelc lowered model")
    if blob.get("version") != LOWERED_VERSION:
        raise HirelcError(f"{p}: lowered-model version {blob.get('version')!r} is not this hirelc's "
                          f"({LOWERED_VERSION}); run `hirelc lower` again")
    try:
        mcfg = ModelConfig.from_dict(blob["model_config"])
        layers = {k: LayerPolicy.from_dict(v) for k, v in blob["layers"].items()}
        lcfg = LowerConfig(**blob["lower_config"])
        sd = blob["state_dict"]
        model = rebuild_lowered(mcfg, layers, lcfg, blob.get("structure") or {})
        own = model.state_dict()
        if set(own) != set(sd) or any(tuple(own[k].shape) != tuple(sd[k].shape) or own[k].dtype != sd[k].dtype
                                      for k in own):
            raise ValueError("its tensors do not fit the model its recipe describes")
        model.load_state_dict(sd, strict=True)
    except HirelcError:
        raise
    except Exception as e:
        raise HirelcError(f"lowered model {p} is corrupt: {type(e).__name__}: {e}") from None
    for name, t in sd.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise HirelcError(f"lowered model {p} holds non-finite values ({name})")
    model.eval()
    blob["model"] = model
    return blob
