"""The ``hirelc`` command line: thin Typer commands that parse options into configs and call one library
function each.

Exit codes: 0 done; 1 the release gate (``verify``) found a bound missed; 2 bad input or an environment problem
(one ``hirelc: error: ...`` line, nothing written); 3 an internal error (a bug in hirelc: one line,
``HIRELC_DEBUG=1`` shows the traceback); 130 interrupted.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
import typer.core
from typer.core import TyperGroup

from hirelc import runs
from hirelc.errors import HirelcError
from hirelc.options import (
    IMPORTANCES,
    METHODS,
    SCREENINGS,
    SEARCH_PRESETS,
    SURROGATE_PRIORS,
    TARGETS,
    VARIANTS,
    AblateConfig,
    BenchConfig,
    CompressConfig,
    DataOptions,
    LowerConfig,
    TrainConfig,
    VerifyConfig,
)

# the click typer parses with (newer typers carry their own copy); its usage errors are caught below
_click_errors = typer.core._click.exceptions if hasattr(typer.core, "_click") else __import__("click").exceptions


def _abort_type() -> type | tuple:
    """The exception click raises on an aborted prompt or input: ``typer.Abort`` (click's own in older typers,
    a class of typer's in newer ones). Resolved once, so an ``except`` never looks up a name that is not there."""
    for mod in (typer, getattr(typer, "exceptions", None), _click_errors):
        found = getattr(mod, "Abort", None)
        if isinstance(found, type) and issubclass(found, BaseException):
            return found
    return ()


_ABORT = _abort_type()


class _OneLineErrors(TyperGroup):
    """Command-line usage errors (an unknown choice, a value of the wrong type) as one ``hirelc: error:`` line
    and exit 2, like every other bad input, instead of a usage panel."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except getattr(_click_errors, "NoArgsIsHelpError", ()) as e:  # `hirelc` alone: the help
            typer.echo(e.format_message())
            sys.exit(e.exit_code)
        except _click_errors.UsageError as e:
            typer.echo(f"hirelc: error: {_first_line(e.format_message()).replace('Value error, ', '')}", err=True)
            sys.exit(EXIT_USER)
        except _ABORT:
            typer.echo("hirelc: aborted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    cls=_OneLineErrors,
    help="hirelc: HiReLC search for joint structured pruning + mixed-precision quantization of timm models, "
    "lowered to physically smaller integer models, exported as QDQ ONNX and verified on ONNX Runtime.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
baseline_app = typer.Typer(help="Artifacts a user would otherwise ship, for side-by-side comparison.",
                           no_args_is_help=True)
app.add_typer(baseline_app, name="baseline")

# Defaults come from the option dataclasses (hirelc.options), so the CLI and the library agree on them.
TRAIN, LOWER, VERIFY, DATA, COMPRESS = TrainConfig(), LowerConfig(), VerifyConfig(), DataOptions(), CompressConfig()
LR_ALSO_HELP = ("Another learning rate the fine-tune also tries from the same calibrated model (repeat for several); "
                "the one ending at the best validation accuracy is kept. Default: "
                + ", ".join(f"{v:g}" for v in LOWER.lr_also) + ".")
BENCH, ABLATE = BenchConfig(), AblateConfig()
ABLATE_SEEDS = ", ".join(str(s) for s in ABLATE.seeds)
SearchPreset = Enum("SearchPreset", {p: p for p in SEARCH_PRESETS}, type=str)
Screening = Enum("Screening", {p: p for p in SCREENINGS}, type=str)
SurrogatePrior = Enum("SurrogatePrior", {p: p for p in SURROGATE_PRIORS}, type=str)
Importance = Enum("Importance", {p: p for p in IMPORTANCES}, type=str)
Method = Enum("Method", {m: m for m in METHODS}, type=str)
Variant = Enum("Variant", {v: v for v in VARIANTS}, type=str)
Target = Enum("Target", {t: t for t in TARGETS}, type=str)
TARGET_HELP = ("Runtime to measure on, repeat for several: ort-cpu (default), ort-cuda, ort-tensorrt (int8, engine "
               "cache in RUN_DIR/trt_cache), openvino (CPU). One this machine cannot run is exit 2, never a "
               "fallback to the CPU.")


def _targets(targets: Optional[list], default: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(Target(t).value for t in targets) if targets else default

RunDir = typer.Option(..., "--run-dir", "-r", help="Run directory: every stage reads and writes its files here.")
DataOpt = typer.Option(DATA.spec, "--data", "-d",
                       help="fashion-mnist | fashion-mnist-mini | digits | ImageFolder dir | .npz file.")
PickOpt = typer.Option(None, "--pick", help="Lower another policy of the search's Pareto front (front.json, "
                       "front.png) instead of its winner: accurate (the most accurate), smallest (fewest predicted "
                       "bytes), fastest (lowest predicted batch-8 latency), or the number of a real evaluation on "
                       "the front.")
DataDirOpt = typer.Option(None, "--data-dir", help="Directory with the Fashion-MNIST IDX files (else "
                          "$HIRELC_FASHION_MNIST_DIR, /usr/share/datasets/fashion-mnist, then the embedded subset).")
ImgOpt = typer.Option(DATA.img_size, "--img-size", help="Input resolution the data is resized to.")
SeedOpt = typer.Option(DATA.seed, "--seed", help="Seed for splits, initialisation and training.")


EXIT_GATE, EXIT_USER, EXIT_INTERNAL, EXIT_INTERRUPTED = 1, 2, 3, 130
RESUME_HINT = "finished stages are kept; rerun with --resume"
RERUN_HINT = "nothing half-written is kept; rerun the command"
CONTINUE_HINT = "the work done is saved; the same command continues it"


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    return lines[0] if lines else ""


@contextlib.contextmanager
def _user_errors(run_dir: Path | None = None, command: str = "", create: bool = False,
                 interrupted: str = RERUN_HINT):
    """Run a command body: hold ``run_dir``'s lock (a second writer is refused), and turn every failure into
    one line on stderr with its exit code (see the module docstring)."""
    try:
        if run_dir is not None and not create and not Path(run_dir).exists():
            raise HirelcError(f"run directory not found: {run_dir}")
        with runs.locked(run_dir, command) if run_dir is not None else contextlib.nullcontext():
            yield
    except HirelcError as e:
        typer.echo(f"hirelc: error: {_first_line(e)}", err=True)
        raise typer.Exit(EXIT_USER) from None
    except KeyboardInterrupt:
        typer.echo(f"hirelc: interrupted ({interrupted})", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except (typer.Exit, typer.Abort):
        raise
    except OSError as e:  # no space left, read-only file system, permissions ...
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        typer.echo(f"hirelc: error: {where}{e.strerror or _first_line(e) or type(e).__name__}", err=True)
        raise typer.Exit(EXIT_USER) from None
    except Exception as e:  # noqa: BLE001 - anything else is a bug: a distinct exit code, never 1 (the gate's)
        if os.environ.get("HIRELC_DEBUG"):
            traceback.print_exc()
        typer.echo(f"hirelc: internal error: {type(e).__name__}: {_first_line(e)[:300]} (a bug in hirelc; "
                   f"HIRELC_DEBUG=1 shows the traceback)", err=True)
        raise typer.Exit(EXIT_INTERNAL) from None


def _echo_json(d: dict, keys: list[str]) -> None:
    typer.echo(json.dumps({k: d[k] for k in keys if k in d}, indent=2, default=str))


@app.command()
def train(
    model: str = typer.Option(COMPRESS.model, "--model", "-m", help="Any timm model name (built with pretrained=False)."),
    data: str = DataOpt,
    run_dir: Path = RunDir,
    epochs: int = typer.Option(TRAIN.epochs, help="Training epochs for the fp32 baseline."),
    batch_size: int = typer.Option(TRAIN.batch_size, help="Batch size."),
    lr: Optional[float] = typer.Option(None, help="AdamW peak learning rate (cosine schedule); default 2e-3 for "
                                       "CNNs, 1e-3 for Vision Transformers."),
    img_size: int = ImgOpt,
    patch_size: Optional[int] = typer.Option(None, help="ViT patch size (default img_size // 4)."),
    in_chans: Optional[int] = typer.Option(None, help="Model input channels (default: the data's)."),
    checkpoint: Optional[Path] = typer.Option(None, help="Load this state_dict (.pt/.safetensors) instead of training."),
    data_dir: Optional[str] = DataDirOpt,
    seed: int = SeedOpt,
    max_train: Optional[int] = typer.Option(None, help="Cap the training split (stratified)."),
):
    """Train the fp32 baseline (or load --checkpoint); a second identical call reuses it, and an interrupted one
    continues where it stopped (the state is saved every 2 minutes and every epoch)."""
    from hirelc.pipeline import train_stage

    with _user_errors(run_dir, "train", create=True, interrupted=CONTINUE_HINT):
        opts = DataOptions(spec=data, data_dir=data_dir, img_size=img_size, seed=seed, max_train=max_train)
        meta = train_stage(run_dir, model, opts, TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed),
                           patch_size=patch_size, in_chans=in_chans, checkpoint=str(checkpoint) if checkpoint else None)
        typer.echo(f"data: {meta['data']['source']}")
        _echo_json(meta, ["val_acc", "test_acc", "params", "train_wall_s", "reused"])


@app.command()
def lower(
    run_dir: Path = RunDir,
    policy: str = typer.Option("policy.json", "--policy", "-p",
                               help="Preset (int8, w6, w4, w4-prune50, w8-prune30, w4-group32, fp32) or policy "
                               "JSON; a relative name is looked up in the run directory first."),
    epochs: float = typer.Option(LOWER.epochs, help="Quantization-aware fine-tuning epochs (fractions allowed)."),
    lr: float = typer.Option(LOWER.lr, help="Fine-tuning learning rate."),
    lr_also: Optional[list[float]] = typer.Option(None, "--lr-also", help=LR_ALSO_HELP),
    single_lr: bool = typer.Option(False, "--single-lr", help="Fine-tune at --lr alone (no other rate tried)."),
    weight_only: bool = typer.Option(False, "--weight-only", help="No activation quantization."),
    act_int8: bool = typer.Option(False, "--act-int8", help="Signed int8 activations instead of uint8."),
    percentile: Optional[float] = typer.Option(None, help="Activation calibration percentile (default min-max)."),
    max_steps: Optional[int] = typer.Option(None, help="Cap fine-tuning steps."),
    distill: float = typer.Option(LOWER.distill, help="Knowledge distillation from the fp32 baseline during "
                                  "fine-tuning: the weight (0-1) of its softened outputs in the loss; 0 trains on "
                                  "the labels alone."),
    importance: Importance = typer.Option(LOWER.importance, help="How channels are ranked for pruning: taylor "
                                          "(loss saliency of each channel on 256 training images) | magnitude "
                                          "(weight norms)."),
    pick: Optional[str] = PickOpt,
):
    """Prune physically, swap in integer-weight layers, fine-tune (QAT) and save lowered.pt + lower_report.json."""
    from hirelc.options import check_pick
    from hirelc.pipeline import lower_stage, pick_policy
    from hirelc.policy import PRESETS

    with _user_errors(run_dir, "lower"):
        check_pick(pick)
        spec = policy
        if pick is not None:
            if policy != "policy.json":
                raise HirelcError("give --policy or --pick, not both")
            spec = pick_policy(run_dir, pick)
            typer.echo(f"picked from the search's front ({pick}): {spec.name}")
        elif spec not in PRESETS and not Path(spec).is_absolute() and (run_dir / spec).exists():
            spec = str(run_dir / spec)
        if single_lr and lr_also:
            raise HirelcError("give --lr-also or --single-lr, not both")
        also = () if single_lr else (tuple(lr_also) if lr_also else LOWER.lr_also)
        cfg = LowerConfig(epochs=epochs, lr=lr, lr_also=also, act_quant=not weight_only, act_signed=act_int8,
                          percentile=percentile, max_steps=max_steps, importance=Importance(importance).value,
                          distill=distill)
        rep = lower_stage(run_dir, spec, cfg)
        typer.echo(json.dumps({
            "accuracy": rep["accuracy"], "params_before": rep["params_before"], "params_after": rep["params_after"],
            "effective_ratio": round(rep["effective_ratio"], 2), "qat_wall_s": rep["qat_wall_s"]}, indent=2))


class WeightFormat(str, Enum):
    fold = "fold"
    plain = "plain"


@app.command()
def export(
    run_dir: Path = RunDir,
    fp32: bool = typer.Option(False, "--fp32", help="Export the float baseline as fp32.onnx instead."),
    weight_only: bool = typer.Option(False, "--weight-only", help="Drop activation Q/DQ from the export."),
    weight_format: WeightFormat = typer.Option(
        WeightFormat.fold, "--weight-format",
        help="fold: 2-8-bit codes stored packed and widened to int8 by nodes ONNX Runtime folds at load time, so "
             "every layer runs on an integer kernel. plain: INT4/UINT4 straight into DequantizeLinear (for "
             "runtimes that dequantize natively; ONNX Runtime CPU runs those layers in float)."),
    opset: Optional[int] = typer.Option(None, "--opset", help="ONNX opset (17..25; 4-bit weights need 21; from "
                                        "25, 2-bit weights are stored as INT2, four per byte, which ONNX Runtime "
                                        "runs but OpenVINO 2026.4 cannot read). Default: the one `hirelc search "
                                        "--opset` budgeted the file at, else 21."),
):
    """Export model.onnx: integer weight initializers -> DequantizeLinear, Q/DQ activations."""
    from hirelc.pipeline import export_stage

    with _user_errors(run_dir, "export"):
        info = export_stage(run_dir, fp32=fp32, weight_only=weight_only, weight_format=weight_format.value,
                            opset=opset)
        typer.echo(json.dumps(info, indent=2, default=str))


@baseline_app.command("ort-int8")
def baseline_ort_int8(run_dir: Path = RunDir,
                      calib_samples: int = typer.Option(256, help="Training images used for calibration."),
                      act_int8: bool = typer.Option(False, "--act-int8", help="Symmetric signed int8 activations "
                                                    "(the form TensorRT takes) instead of uint8.")):
    """ONNX Runtime's own quantize_static (QDQ, per-channel, uint8 activations) of fp32.onnx -> ort_int8.onnx."""
    from hirelc.pipeline import ort_int8_stage

    with _user_errors(run_dir, "baseline ort-int8"):
        info = ort_int8_stage(run_dir, calib_samples, act_int8=act_int8)
        typer.echo(json.dumps(info, indent=2, default=str))


@app.command()
def verify(
    run_dir: Path = RunDir,
    max_drop: Optional[float] = typer.Option(None, help="Gate: max top-1 points below fp32 on ORT."),
    min_size_ratio: Optional[float] = typer.Option(None, help="Gate: min fp32 bytes / hirelc bytes."),
    max_latency_ms: Optional[float] = typer.Option(None, help="Gate: max hirelc batch-1 median latency (ms)."),
    min_parity: float = typer.Option(VERIFY.min_parity, help="Gate: min top-1 agreement (%) of model.onnx on ONNX Runtime "
                                     "with the PyTorch lowered.pt on the test split; 0 turns it off."),
    max_memory_mb: Optional[float] = typer.Option(None, help="Gate: max memory of the hirelc ONNX Runtime session "
                                                  "(resident-set growth in MiB, session + batch 1 and 8 runs)."),
    against: Optional[Path] = typer.Option(None, help="report.json of an earlier release (or its run directory) "
                                           "to gate regressions against; its artifacts need not exist."),
    max_top1_regression: Optional[float] = typer.Option(None, help="Gate (with --against): max top-1 points "
                                                        "below the earlier release."),
    max_latency_regression: Optional[float] = typer.Option(None, help="Gate (with --against): max % slower "
                                                           "than the earlier release, per batch size; compared "
                                                           "only when both were measured on the same CPU."),
    max_size_regression: Optional[float] = typer.Option(None, help="Gate (with --against): max % more bytes "
                                                        "than the earlier release's model.onnx."),
    memory: bool = typer.Option(VERIFY.memory, "--memory/--no-memory", help="Measure each artifact's session memory."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON summary line (for CI logs) instead of "
                                 "the table."),
    runs_: int = typer.Option(VERIFY.runs, "--runs", help="Timed runs per artifact and batch size (after warm-up)."),
    targets: Optional[list[Target]] = typer.Option(None, "--target", help=TARGET_HELP),
    gate_target: Optional[Target] = typer.Option(None, "--gate-target", help="The target whose top-1, parity and "
                                                 "latency the gate bounds apply to (default: the first --target)."),
):
    """Run every artifact on each target (default ONNX Runtime CPU): accuracy, parity, latency (interleaved),
    what really ran, memory, bytes; write report.json/.md; gate on absolute bounds and, with --against, on
    regressions vs an earlier release.

    Refuses (exit 2) artifacts not built from the run directory's current files (content hashes in
    provenance.json) and an --against report of another format version or dataset. Exit 1 with a one-line
    reason when a gate bound is missed; 2 bad input; 3 internal error.
    """
    from hirelc.export import check_gate, format_table
    from hirelc.export.verify import summary_line
    from hirelc.pipeline import verify_stage

    with _user_errors(run_dir, "verify"):
        cfg = VerifyConfig(max_drop=max_drop, min_size_ratio=min_size_ratio, max_latency_ms=max_latency_ms,
                           runs=runs_, min_parity=min_parity or None, max_memory_mb=max_memory_mb, memory=memory,
                           against=str(against) if against else None, max_top1_regression=max_top1_regression,
                           max_latency_regression=max_latency_regression, max_size_regression=max_size_regression,
                           targets=_targets(targets, VERIFY.targets),
                           gate_target=Target(gate_target).value if gate_target else None)
        report = verify_stage(run_dir, cfg)
        typer.echo(json.dumps(runs.strict(summary_line(report))) if as_json else format_table(report))
        failures = check_gate(report, cfg)
    if failures:
        typer.echo(f"hirelc: gate failed: {failures[0]}", err=True)
        raise typer.Exit(EXIT_GATE)


WorkersOpt = typer.Option(COMPRESS.workers, "--workers", help="Run each search phase's real evaluations as tasks on a "
                          "local Ray instance with this many CPUs (pip install -e \".[ray]\"); 1: in process, no "
                          "Ray. The same seed gives the same policy for any number.")
RayAddressOpt = typer.Option(None, "--ray-address", help="Run the search's real evaluations on the Ray cluster at "
                             "this address (host:port, or auto); hirelc must be installed on every node.")
NoLatencyOpt = typer.Option(False, "--no-latency-budget", help="Without --max-latency-ms, do not require the "
                            "artifact to be as fast as ONNX Runtime's own int8 of the model (batch 8).")


OpsetOpt = typer.Option(21, "--opset", help="ONNX opset model.onnx is exported at (17..25). From 25, 2-bit weights "
                        "are stored as INT2, four per byte, and the size budget counts them so (ONNX Runtime runs "
                        "such a file; OpenVINO 2026.4 cannot read it).")
ScreeningOpt = typer.Option("surrogate", help="What ranks each search cycle's candidates for the real "
                            "evaluations: the surrogate's prediction, or the cold-start proxy mapped to accuracy by "
                            "a line fitted to the real results (the surrogate still shapes the agents' rewards; "
                            "`hirelc ablate` compares the two).")


SurrogatePriorOpt = typer.Option("none", help="What the search's surrogate learns from its few real results: "
                                 "accuracy from the policy alone (none), or a correction to the cold-start proxy "
                                 "mapped to accuracy by a line through those results (proxy; `hirelc ablate "
                                 "--variant proxy-prior` compares the two).")


WarmupPoolOpt = typer.Option(None, min=0, help="Warm-up screening: the search's warm-up really evaluates the "
                             "random policies the cold-start proxy ranks best among this many (each costs ~0.15 s to "
                             "score on resnet18, ~2 s on deit_tiny at 224 px; a real evaluation costs more); 0: "
                             "random policies as drawn. Default: the preset's (quick: 64, standard and thorough: 0).")


def search_overrides(fill_budget: bool, screening: str, surrogate_prior: str = "none",
                     warmup_pool: int | None = None) -> dict | None:
    """The SearchConfig fields `hirelc search` changes from the preset's (None: none); defaults are left out, so
    a run searched before an option existed still matches its record."""
    out = {"fill_budget": True} if fill_budget else {}
    if screening != "surrogate":
        out["screening"] = screening
    if surrogate_prior != "none":
        out["surrogate_prior"] = surrogate_prior
    if warmup_pool is not None:
        out["warmup_pool"] = warmup_pool
    return out or None


@app.command()
def search(
    run_dir: Path = RunDir,
    target_ratio: Optional[float] = typer.Option(COMPRESS.target_ratio, help="Compression the policy must reach, "
                                                 "both in effective weight storage and in exported file bytes vs "
                                                 "fp32.onnx."),
    preset: SearchPreset = typer.Option(COMPRESS.search_preset, help="Search effort."),
    max_size_mb: Optional[float] = typer.Option(None, help="Budget on the exported ONNX file (MB, 1e6 bytes)."),
    max_latency_ms: Optional[float] = typer.Option(None, help="Budget on ONNX Runtime batch-8 latency (ms), "
                                                   "predicted from a per-layer table measured once per model. "
                                                   "Default: ONNX Runtime's own int8 of the model, timed here."),
    no_latency_budget: bool = NoLatencyOpt,
    seed: int = SeedOpt,
    resume: bool = typer.Option(False, "--resume", help="Continue from search_state.pt after an interruption."),
    fill_budget: bool = typer.Option(False, "--fill-budget", help="After repairing a candidate into the budget, "
                                     "give the most sensitive layers back bits / channels while it still fits."),
    screening: Screening = ScreeningOpt,
    surrogate_prior: SurrogatePrior = SurrogatePriorOpt,
    warmup_pool: Optional[int] = WarmupPoolOpt,
    workers: int = WorkersOpt,
    ray_address: Optional[str] = RayAddressOpt,
    opset: int = OpsetOpt,
):
    """Run the HiReLC search (Fisher sensitivity, hierarchical ensemble agents, surrogate active learning).

    Writes policy.json (the winner: the most accurate real evaluation within the budget), search.jsonl (one line
    per real evaluation), search.json, front.json + front.png (the Pareto front of accuracy, predicted bytes and
    predicted batch-8 latency over the real evaluations within the budget, each with its predicted batch-1
    latency beside; `hirelc lower --pick` takes another of its policies) and PNG plots.
    """
    from hirelc.pipeline import search_stage

    with _user_errors(run_dir, "search", interrupted=RESUME_HINT):
        s = search_stage(run_dir, target_ratio=target_ratio, preset=SearchPreset(preset).value, max_size_mb=max_size_mb,
                         max_latency_ms=max_latency_ms, seed=seed, resume=resume,
                         overrides=search_overrides(fill_budget, Screening(screening).value,
                                                    SurrogatePrior(surrogate_prior).value, warmup_pool),
                         latency_budget=not no_latency_budget, echo=typer.echo, workers=workers,
                         ray_address=ray_address, opset=opset)
        _echo_json(s, ["best_acc", "effective_ratio", "predicted_bytes", "predicted_file_ratio",
                       "predicted_latency_ms_b8", "n_real_evals",
                       "wall_s", "surrogate_spearman"])
        from hirelc.pipeline import load_front
        from hirelc.search.front import format_front

        typer.echo(format_front(load_front(run_dir)))


@app.command()
def compress(
    run_dir: Path = typer.Option(Path(COMPRESS.run_dir), "--run-dir", "-r", help="Run directory for every stage."),
    model: str = typer.Option(COMPRESS.model, "--model", "-m", help="timm model name."),
    data: str = typer.Option(COMPRESS.data.spec, "--data", "-d", help="Dataset spec (see `hirelc train --help`)."),
    data_dir: Optional[str] = DataDirOpt,
    img_size: int = ImgOpt,
    epochs: int = typer.Option(COMPRESS.train_epochs, help="Baseline training epochs."),
    policy: Optional[str] = typer.Option(None, "--policy", "-p", help="Use this preset/policy file instead of "
                                         "searching."),
    target_ratio: float = typer.Option(COMPRESS.target_ratio, help="Search budget: compression in effective "
                                       "storage and file bytes."),
    preset: SearchPreset = typer.Option(COMPRESS.search_preset, help="Search effort."),
    max_size_mb: Optional[float] = typer.Option(None, help="Search budget: ONNX file size (MB)."),
    max_latency_ms: Optional[float] = typer.Option(None, help="Search budget: ORT batch-8 latency (ms). Default: "
                                                   "ONNX Runtime's own int8 of the model, timed here."),
    no_latency_budget: bool = NoLatencyOpt,
    qat_epochs: float = typer.Option(COMPRESS.qat_epochs, help="Fine-tuning epochs of the final policy."),
    distill: float = typer.Option(COMPRESS.distill, help="Weight (0-1) of the fp32 baseline's softened outputs in "
                                  "the final fine-tune's loss (knowledge distillation); 0: labels alone."),
    runs_: int = typer.Option(COMPRESS.verify_runs, "--runs", help="Timed runs per artifact in verify."),
    seed: int = SeedOpt,
    resume: bool = typer.Option(False, "--resume", help="Continue this run directory: skip the stages whose "
                                "outputs are current (same options, built from the current files), rerun the rest."),
    workers: int = WorkersOpt,
    ray_address: Optional[str] = RayAddressOpt,
    pick: Optional[str] = PickOpt,
    screening: Screening = ScreeningOpt,
    surrogate_prior: SurrogatePrior = SurrogatePriorOpt,
    warmup_pool: Optional[int] = WarmupPoolOpt,
    opset: int = OpsetOpt,
):
    """The main job: train -> search (or --policy) -> lower + QAT -> export -> ort-int8 -> verify.

    With no arguments: resnet18 on the embedded Fashion-MNIST subset into ./hirelc-run. Exit codes: 0 done,
    2 bad input (one line, nothing written), 3 internal error, 130 interrupted.
    """
    from hirelc.export import format_table
    from hirelc.pipeline import compress as run_compress

    with _user_errors(run_dir, "compress", create=True, interrupted=RESUME_HINT):
        cfg = CompressConfig(run_dir=str(run_dir), model=model, data=DataOptions(spec=data, data_dir=data_dir,
                             img_size=img_size, seed=seed), train_epochs=epochs, policy=policy,
                             target_ratio=target_ratio, search_preset=SearchPreset(preset).value, max_size_mb=max_size_mb,
                             max_latency_ms=max_latency_ms, latency_budget=not no_latency_budget,
                             qat_epochs=qat_epochs, distill=distill, verify_runs=runs_, resume=resume, seed=seed,
                             workers=workers, ray_address=ray_address, pick=pick,
                             screening=Screening(screening).value,
                             surrogate_prior=SurrogatePrior(surrogate_prior).value, warmup_pool=warmup_pool,
                             opset=opset)
        report = run_compress(cfg, echo=typer.echo)
        typer.echo(format_table(report))
        typer.echo(f"artifacts and report in {run_dir}/ (report.md, report.json, model.onnx)")


@app.command()
def bench(
    run_dir: Path = RunDir,
    target_ratio: float = typer.Option(BENCH.target_ratio, help="Search budget of the searched methods (storage "
                                       "and file bytes)."),
    max_latency_ms: Optional[float] = typer.Option(None, help="Also a latency budget for every searched method: "
                                                   "ORT batch-8 latency (ms), as in `hirelc search`."),
    fill_budget: bool = typer.Option(False, "--fill-budget", help="Every searched method's repair also spends "
                                     "the budget a candidate left, as in `hirelc search --fill-budget`."),
    preset: SearchPreset = typer.Option(BENCH.preset, help="Search effort of every searched method."),
    qat_epochs: float = typer.Option(BENCH.qat_epochs, help="Fine-tuning epochs of every lowered artifact."),
    runs: int = typer.Option(BENCH.runs, help="Timed runs per artifact and batch size (interleaved)."),
    methods: Optional[list[Method]] = typer.Option(None, "--method", help="A method to build and measure; repeat "
                                                   "for several (default: all)."),
    out: Optional[Path] = typer.Option(None, help="Output folder (default: RUN_DIR/bench); must not hold a "
                                       "finished comparison. An interrupted one resumes."),
    seed: int = SeedOpt,
    targets: Optional[list[Target]] = typer.Option(None, "--target", help=TARGET_HELP + " The first fills the "
                                                   "main table and the plots."),
):
    """Compare hirelc with fp32, ORT int8, uniform int4/int8, uniform pruning + int8, random search and a flat
    single-agent search on one budget: ORT accuracy, bytes, latency b1/b8 -> bench.json, bench.md, plots.

    Needs a trained baseline in RUN_DIR (`hirelc train`). Every artifact goes to its own folder under --out.
    """
    from hirelc.studies.bench import bench as run_bench
    from hirelc.studies.bench import format_bench

    with _user_errors(run_dir, "bench", interrupted=CONTINUE_HINT):
        cfg = BenchConfig(target_ratio=target_ratio, max_latency_ms=max_latency_ms, fill_budget=fill_budget,
                          preset=SearchPreset(preset).value, qat_epochs=qat_epochs, runs=runs, seed=seed,
                          methods=tuple(Method(m).value for m in methods) if methods else BENCH.methods,
                          targets=_targets(targets, BENCH.targets))
        report = run_bench(run_dir, cfg, out_dir=out, echo=typer.echo)
        typer.echo(format_bench(report))


@app.command()
def ablate(
    run_dir: Path = RunDir,
    seeds: Optional[list[int]] = typer.Option(None, "--seed", help=f"A search seed; repeat for several (default: "
                                              f"{ABLATE_SEEDS}). Every variant runs once per seed."),
    variants: Optional[list[Variant]] = typer.Option(None, "--variant", help="A variant of the search to run; "
                                                     "repeat for several (default: all)."),
    target_ratio: float = typer.Option(ABLATE.target_ratio, help="Search budget (effective storage and file "
                                       "bytes)."),
    preset: SearchPreset = typer.Option(ABLATE.preset, help="Search effort of every run."),
    qat_epochs: float = typer.Option(ABLATE.qat_epochs, help="Fine-tuning epochs of each run's winner before it is scored on ORT "
                                     "(0: calibration only, which pruned winners may not survive)."),
    fill_budget: bool = typer.Option(False, "--fill-budget", help="Every run's repair also spends the budget a "
                                     "candidate left, as in `hirelc search --fill-budget`."),
    no_latency_budget: bool = NoLatencyOpt,
    out: Optional[Path] = typer.Option(None, help="Output folder (default: RUN_DIR/ablation); must not hold a "
                                       "finished ablation. An interrupted one resumes."),
    reuse: Optional[list[Path]] = typer.Option(None, "--reuse", help="An earlier ablation.json (or its folder) of "
                                               "this study, made on this baseline with these options on a "
                                               "machine of this kind: its runs are taken as they are instead of "
                                               "run again (a study split over sessions or machines); repeat for "
                                               "several."),
    reference: Variant = typer.Option(ABLATE.reference, help="The variant every other one is paired with "
                                      "(mean difference, Wilcoxon p). The runs do not depend on it: report a "
                                      "finished study against another variant with --reuse ITS_ABLATION.json "
                                      "--out NEW_FOLDER --reference VARIANT."),
):
    """What each part of the search buys, and whether it beats the baselines: the full search against no surrogate,
    uniform (not Fisher-guided) sensitivity, a single agent per level, random search (at equal real evaluations,
    and random-time at the full search's wall time), a flat single-agent search, the proxy ranking each cycle's
    candidates instead of the surrogate (proxy-screen; proxy-screen-pool: among random policies too), a warm-up of
    the proxy's best of 64 random policies (screened-warmup, what quick does) or of random policies as drawn
    (plain-warmup), random search screened the same way (random-screened) and the uniform policy meeting the
    budget, over several seeds (run seed by seed; an interrupted study resumes)
    -> ablation.json/.md with mean ± std and paired Wilcoxon signed-rank tests against the full search (or
    --reference), ablation.png, and
    surrogate_scatter.png (predicted vs real accuracy, Spearman, beside the proxy's on the same points).

    Needs a trained baseline in RUN_DIR (`hirelc train`). Each winner is lowered, exported and scored on ORT.
    """
    from hirelc.studies.ablate import ablate as run_ablate
    from hirelc.studies.ablate import format_ablation

    with _user_errors(run_dir, "ablate", interrupted=CONTINUE_HINT):
        cfg = AblateConfig(target_ratio=target_ratio, preset=SearchPreset(preset).value, qat_epochs=qat_epochs,
                           fill_budget=fill_budget, latency_budget=not no_latency_budget,
                           seeds=tuple(seeds) if seeds else ABLATE.seeds,
                           variants=tuple(Variant(v).value for v in variants) if variants else ABLATE.variants,
                           reference=Variant(reference).value)
        report = run_ablate(run_dir, cfg, out_dir=out, echo=typer.echo, reuse=reuse or ())
        typer.echo(format_ablation(report))


@app.command()
def results(
    reports: list[Path] = typer.Argument(..., help="bench.json / ablation.json files, or the folders holding "
                                         "them (`hirelc bench` / `hirelc ablate` outputs), in the order to show."),
    readme: Optional[Path] = typer.Option(None, help="Write the section into this Markdown file, between the "
                                          "lines <!-- hirelc-results:start --> and <!-- hirelc-results:end --> "
                                          "(appended with them when absent)."),
    plots: Optional[Path] = typer.Option(None, help="Keep each report, its Markdown and its PNG plots in a "
                                         "folder of its own under this one (MODEL-KIND) and show the plots in "
                                         "the section (with --readme: linked relative to it); the section can "
                                         "later be rebuilt from those folders alone."),
    compact: bool = typer.Option(False, "--compact", help="A short section instead: per report one line (model, "
                                 "budget, date, command) and a small table (a study's mean ± std, paired "
                                 "differences and p-values; a comparison's top-1, bytes and latencies); for a "
                                 "README that links to the full tables."),
):
    """The results section of the README from finished comparisons and ablations: the exact command of each,
    date, machine, the tables, and the goal figures checked against what was measured (met / not met)."""
    from hirelc.studies.results import compact_section, copy_plots, results_section, write_into

    with _user_errors():
        reports = list(reports)
        if compact and plots is not None:
            raise HirelcError("--plots goes with the full section: the --compact one shows no plots")
        figures = None
        if plots is not None:
            figures = copy_plots(reports, plots, readme.parent if readme is not None else Path.cwd())
        section = compact_section(reports) if compact else results_section(reports, plots=figures)
        if readme is None:
            typer.echo(section)
        else:
            typer.echo(f"results section written into {write_into(readme, section)}")


@app.command()
def inspect(
    model: str = typer.Option(COMPRESS.model, "--model", "-m", help="timm model name."),
    img_size: int = ImgOpt,
    in_chans: int = typer.Option(1, help="Input channels."),
    num_classes: int = typer.Option(10, help="Classes."),
    patch_size: Optional[int] = typer.Option(None, help="ViT patch size."),
    as_json: bool = typer.Option(False, "--json", help="Print the LayerSpecs as JSON."),
):
    """Show the layers, blocks and prune groups the search sees for a model."""
    from hirelc.models import build_model, model_config
    from hirelc.topology import build_topology, topology_summary

    with _user_errors():
        cfg = model_config(model, num_classes, in_chans, img_size, patch_size)
        topo = build_topology(build_model(cfg), (1, in_chans, img_size, img_size))
        if as_json:
            typer.echo(json.dumps(topo.to_dict(), indent=2))
            return
        typer.echo(f"{'layer':<34} {'kind':<10} {'in':>5} {'out':>5} {'params':>9} {'MACs':>11} {'block':<12} group")
        for s in topo.layers:
            g = f"{s.prune_group}{'*' if s.prunable else ''}" if s.prune_group >= 0 else "-"
            typer.echo(f"{s.name:<34} {s.kind:<10} {s.in_features:>5} {s.out_features:>5} {s.params:>9} "
                       f"{s.macs:>11} {s.block:<12} {g}")
        typer.echo(json.dumps(topology_summary(topo)))


@app.command()
def presets():
    """List the named policy presets."""
    from hirelc.policy import PRESETS

    for name, p in PRESETS.items():
        typer.echo(f"{name:<12} {json.dumps(p.default.to_dict())}")


def main() -> None:
    try:
        app()
    except HirelcError as e:  # raised outside a command body (should not happen, but never show a traceback)
        typer.echo(f"hirelc: error: {_first_line(e)}", err=True)
        sys.exit(EXIT_USER)
