"""Perplexity of the dense, TEAL and SPON variants of one model on the same token windows.

`compare_methods` is the one measurement behind calibration's held-out check, `vllm-spon eval`, its plot and
the accuracy benchmark: TEAL runs with its own thresholds (fitted for it), SPON with its thresholds and fused
biases, and the fraction of the gap recovered is reported only at matched sparsity. Where the two zero different
fractions of the windows (SPON's biases move activations, and on text unlike the calibration text that moves
its sparsity too), TEAL runs again with its thresholds scaled by one common factor until it zeroes what SPON
zeroes there, and the gap is taken against that.
"""

import math
import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from vllm_spon.calibration.data import DEFAULT_EVAL_DATA, load_text, same_source, token_windows
from vllm_spon.calibration.devices import Device, resolve_device
from vllm_spon.calibration.sparse_model import Mode, SparseModel, load_hf_model, load_tokenizer
from vllm_spon.format.atomic import OutputError
from vllm_spon.format.checkpoint import load_checkpoint, read_config
from vllm_spon.format.identity import model_family
from vllm_spon.format.schema import MATCHED_SPARSITY, PerplexityReport, Quantization, SponConfig


@torch.no_grad()
def perplexity(model: SparseModel, windows: torch.Tensor, mode: Mode, batch_size: int = 4) -> float:
    """exp(mean next-token NLL) over every predicted position of every window."""
    device = next(model.model.parameters()).device
    nll, count = 0.0, 0
    with model.use(mode):
        for batch in tqdm(windows.split(batch_size), desc=f"perplexity ({mode})", leave=False):
            batch = batch.to(device)
            logits = model.logits(batch)[:, :-1].float()
            nll += F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
            count += batch[:, 1:].numel()
    return math.exp(nll / count)


def perplexity_and_sparsity(model: SparseModel, windows: torch.Tensor, mode: Mode) -> tuple[float, float]:
    """(perplexity, parameter-weighted sparsity) from one pass: evaluation reads both on the same windows, and a
    separate sparsity pass cost a forward over them again."""
    with model.count_sparsity() as counter:
        ppl = perplexity(model, windows, mode)
    return ppl, counter.weighted(model.linears)


@torch.no_grad()
def measure_sparsity(model: SparseModel, windows: torch.Tensor, mode: Mode, batch_size: int = 8
                     ) -> tuple[float, dict[str, float]]:
    """(parameter-weighted sparsity, per-module sparsity) of the thresholded inputs on `windows`."""
    device = next(model.model.parameters()).device
    with model.use(mode), model.count_sparsity() as counter:
        for batch in windows.split(batch_size):
            model.hidden_states(batch.to(device))
    return counter.weighted(model.linears), counter.per_module()


class EvalArgs(BaseModel):
    """`vllm-spon eval` arguments."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    checkpoint: Path = Field(description="SPON checkpoint directory")
    data: str = Field(default=DEFAULT_EVAL_DATA,
                      description="evaluation text: path, builtin:NAME, python-docs or hf:NAME[:CONFIG[:SPLIT]]")
    windows: int = Field(default=32, ge=1, description="evaluation windows")
    window: int = Field(default=512, ge=16, description="tokens per evaluation window")
    device: Device = Field(default="auto", description="auto (a GPU if any), cpu, cuda or cuda:N")
    quantization: Quantization = Field(
        default="none", description="evaluate with the weights rounded as `vllm serve --dtype bfloat16 "
        "--quantization Q` rounds them (dense, TEAL and SPON alike)")


# Rescaled TEAL is matched to SPON's sparsity to within this, in at most MATCH_STEPS sparsity passes: sparsity
# rises smoothly with log(threshold), about 0.4 per unit near 50% (half-normal |x|), the first step's guess.
MATCH_TOLERANCE = 0.002
MATCH_STEPS = 5
SPARSITY_PER_LOG_THRESHOLD = 0.4


def match_sparsity(model: SparseModel, windows: torch.Tensor, thresholds: dict[str, float], sparsity: float,
                   target: float) -> tuple[float, float]:
    """(scale, sparsity reached): TEAL with `thresholds` times `scale` zeroes `target` of the inputs on `windows`,
    to within MATCH_TOLERANCE where MATCH_STEPS passes get there (the closest reached otherwise). `sparsity` is
    what the unscaled thresholds zero there. Secant steps on log(scale), kept inside the bracket once one is
    found (sparsity never falls as the thresholds rise). Leaves the model with the scaled thresholds."""
    points = [(0.0, sparsity)]  # (log scale, sparsity)
    log_scale = (target - sparsity) / SPARSITY_PER_LOG_THRESHOLD
    for _ in range(MATCH_STEPS):
        model.set_thresholds({m: t * math.exp(log_scale) for m, t in thresholds.items()})
        points.append((log_scale, measure_sparsity(model, windows, "teal")[0]))
        if abs(points[-1][1] - target) <= MATCH_TOLERANCE:
            break
        below = [p for p in points if p[1] < target]
        above = [p for p in points if p[1] > target]
        if below and above:  # interpolate between the closest points on either side
            (x0, s0), (x1, s1) = max(below, key=lambda p: p[1]), min(above, key=lambda p: p[1])
        else:  # extrapolate from the last two
            (x0, s0), (x1, s1) = points[-2], points[-1]
        slope = (s1 - s0) / (x1 - x0) if x1 != x0 and s1 != s0 else SPARSITY_PER_LOG_THRESHOLD
        log_scale = x1 + (target - s1) / slope
    log_scale, reached = min(points[1:], key=lambda p: abs(p[1] - target))
    model.set_thresholds({m: t * math.exp(log_scale) for m, t in thresholds.items()})
    return math.exp(log_scale), reached


def compare_methods(
    model: SparseModel,
    windows: torch.Tensor,
    data: str,
    teal_thresholds: dict[str, float],
    thresholds: dict[str, float],
    method_mode: Mode = "spon",
) -> PerplexityReport:
    """Dense, TEAL (`teal_thresholds`, no biases) and the checkpoint's method (`thresholds`, plus the model's
    fused biases in mode spon) on the same windows and weights (fp8-rounded ones if the model is quantized),
    with the sparsity each achieved there; where those differ by more than MATCHED_SPARSITY, TEAL again with its
    thresholds rescaled to SPON's sparsity (`match_sparsity`). Leaves the model with `thresholds`."""
    model.set_thresholds(teal_thresholds)
    dense = perplexity(model, windows, "dense")
    teal, teal_sparsity = perplexity_and_sparsity(model, windows, "teal")
    model.set_thresholds(thresholds)
    spon, spon_sparsity = perplexity_and_sparsity(model, windows, method_mode)
    rescaled = {}
    if abs(teal_sparsity - spon_sparsity) > MATCHED_SPARSITY:
        scale, reached = match_sparsity(model, windows, teal_thresholds, teal_sparsity, spon_sparsity)
        rescaled = {"teal_rescaled": perplexity(model, windows, "teal"), "teal_rescaled_sparsity": reached,
                    "teal_rescaled_scale": scale}
        model.set_thresholds(thresholds)
    return PerplexityReport(data=data, num_windows=windows.shape[0], window=windows.shape[1], dense=dense, teal=teal,
                            spon=spon, teal_sparsity=teal_sparsity, spon_sparsity=spon_sparsity,
                            quantization=model.quantization, **rescaled)


def teal_baseline(config: SponConfig) -> tuple[dict[str, float], str]:
    """TEAL's thresholds for a checkpoint and what they are: its own where calibration recorded them."""
    if config.teal_thresholds is not None:
        return config.teal_thresholds, "TEAL's own, fitted for TEAL before SPON training (spon/config.json)"
    return config.thresholds, ("the checkpoint's thresholds without its biases: it records no TEAL thresholds of "
                               "its own (hand-made, or written before vllm-spon recorded them)")


def evaluate(args: EvalArgs) -> tuple[PerplexityReport, dict]:
    """Dense, TEAL and SPON perplexity of a checkpoint on the same windows (`compare_methods`), and the JSON
    `vllm-spon eval` prints."""
    checkpoint = load_checkpoint(args.checkpoint)
    config = checkpoint.config
    windows = token_windows(load_tokenizer(args.checkpoint), load_text(args.data), args.window, args.windows,
                            source=f"--data {args.data}")
    sparse = SparseModel(load_hf_model(args.checkpoint, device=resolve_device(args.device)), config.projections)
    sparse.apply_checkpoint(checkpoint)
    sparse.quantize(args.quantization)
    teal_thresholds, teal_label = teal_baseline(config)
    report = compare_methods(sparse, windows, args.data, teal_thresholds, config.thresholds,
                             "spon" if checkpoint.biases else "teal")
    recovered = report.gap_recovered
    unquantized = {}
    if args.quantization != "none":
        with sparse.unquantized():
            unquantized["dense_unquantized_ppl"] = round(perplexity(sparse, windows, "dense"), 3)
    return report, {
        "checkpoint": str(args.checkpoint),
        "method": config.method,
        "data": args.data,
        "windows": args.windows,
        "window": args.window,
        # Measured here, on these windows; `inspect` shows calibration's check on its own windows.
        "measured_on": f"{args.windows} x {args.window} tokens of {args.data}",
        **({"warning": f"{args.data} is the text this checkpoint was calibrated on: not held out"}
           if config.calibration is not None and same_source(config.calibration.data, args.data) else {}),
        "teal_thresholds": teal_label,
        "quantization": args.quantization,
        "calibrated_for_quantization": None if config.calibration is None else config.calibration.quantization,
        "target_sparsity": config.target_sparsity,
        "calibration_achieved_sparsity": config.achieved_sparsity,
        "spon_sparsity": round(report.spon_sparsity, 4),
        "teal_sparsity": round(report.teal_sparsity, 4),
        "dense_ppl": round(report.dense, 3),
        "teal_ppl": round(report.teal, 3),
        # TEAL again at SPON's sparsity (thresholds times one scale), where its own thresholds did not match it
        **({} if report.teal_rescaled is None else {
            "teal_rescaled_scale": round(report.teal_rescaled_scale, 4),
            "teal_rescaled_sparsity": round(report.teal_rescaled_sparsity, 4),
            "teal_rescaled_ppl": round(report.teal_rescaled, 3)}),
        "spon_ppl": round(report.spon, 3),
        **unquantized,
        "gap_recovered": None if recovered is None else round(recovered, 4),
        "gap_recovered_note": report.gap_note(),
    }


def check_plot_path(output: Path) -> None:
    """Refuse, before any evaluation, a `--plot` that would fail or land elsewhere after it: an existing folder
    or link (matplotlib would write `NAME.png` beside it) or a suffix matplotlib cannot write."""
    from matplotlib.backend_bases import FigureCanvasBase

    output = Path(output)
    formats = FigureCanvasBase.get_supported_filetypes()
    if output.is_symlink() or output.is_dir():
        raise OutputError(f"--plot {output} is an existing folder or link; give a file name such as plot.png")
    if output.suffix.lstrip(".").lower() not in formats:
        raise OutputError(f"--plot {output}: the file name must end in one of "
                          f"{', '.join('.' + f for f in sorted(formats))} (the image format)")


def plot_checkpoint(checkpoint_dir: Path, output: Path, measured: PerplexityReport | None = None) -> Path:
    """PNG of per-layer thresholds and calibration sparsity, one line per projection; the title carries
    `measured` (eval's own measurement) or else calibration's held-out check, labelled as such."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config, family = read_config(checkpoint_dir), model_family(checkpoint_dir)
    fig, (ax_t, ax_s) = plt.subplots(1, 2, figsize=(12, 4.5))
    by_module = {m: family.parse(m) for m in config.thresholds}
    for proj in config.projections:
        layers = sorted((index, m) for m, (index, p) in by_module.items() if p.name == proj)
        xs = [i for i, _ in layers]
        ax_t.plot(xs, [config.thresholds[m] for _, m in layers], marker=".", label=proj)
        if config.module_sparsity is not None:
            ax_s.plot(xs, [config.module_sparsity[m] for _, m in layers], marker=".", label=proj)
    ax_t.set(yscale="log", xlabel="layer", ylabel="threshold |x|", title="per-layer thresholds")
    ax_s.set(xlabel="layer", ylabel="input sparsity (calibration tokens)", title="per-layer sparsity")
    ax_s.axhline(config.target_sparsity, color="grey", linestyle="--", linewidth=1)
    ax_t.legend(fontsize=8)
    title = f"{config.method.upper()} target {config.target_sparsity:.2f}, " + (
        "hand-made" if config.achieved_sparsity is None else
        f"achieved {config.achieved_sparsity:.3f} on calibration tokens")
    report, source = (measured, "eval") if measured else (config.perplexity, "calibration's check")
    if report:
        recovered = report.gap_recovered
        title += (f"\n{source}, {report.num_windows} x {report.window} tokens of {report.data}: ppl dense "
                  f"{report.dense:.2f} / TEAL {report.teal:.2f} ({report.teal_sparsity:.3f}) / SPON {report.spon:.2f} "
                  f"({report.spon_sparsity:.3f})"
                  + (f"; TEAL at SPON's sparsity {report.teal_rescaled:.2f} ({report.teal_rescaled_sparsity:.3f})"
                     if report.rescaled_matched else "")
                  + (f", {recovered:.0%} of the gap recovered" if recovered is not None else ", sparsity not matched"))
    fig.suptitle(title)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    handle, part = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=output.suffix)
    os.close(handle)
    try:
        fig.savefig(part, dpi=110)
        os.replace(part, output)  # a whole image at `output` or none: never a half-written one
    except BaseException:
        Path(part).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return output
