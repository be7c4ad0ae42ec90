"""Perplexity of the dense, TEAL and SPON variants of one model on the same token windows."""

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from vllm_spon.calibration.checkpoint import load_checkpoint, read_config
from vllm_spon.calibration.data import DEFAULT_EVAL_DATA, load_text, token_windows
from vllm_spon.calibration.devices import Device, resolve_device
from vllm_spon.calibration.sparse_model import Mode, SparseModel, load_hf_model, load_tokenizer


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


def evaluate(args: EvalArgs) -> dict:
    """Dense, TEAL and SPON perplexity of a checkpoint on the same windows, plus achieved sparsity."""
    checkpoint = load_checkpoint(args.checkpoint)
    device = resolve_device(args.device)
    windows = token_windows(load_tokenizer(args.checkpoint), load_text(args.data), args.window, args.windows,
                            source=f"--data {args.data}")
    sparse = SparseModel(load_hf_model(args.checkpoint, device=device), checkpoint.config.projections)
    sparse.apply_checkpoint(checkpoint)
    dense = perplexity(sparse, windows, "dense")
    teal = perplexity(sparse, windows, "teal")
    teal_sparsity, _ = measure_sparsity(sparse, windows, "teal")
    spon = perplexity(sparse, windows, "spon") if checkpoint.biases else teal
    spon_sparsity, _ = measure_sparsity(sparse, windows, "spon")
    gap = teal - dense
    return {
        "checkpoint": str(args.checkpoint),
        "method": checkpoint.config.method,
        "data": args.data,
        "windows": args.windows,
        "window": args.window,
        # Measured here, on these windows; `inspect` and the plot show the calibration-time numbers.
        "measured_on": f"{args.windows} x {args.window} tokens of {args.data}",
        "teal_thresholds": "the checkpoint's own (refitted with the SPON biases), without the biases",
        "target_sparsity": checkpoint.config.target_sparsity,
        "calibration_achieved_sparsity": checkpoint.config.achieved_sparsity,
        "spon_sparsity": round(spon_sparsity, 4),
        "teal_sparsity": round(teal_sparsity, 4),
        "dense_ppl": round(dense, 3),
        "teal_ppl": round(teal, 3),
        "spon_ppl": round(spon, 3),
        "gap_recovered": round((teal - spon) / gap, 4) if gap > 0 else None,
    }


def plot_checkpoint(checkpoint_dir: Path, output: Path) -> Path:
    """PNG of per-layer thresholds and calibration sparsity, one line per projection."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config = read_config(checkpoint_dir)
    fig, (ax_t, ax_s) = plt.subplots(1, 2, figsize=(12, 4.5))
    for proj in config.projections:
        layers = sorted((int(m.split(".layers.")[1].split(".")[0]), m) for m in config.thresholds
                        if m.endswith("." + proj))
        xs = [i for i, _ in layers]
        ax_t.plot(xs, [config.thresholds[m] for _, m in layers], marker=".", label=proj)
        ax_s.plot(xs, [config.module_sparsity[m] for _, m in layers], marker=".", label=proj)
    ax_t.set(yscale="log", xlabel="layer", ylabel="threshold |x|", title="per-layer thresholds")
    ax_s.set(xlabel="layer", ylabel="input sparsity (calibration tokens)", title="per-layer sparsity")
    ax_s.axhline(config.target_sparsity, color="grey", linestyle="--", linewidth=1)
    ax_t.legend(fontsize=8)
    title = (f"{config.method.upper()} target {config.target_sparsity:.2f}, "
             f"achieved {config.achieved_sparsity:.3f} on calibration tokens")
    if config.perplexity:
        p = config.perplexity
        title += f"\nheld-out ppl at calibration: dense {p.dense:.1f} / TEAL {p.teal:.1f} / SPON {p.spon:.1f}"
    fig.suptitle(title)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output
