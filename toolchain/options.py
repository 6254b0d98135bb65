"""Every option a user sets, as frozen dataclasses: defaults and validation live here once.

The command line reads its defaults from these classes (``hirelc <command> --help`` shows them), and each stage
takes one of them: :class:`DataOptions` (which data, how it is split), :class:`TrainConfig` (the fp32
baseline), :class:`LowerConfig` (pruning ranking, activation quantizers, fine-tuning), :class:`VerifyConfig`
(timing, memory and the release gate), :class:`CompressConfig` (the main job), :class:`BenchConfig` and
:class:`AblateConfig` (the studies). Out-of-range or non-finite
values raise :class:`~hirelc.errors.HirelcError` naming the option. The module imports no numerical library.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from hirelc.errors import HirelcError
from hirelc.validate import at_least, finite

IMPORTANCES = ("taylor", "magnitude")  # how lowering ranks the channels it prunes
SALIENCY_BATCH = 128
DEFAULT_MIN_PARITY = 98.0  # a model.onnx that is not the lowered model agrees on far fewer images
SEARCH_PRESETS = ("quick", "standard", "thorough")  # search effort (hirelc.search.PRESETS holds their settings)
# what ranks a cycle's candidates for real evaluation (hirelc.search.SearchConfig.screening)
SCREENINGS = ("surrogate", "proxy")
# what the surrogate learns as a correction to (hirelc.search.SearchConfig.surrogate_prior)
SURROGATE_PRIORS = ("none", "proxy")
# what `hirelc bench` builds and measures on one budget
# where `hirelc verify` / `hirelc bench` run the artifacts (hirelc.export.targets opens them)
TARGETS = ("ort-cpu", "ort-cuda", "ort-tensorrt", "openvino")
METHODS = ("fp32", "ort-int8", "uniform-w4", "uniform-int8", "prune-int8", "random", "flat", "hirelc")
# the searches `hirelc ablate` compares: SearchConfig fields each one changes. The first four switch off one part
# of the hierarchical search; random and flat are the baselines on the same loop and evaluations; uniform is the
# mildest uniform policy (one bit-width and one keep ratio everywhere) meeting the budget, evaluated once.
VARIANTS: dict[str, dict] = {
    "full": {},
    "no-surrogate": {"use_surrogate": False},
    "uniform-sensitivity": {"fisher_guided": False},
    "single-agent": {"ensemble": False},
    # random search draws its warm-up as it draws every other policy: unscreened, whatever the preset screens
    "random": {"mode": "random", "warmup_pool": 0},
    "random-time": {"mode": "random", "warmup_pool": 0},  # and as many cycles as the full search's time holds
    "flat": {"mode": "flat"},
    "proxy-screen": {"screening": "proxy"},  # the proxy, calibrated on real results, ranks each cycle's candidates
    # and ranks them among as many random policies repaired into the budget (the quick preset's 8 per cycle)
    "proxy-screen-pool": {"screening": "proxy", "random_candidates": 8},
    # the surrogate corrects the proxy mapped to accuracy instead of learning accuracy from scratch
    "proxy-prior": {"surrogate_prior": "proxy"},
    # the warm-up's random policies are the proxy's best of 64 random feasible ones (the quick preset's own), or
    # evaluated as drawn (the other presets', and quick's before its warm-up was screened)
    "screened-warmup": {"warmup_pool": 64},
    "plain-warmup": {"warmup_pool": 0},
    # random search where every real evaluation is the proxy's best of a pool of 64 random feasible policies:
    # what the cheap proxy alone buys, with no agents and no surrogate
    "random-screened": {"mode": "random", "warmup_pool": 64, "random_candidates": 64},
    "uniform": {"warmup_real_evals": 1, "cycles": 0},
}
REFERENCE_VARIANT = "full"  # the variant every other one is compared with, paired by seed
EQUAL_TIME = "random-time"  # random search at the reference's wall time: it needs the reference in the same study


PICKS = ("accurate", "smallest", "fastest")  # --pick by name; a number names a real evaluation on the front


def check_pick(pick: str | None) -> None:
    """``--pick`` names a pick or a real evaluation's number (whether it is on the front is checked on use)."""
    if pick is not None and pick not in PICKS and not (pick.isascii() and pick.isdecimal() and int(pick) >= 1):
        raise HirelcError(f"--pick {pick!r}: use {', '.join(PICKS)} or the number of a real evaluation on the front")


@dataclass(frozen=True)
class DataOptions:
    spec: str = "fashion-mnist"
    data_dir: str | None = None
    img_size: int = 32
    val_fraction: float = 0.1
    seed: int = 0
    max_train: int | None = None

    def __post_init__(self):
        at_least("--img-size", self.img_size, 8)
        at_least("--seed", self.seed, 0)
        at_least("--max-train", self.max_train, 1)
        finite("validation fraction", self.val_fraction, low=0.0, high=1.0, strict_low=True, strict_high=True)



@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 3
    batch_size: int = 128
    lr: float | None = None  # AdamW peak (None: default_lr of the model); cosine decay to 1% after warm-up
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    warmup_frac: float = 0.05
    augment: bool = True  # random 4-px shifts + horizontal flips, done in torch
    seed: int = 0
    max_steps: int | None = None  # cap on optimizer steps (tests, quick evaluations)

    def __post_init__(self):
        at_least("--epochs", self.epochs, 1)  # 0 would save an untrained baseline as if it were one
        at_least("--batch-size", self.batch_size, 1)
        at_least("--seed", self.seed, 0)
        at_least("--max-steps", self.max_steps, 0)
        if self.lr is not None:
            finite("--lr", self.lr, low=0.0, strict_low=True)
        finite("weight decay", self.weight_decay, low=0.0)
        finite("label smoothing", self.label_smoothing, low=0.0, high=1.0, strict_high=True)
        finite("warm-up fraction", self.warmup_frac, low=0.0, high=1.0)



@dataclass(frozen=True)
class LowerConfig:
    epochs: float = 1.0  # QAT epochs over the training split (fractions allowed)
    lr: float = 2e-5
    # further peak learning rates the fine-tune tries from the same calibrated model when keep_best is on; the one
    # ending at the best validation accuracy is kept (ties: the earlier, ``lr`` first). A mildly damaged CNN
    # recovers best at 2e-5 (5e-4 undoes its calibration); a heavily compressed ViT needs 5e-4 (docs/results.md)
    lr_also: tuple[float, ...] = (5e-4,)
    batch_size: int = 128
    calib_batches: int = 8  # training batches used to calibrate activation ranges
    # training batches that re-estimate BatchNorm statistics after pruning, before folding (0: keep the old ones)
    bn_batches: int = 8
    act_quant: bool = True  # Q/DQ on the inputs of quantized layers (False: weight-only)
    act_signed: bool = False  # uint8 activations by default: the fast int8 path on CPUs without VNNI
    percentile: float | None = None  # None = min-max calibration, else e.g. 99.99
    fuse_outputs: bool = True  # quantize outputs of layers ORT would not fuse (residual/pool inputs, 2-D heads)
    fuse_adds: bool = True  # quantize residual blocks' inputs so ORT runs their adds as integer QLinearAdd
    reduce_range: bool = True  # 7-bit codes for 8-bit symmetric weights (no int16 overflow on CPUs without VNNI)
    importance: str = "taylor"  # channel ranking for pruning: "taylor" (loss saliency on training batches) | "magnitude"
    importance_batches: int = 2  # training batches the Taylor saliency is measured on
    max_steps: int | None = None  # cap on QAT steps (search candidates, tests)
    keep_best: bool = True  # keep the calibrated weights when fine-tuning lowers validation accuracy
    # Knowledge distillation during QAT: the loss mixes the labels' cross-entropy with (weight ``distill``) the
    # KL divergence to the fp32 model's softened outputs (temperature 2). 0 fine-tunes on labels alone.
    distill: float = 0.0
    seed: int = 0

    def __post_init__(self):
        finite("--epochs", self.epochs, low=0.0)
        finite("--distill", self.distill, low=0.0, high=1.0)
        finite("--lr", self.lr, low=0.0, strict_low=True)
        also = (self.lr_also,) if isinstance(self.lr_also, (int, float, str)) else self.lr_also
        # a tuple of floats, also when read back from JSON (a list there)
        object.__setattr__(self, "lr_also", tuple(finite("--lr-also", v, low=0.0, strict_low=True) for v in also))
        at_least("--max-steps", self.max_steps, 0)
        at_least("batch size", self.batch_size, 1)
        at_least("calibration batches", self.calib_batches, 1)
        at_least("BatchNorm batches", self.bn_batches, 0)
        at_least("--seed", self.seed, 0)
        if self.percentile is not None:
            finite("--percentile", self.percentile, low=50.0, high=100.0, strict_low=True)
        if self.importance not in IMPORTANCES:
            raise HirelcError(f"unknown pruning importance {self.importance!r}; expected one of {', '.join(IMPORTANCES)}")



@dataclass(frozen=True)
class VerifyConfig:
    """What :func:`verify_run` measures and the release gate :func:`check_gate` applies (None = no bound)."""

    batch_sizes: tuple[int, ...] = (1, 8)  # latency batch sizes
    runs: int = 50  # timed rounds per model and batch (medians need many on a noisy machine)
    warmup: int = 5
    threads: int | None = None  # ORT intra-op threads; None = all cores
    parity_samples: int | None = None  # test samples for ONNX-vs-PyTorch parity; None = the whole split
    eval_batch: int = 256
    max_drop: float | None = None  # gate: hirelc ORT top-1 may be at most this many points below fp32's
    min_size_ratio: float | None = None  # gate: fp32 bytes / hirelc bytes at least this
    max_latency_ms: float | None = None  # gate: hirelc median latency at latency_batch at most this
    latency_batch: int = 1
    min_parity: float | None = DEFAULT_MIN_PARITY  # gate: top-1 agreement (%) of model.onnx with lowered.pt
    max_memory_mb: float | None = None  # gate: hirelc session memory (resident-set growth, MiB) at most this
    memory: bool = True  # measure each artifact's session memory (a fresh process per artifact)
    against: str | None = None  # report.json of an earlier release, for the regression bounds below
    max_top1_regression: float | None = None  # gate: hirelc top-1 at most this many points below the old one
    max_latency_regression: float | None = None  # gate: % slower than the old hirelc, per batch (same CPU only)
    max_size_regression: float | None = None  # gate: % more bytes than the old hirelc file
    targets: tuple[str, ...] = ("ort-cpu",)  # runtimes every artifact is measured on (TARGETS)
    gate_target: str | None = None  # the target whose figures the gate checks; None = the first of targets

    def __post_init__(self):
        check_targets(self.targets, self.gate_target, "verify")
        if self.runs < 1 or self.warmup < 0:
            raise HirelcError(f"verify: runs must be >= 1 and warmup >= 0, got {self.runs} / {self.warmup}")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise HirelcError(f"verify: batch sizes must be >= 1, got {self.batch_sizes}")
        if self.parity_samples is not None and self.parity_samples < 1:
            raise HirelcError(f"verify: parity_samples must be >= 1, got {self.parity_samples}")
        for name in ("max_drop", "min_size_ratio", "max_latency_ms", "min_parity", "max_memory_mb",
                     "max_top1_regression", "max_latency_regression", "max_size_regression"):
            v = getattr(self, name)
            if v is not None and not math.isfinite(v):  # a NaN bound would pass every comparison
                raise HirelcError(f"verify: --{name.replace('_', '-')} must be a finite number, got {v}")
        if self.min_parity is not None and not 0 <= self.min_parity <= 100:
            raise HirelcError(f"verify: --min-parity is a percentage (0..100), got {self.min_parity}")
        if self.min_size_ratio is not None and self.min_size_ratio <= 0:
            raise HirelcError(f"verify: --min-size-ratio must be > 0, got {self.min_size_ratio}")
        if self.max_latency_ms is not None and self.max_latency_ms <= 0:
            raise HirelcError(f"verify: --max-latency-ms must be > 0, got {self.max_latency_ms}")
        if self.max_memory_mb is not None and (self.max_memory_mb <= 0 or not self.memory):
            raise HirelcError(f"verify: --max-memory-mb must be > 0 and needs the memory measured, got "
                              f"{self.max_memory_mb}")
        regressions = (self.max_top1_regression, self.max_latency_regression, self.max_size_regression)
        if self.against is None and any(v is not None for v in regressions):
            raise HirelcError("verify: the --max-*-regression bounds need --against OLD/report.json")
        if self.latency_batch not in self.batch_sizes:
            raise HirelcError(f"verify: the gate's latency batch {self.latency_batch} is not among the batch "
                              f"sizes timed {self.batch_sizes}")

    def bounds(self) -> dict:
        return {"max_drop": self.max_drop, "min_size_ratio": self.min_size_ratio,
                "max_latency_ms": self.max_latency_ms, "latency_batch": self.latency_batch,
                "min_parity": self.min_parity, "max_memory_mb": self.max_memory_mb,
                "max_top1_regression": self.max_top1_regression,
                "max_latency_regression": self.max_latency_regression,
                "max_size_regression": self.max_size_regression, "gate_target": self.gated_target}

    @property
    def gated_target(self) -> str:
        """The target the release gate reads its figures from."""
        return self.gate_target or self.targets[0]


def check_targets(targets: tuple[str, ...], gate_target: str | None, command: str) -> None:
    """Known targets, none twice, and a gate target among them."""
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise HirelcError(f"{command}: unknown target(s) {', '.join(unknown) or '(none given)'} "
                          f"(use {', '.join(TARGETS)})")
    if len(set(targets)) != len(targets):
        raise HirelcError(f"{command}: a target is given twice ({', '.join(targets)})")
    if gate_target is not None and gate_target not in targets:
        raise HirelcError(f"{command}: --gate-target {gate_target} is not among the targets measured "
                          f"({', '.join(targets)}); add --target {gate_target}")



@dataclass(frozen=True)
class CompressConfig:
    """The main job in one run directory. Defaults: resnet18 on the embedded Fashion-MNIST subset."""

    run_dir: str = "hirelc-run"
    model: str = "resnet18"
    data: DataOptions = field(default_factory=lambda: DataOptions(spec="fashion-mnist-mini"))
    train_epochs: int = 4
    policy: str | None = None  # preset or policy JSON; None = run the HiReLC search
    target_ratio: float = 8.0
    search_preset: str = "quick"
    max_size_mb: float | None = None
    max_latency_ms: float | None = None
    latency_budget: bool = True  # without max_latency_ms: no slower than ORT int8 of the model (batch 8)
    qat_epochs: float = 1.0
    distill: float = 0.0  # knowledge distillation weight of the final fine-tune (LowerConfig.distill)
    verify_runs: int = 50
    resume: bool = False
    seed: int = 0
    workers: int = 1  # the search's real evaluations on a local Ray instance with this many CPUs (1: in process)
    ray_address: str | None = None  # or on this Ray cluster
    pick: str | None = None  # lower this entry of the search's front instead of the winner (hirelc.search.front)
    screening: str = "surrogate"  # what ranks the search's candidates (SCREENINGS; SearchConfig.screening)
    surrogate_prior: str = "none"  # what the surrogate corrects (SURROGATE_PRIORS; SearchConfig.surrogate_prior)
    warmup_pool: int | None = None  # random policies the proxy screens for the warm-up (None: the preset's)
    opset: int = 21  # of model.onnx; from 25 2-bit codes are stored as INT2 and the search's size budget counts them so

    def __post_init__(self):
        finite("--target-ratio", self.target_ratio, low=1.0)
        finite("--qat-epochs", self.qat_epochs, low=0.0)
        finite("--distill", self.distill, low=0.0, high=1.0)
        at_least("--workers", self.workers, 1)
        check_pick(self.pick)
        if self.screening not in SCREENINGS:
            raise HirelcError(f"unknown screening {self.screening!r} (use {', '.join(SCREENINGS)})")
        if self.surrogate_prior not in SURROGATE_PRIORS:
            raise HirelcError(f"unknown surrogate prior {self.surrogate_prior!r} (use {', '.join(SURROGATE_PRIORS)})")
        at_least("--warmup-pool", self.warmup_pool, 0)
        if self.max_size_mb is not None:
            finite("--max-size-mb", self.max_size_mb, low=0.0, strict_low=True)
        if self.max_latency_ms is not None:
            finite("--max-latency-ms", self.max_latency_ms, low=0.0, strict_low=True)
        if self.verify_runs < 1:
            raise HirelcError(f"--runs must be >= 1, got {self.verify_runs}")
        if self.search_preset not in SEARCH_PRESETS:
            raise HirelcError(f"unknown search preset {self.search_preset!r} (use {', '.join(SEARCH_PRESETS)})")
        if self.seed < 0:
            raise HirelcError(f"--seed must be >= 0, got {self.seed}")


@dataclass(frozen=True)
class BenchConfig:
    target_ratio: float = 8.0  # the search budget (effective storage and file bytes)
    max_latency_ms: float | None = None  # optional search budget on ORT batch-8 latency (every searched method)
    fill_budget: bool = False  # every searched method's repair also spends the budget it left (SearchConfig)
    preset: str = "quick"  # search effort, the same for every searched method
    qat_epochs: float = 1.0  # fine-tuning of every lowered artifact
    runs: int = 30  # timed runs per artifact and batch size
    batch_sizes: tuple[int, ...] = (1, 8)
    seed: int = 0
    methods: tuple[str, ...] = METHODS
    search_overrides: dict = field(default_factory=dict)  # SearchConfig fields (tests shrink the search)
    lower_max_steps: int | None = None  # cap on fine-tuning steps (tests)
    targets: tuple[str, ...] = ("ort-cpu",)  # runtimes every artifact is measured on; the first fills the plots

    def __post_init__(self):
        check_targets(self.targets, None, "bench")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise HirelcError(f"unknown bench method(s) {', '.join(unknown)} (use {', '.join(METHODS)})")
        if "prune-int8" in self.methods and "hirelc" not in self.methods:
            raise HirelcError("prune-int8 is sized to hirelc's parameter count: include the hirelc method")
        finite("--target-ratio", self.target_ratio, low=1.0)
        finite("--qat-epochs", self.qat_epochs, low=0.0)
        at_least("--runs", self.runs, 1)
        at_least("--seed", self.seed, 0)
        if self.max_latency_ms is not None:
            finite("--max-latency-ms", self.max_latency_ms, low=0.0, strict_low=True)


@dataclass(frozen=True)
class AblateConfig:
    target_ratio: float = 8.0
    preset: str = "quick"
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)  # five: a paired one-sided test can reach p < 0.05
    variants: tuple[str, ...] = tuple(VARIANTS)
    # fine-tuning of each winner before it is scored. Not 0: the search scores candidates after a short QAT, and a
    # pruned winner scored on calibration alone can collapse (resnet18, 16x: 33 % without, where the search saw 87 %)
    qat_epochs: float = 0.25
    fill_budget: bool = False  # every run's repair also spends the budget a candidate left (SearchConfig)
    latency_budget: bool = True  # every run's winner no slower than ORT int8 of the model (as `hirelc search`)
    search_overrides: dict = field(default_factory=dict)  # SearchConfig fields (tests shrink the search)
    lower_max_steps: int | None = None
    # the variant every other one is paired with in the report (none when it is not among the variants); the
    # runs do not depend on it, so a finished study can be reported against another one (--reuse)
    reference: str = REFERENCE_VARIANT

    def __post_init__(self):
        if self.reference not in VARIANTS:
            raise HirelcError(f"unknown reference variant {self.reference!r} (use {', '.join(VARIANTS)})")
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise HirelcError(f"unknown ablation variant(s) {', '.join(unknown)} (use {', '.join(VARIANTS)})")
        if not self.variants or not self.seeds:
            raise HirelcError("give at least one variant and one seed")
        if EQUAL_TIME in self.variants and REFERENCE_VARIANT not in self.variants:
            raise HirelcError(f"variant {EQUAL_TIME} spends the wall time of variant {REFERENCE_VARIANT}: "
                              f"run them together")
        if len(set(self.seeds)) != len(self.seeds):
            raise HirelcError("seeds must be distinct")
        finite("--target-ratio", self.target_ratio, low=1.0)
        finite("--qat-epochs", self.qat_epochs, low=0.0)
        if min(self.seeds) < 0:
            raise HirelcError(f"--seed must be >= 0, got {min(self.seeds)}")
