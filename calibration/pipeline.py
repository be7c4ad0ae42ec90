"""`vllm-spon calibrate`: the offline calibration pipeline, as a list of clear steps.

    1. check the arguments, the model and the output (writable, room, nothing of the user's at risk), then
       load the model and the calibration text (clear errors, nothing written yet)
    2. allocate per-module sparsity (uniform, or TEAL's greedy per-block search: per projection or per input)
    3. fit thresholds (TEAL statistics, refitted on the sparse model's own activations)
    4. train SPON vectors by KL distillation against the dense model, fuse them into biases,
       and refit thresholds with the biases in place so the achieved sparsity stays on target
    5. on windows of the calibration text held out of training, zero the biases of layer groups where they
       hurt (site_choice), refit the thresholds again, and fall back to plain TEAL (its own thresholds, no
       biases: a method teal checkpoint) if SPON is still no better than TEAL there
    6. measure achieved sparsity and held-out perplexity (dense / TEAL / SPON on the same windows)
    7. refuse a SPON result clearly worse than TEAL on held-out text, else write the checkpoint atomically
"""

import functools
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from vllm_spon import __version__
from vllm_spon.calibration.data import (
    DEFAULT_CALIBRATION_DATA,
    DEFAULT_EVAL_DATA,
    DataError,
    load_text,
    same_source,
    token_windows,
)
from vllm_spon.calibration.devices import Device, resolve_device
from vllm_spon.calibration.evaluate import compare_methods, measure_sparsity, perplexity
from vllm_spon.calibration.site_choice import choose_sites
from vllm_spon.calibration.sparse_model import SparseModel, load_hf_model, load_tokenizer
from vllm_spon.calibration.spon_training import Precision, TrainConfig, TrainingError, train_spon
from vllm_spon.calibration.thresholds import (
    MAX_MODULE_SPARSITY,
    dense_thresholds,
    fit_thresholds,
    greedy_allocation,
)
from vllm_spon.format.checkpoint import check_output, now_iso, write_checkpoint
from vllm_spon.format.identity import base_model_ref, model_family
from vllm_spon.format.schema import (
    FORMAT_VERSION,
    Allocation,
    BiasSpace,
    CalibrationInfo,
    Layout,
    Method,
    PerplexityReport,
    Projections,
    Quantization,
    SponConfig,
    ThresholdStats,
)

logger = logging.getLogger("vllm_spon.calibration")


# SPON is refused when its held-out perplexity exceeds TEAL's by more than this factor: training made the
# sparse model clearly worse than no training at all (a 25% run, the worst measured, is 1.8% worse).
HELD_OUT_TOLERANCE = 1.10


class CalibrationArgs(BaseModel):
    """Everything `calibrate` needs; validated before any work starts. Field descriptions and defaults are
    the CLI's help text (vllm_spon/cli.py builds the options from them)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: Path = Field(description="Hugging Face model directory (safetensors) of a supported family (README)")
    output: Path = Field(description="checkpoint directory to write (never inside or around the model directory)")
    sparsity: float = Field(description="target fraction of linear inputs zeroed, in (0, 1)")
    data: str = Field(default=DEFAULT_CALIBRATION_DATA,
                      description="calibration text: path, builtin:NAME, python-docs or hf:NAME[:CONFIG[:SPLIT]]")
    method: Method = Field(default="spon",
                                            description="spon: thresholds + trained biases; teal: thresholds only")
    # greedy-input measured as accurate as TEAL's per-projection search at 50% on the example model, without
    # per-segment thresholds on fused layers, and far better than uniform (benchmarks/RESULTS.md, "Accuracy").
    allocation: Allocation = Field(
        default="greedy-input", description="per-module sparsity. greedy-input: TEAL's greedy per-block search with "
        "the projections that read one input (q/k/v, gate/up) moving together, so each fused vLLM layer keeps one "
        "threshold; greedy: the same search with every projection alone (TEAL's own); uniform: the same everywhere "
        f"(the greedy searches reach --sparsity up to {MAX_MODULE_SPARSITY})")
    threshold_stats: ThresholdStats = Field(
        default="sequential", description="fit thresholds on dense activations, or refit on the sparse model's own")
    projections: Projections | None = Field(
        default=None, description="comma-separated projections of every block to sparsify",
        json_schema_extra={"cli_default": "every projection of the model's family"})
    num_tokens: int = Field(default=8192, gt=0, description="tokens for threshold statistics")
    window: int = Field(default=256, ge=16, description="tokens per calibration and training window")
    # The training defaults are TrainConfig's (one place to change them).
    steps: int = Field(default=TrainConfig.steps, ge=0, description="SPON training steps")
    lr: float = Field(default=TrainConfig.lr, gt=0, allow_inf_nan=False,
                      description="SPON training learning rate (Adam)")
    windows_per_step: int = Field(default=TrainConfig.windows_per_step, gt=0,
                                  description="windows per SPON training step")
    refit_rounds: int = Field(
        default=1, ge=1, description="SPON training split into this many equal rounds, the thresholds refitted "
        "with the biases in place after each, so later rounds train against (nearly) the thresholds served "
        "(1: one refit, after training; each extra round costs a refit, one statistics pass, about 20 s for the "
        "example model on 2 CPU cores; measured no better on held-out text, benchmarks/RESULTS.md)")
    hidden_weight: float = Field(
        default=0.0, ge=0, allow_inf_nan=False, description="weight of a hidden-state term added to the KL "
        "loss: normalised MSE between the sparse and dense residual stream after every layer (0: logits only)")
    vector_decay: float = Field(
        default=0.0, ge=0, allow_inf_nan=False, description="weight of an L2 penalty on the SPON vectors added to "
        "the loss: this times the sum of their squared norms, pulling them toward zero (plain TEAL) (0: none)")
    check_windows: int = Field(
        default=8, ge=0, description="windows at the end of --data held out of SPON training, on which the "
        "biases of layers where they hurt are dropped and plain TEAL is kept if SPON does not beat it (0: keep "
        "every bias)")
    # Output space measured better on the example model (54% vs 44% of the gap at 50%, benchmarks/RESULTS.md).
    bias_space: BiasSpace = Field(
        default="output", description="where SPON vectors train before fusion into the bias")
    train_precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto", description="training precision; auto: bf16 autocast where the hardware has fast bf16")
    quantization: Quantization = Field(
        default="none", description="round the student's weights as `vllm serve --dtype bfloat16 --quantization "
        "Q` will (fp8: per tensor; fp8_per_channel), so the biases also compensate the rounding; the teacher "
        "stays unquantized")
    layout: Layout = Field(
        default="full", description="full: copy the base model; overlay: spon/ plus links to the base model's files")
    eval_data: str | None = Field(default=DEFAULT_EVAL_DATA,
                                  description="held-out text for the perplexity check recorded in the checkpoint")
    eval_windows: int = Field(default=8, ge=1, description="held-out windows")
    eval_window: int = Field(default=512, ge=16, description="tokens per held-out window")
    seed: int = Field(default=0, description="seed for statistics sampling and training order")
    device: Device = Field(default="auto", description="auto (a GPU if any), cpu, cuda or cuda:N")
    overwrite: bool = Field(default=False, description="replace a previous vllm-spon checkpoint at --output "
                                                        "(nothing else is ever replaced)")

    @field_validator("sparsity")
    @classmethod
    def _open_unit_interval(cls, v: float) -> float:
        if not 0 < v < 1:
            raise ValueError(f"--sparsity must be strictly between 0 and 1 (a fraction, e.g. 0.5), got {v}")
        return v

    @model_validator(mode="after")
    def _held_out_text_is_not_the_calibration_text(self) -> "CalibrationArgs":
        if self.eval_data is not None and same_source(self.data, self.eval_data):
            raise ValueError(f"--eval-data {self.eval_data} is the calibration text (--data): its held-out check "
                             "would read training tokens; give another --eval-data, or --no-eval")
        return self

    @model_validator(mode="after")
    def _reachable_by_the_allocation(self) -> "CalibrationArgs":
        if self.allocation != "uniform" and self.sparsity > MAX_MODULE_SPARSITY:
            raise ValueError(f"--allocation {self.allocation} reaches --sparsity up to {MAX_MODULE_SPARSITY} (no "
                             f"module beyond it), got {self.sparsity}; use --allocation uniform")
        return self

    def resolved_precision(self) -> Precision:
        """bf16 autocast where the hardware has fast bf16 (GPUs, CPUs with AVX512-BF16 or AMX)."""
        if self.train_precision != "auto":
            return self.train_precision
        return "bf16" if resolve_device(self.device) != "cpu" or cpu_has_fast_bf16() else "fp32"


def cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def check_held_out(report: PerplexityReport, lr: float, steps: int) -> None:
    """Refuse a SPON result clearly worse than TEAL on held-out text: training hurt, nothing is written."""
    if report.spon > report.teal * HELD_OUT_TOLERANCE:
        raise TrainingError(
            f"SPON made held-out perplexity worse than TEAL ({report.spon:.4g} against {report.teal:.4g} on "
            f"{report.data}); lower --lr (now {lr:g}) or raise --steps (now {steps}), or use --method teal. "
            "Nothing was written."
        )


def refit_with_biases(sparse: SparseModel, stats_windows: torch.Tensor, module_sparsity: dict[str, float],
                      dense: dict[str, float], args: CalibrationArgs) -> dict[str, float]:
    """Refit the thresholds with the biases (trained vectors or fused) in place: they move activations a
    little, and one pass on the model's own activations brings the sparsity back on target. `dense`: the
    first fit's dense-pass thresholds (the same for every refit)."""
    return fit_thresholds(sparse, stats_windows, module_sparsity, stats=args.threshold_stats,
                          mode_for_refine="spon", refine_passes=1, seed=args.seed, log=logger.info, dense=dense)


def keep_helpful_biases(sparse: SparseModel, check_windows: torch.Tensor, teal_thresholds: dict[str, float],
                        thresholds: dict[str, float], refit: Callable[[], dict[str, float]]
                        ) -> tuple[dict[str, float], Method]:
    """Drop the biases of layers where they hurt on the check windows and refit the thresholds with the rest
    (so SPON stays at the target sparsity, `refit`): (thresholds, "spon"). When SPON is still no better than
    TEAL on the check, the biases are cleared and the checkpoint is plain TEAL: (`teal_thresholds`, "teal")."""
    trained = dict(sparse.fused_biases)
    choice = choose_sites(sparse, check_windows, teal_thresholds, thresholds, log=logger.info)
    chosen = choice.spon
    if choice.dropped_layers and choice.keeps_any:
        # Zeroed biases move later layers' inputs: refit as after training, from the same statistics. The
        # choice was made before this refit, at a sparsity a little off target; at the target it may no longer
        # beat every bias (measured at 50%: 60.54 before the refit, 61.86 after, 60.90 with every bias).
        refitted = refit()
        after_refit = perplexity(sparse, check_windows, "spon")
        logger.info(f"check perplexity after the refit: SPON (chosen) {after_refit:.3f}, SPON (every bias) "
                    f"{choice.spon:.3f}, TEAL {choice.teal:.3f}")
        if after_refit < choice.spon:
            thresholds, chosen = refitted, after_refit
        else:
            logger.info("keeping every bias: dropping layers no longer helps at the target sparsity")
            sparse.fused_biases = trained
            sparse.set_thresholds(thresholds)
    if not choice.keeps_any or chosen >= choice.teal:
        logger.info(f"SPON ({chosen:.3f}) is no better than TEAL ({choice.teal:.3f}) on the {len(check_windows)} "
                    "check windows: writing plain TEAL (its own thresholds, no biases)")
        sparse.fused_biases = {}
        sparse.set_thresholds(teal_thresholds)
        return teal_thresholds, "teal"
    return thresholds, "spon"


def calibrate(args: CalibrationArgs) -> Path:
    """Run the pipeline and write the checkpoint at `args.output`; returns its path."""
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    base = base_model_ref(args.model)  # also checks the model directory before any heavy work
    model_family(args.model).check_projections(args.projections)
    check_output(args.output, args.model, args.layout, args.overwrite)
    tokenizer = load_tokenizer(args.model)
    # Training samples windows from the whole text but its last `check_windows` (the per-layer choice's check);
    # statistics use the first `num_tokens` of it.
    all_windows = token_windows(tokenizer, load_text(args.data), args.window, None, source=f"--data {args.data}")
    check = args.check_windows if args.method == "spon" else 0
    num_windows = max(1, args.num_tokens // args.window)
    needed = max(num_windows, args.windows_per_step if args.method == "spon" else 0)
    if len(all_windows) - check < needed:
        raise DataError(
            f"--data {args.data} has {len(all_windows)} windows of {args.window} tokens, too few for {needed} "
            f"(--num-tokens {args.num_tokens}, --windows-per-step {args.windows_per_step}) plus {check} held out "
            "(--check-windows); give more text or lower --num-tokens, --windows-per-step or --check-windows"
        )
    train_windows, check_windows = all_windows[:len(all_windows) - check], all_windows[len(all_windows) - check:]
    stats_windows = train_windows[:num_windows]
    eval_windows = (token_windows(tokenizer, load_text(args.eval_data), args.eval_window, args.eval_windows,
                                  source=f"--eval-data {args.eval_data}") if args.eval_data else None)
    sparse = SparseModel(load_hf_model(args.model, device=resolve_device(args.device)), args.projections)
    sparse.quantize(args.quantization)  # thresholds are fitted on the activations of the model as served

    if args.allocation != "uniform":
        per_input = args.allocation == "greedy-input"
        module_sparsity = greedy_allocation(sparse, stats_windows, args.sparsity, per_input=per_input, seed=args.seed,
                                            log=logger.info)
    else:
        module_sparsity = dict.fromkeys(sparse.linears, args.sparsity)
    dense = dense_thresholds(sparse, stats_windows, module_sparsity, seed=args.seed)  # reused by every refit
    thresholds = fit_thresholds(sparse, stats_windows, module_sparsity, stats=args.threshold_stats,
                                seed=args.seed, log=logger.info, dense=dense)
    teal_thresholds = dict(thresholds)  # TEAL's own: the baseline SPON is measured against
    refit = functools.partial(refit_with_biases, sparse, stats_windows, module_sparsity, dense, args)

    if args.method == "spon":
        # Dense statistics do not depend on the biases: only sequential ones are refitted.
        sequential = args.threshold_stats == "sequential"
        train_spon(sparse, train_windows,
                   TrainConfig(args.steps, args.lr, args.windows_per_step, args.bias_space, args.seed,
                               precision=args.resolved_precision(), hidden_weight=args.hidden_weight,
                               rounds=args.refit_rounds, vector_decay=args.vector_decay),
                   log=logger.info, between_rounds=refit if sequential else None)
        sparse.fuse_vectors()
        if sequential:
            thresholds = refit()
    method: Method = args.method
    if method == "spon" and check:
        thresholds, method = keep_helpful_biases(sparse, check_windows, teal_thresholds, thresholds, refit)
    mode = "spon" if method == "spon" else "teal"
    achieved, per_module = measure_sparsity(sparse, stats_windows, mode)
    report = None
    if eval_windows is not None:
        report = compare_methods(sparse, eval_windows, args.eval_data, teal_thresholds, thresholds, mode)
        logger.info(f"held-out perplexity ({args.eval_data}): dense {report.dense:.2f}, TEAL {report.teal:.2f} "
                    f"(sparsity {report.teal_sparsity:.3f}), {mode.upper()} {report.spon:.2f} (sparsity "
                    f"{report.spon_sparsity:.3f}); gap recovered: "
                    + (f"{report.gap_recovered:.0%}" if report.gap_recovered is not None else report.gap_note()))
        if method == "spon":
            check_held_out(report, args.lr, args.steps)

    config = SponConfig(
        format_version=FORMAT_VERSION,
        layout=args.layout,
        base_model=base,
        method=method,
        bias_space=args.bias_space if method == "spon" else None,
        target_sparsity=args.sparsity,
        achieved_sparsity=achieved,
        projections=sparse.projections,
        thresholds=thresholds,
        teal_thresholds=teal_thresholds,
        module_sparsity=per_module,
        calibration=CalibrationInfo(
            data=args.data, num_tokens=stats_windows.numel(), window=args.window,
            threshold_stats=args.threshold_stats, allocation=args.allocation,
            steps=args.steps if args.method == "spon" else 0, lr=args.lr,
            tokens_per_step=args.windows_per_step * args.window, seed=args.seed, quantization=args.quantization,
            seconds=round(time.perf_counter() - start, 1),
        ),
        perplexity=report,
        created_at=now_iso(),
        vllm_spon_version=__version__,
    )
    write_checkpoint(args.output, args.model, config, thresholds, sparse.fused_biases, overwrite=args.overwrite)
    logger.info(f"wrote {args.layout} checkpoint {args.output} in {time.perf_counter() - start:.0f} s "
                f"(achieved sparsity {achieved:.3f} on calibration tokens)")
    return args.output
