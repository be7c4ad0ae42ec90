"""Accuracy benchmark: dense / TEAL / SPON perplexity of the example model across target sparsities.

For each sparsity: calibrate on the shipped corpus (Sense and Sensibility) at default settings, then measure
perplexity on held-out text: another novel (Persuasion) and, out of domain, Python's documentation, measured
as `vllm-spon eval` does (`evaluate.compare_methods`): TEAL with the thresholds calibration fitted for it
(recorded in the checkpoint), SPON with thresholds refitted after its biases; both achieved sparsities are
reported. Where they differ by more than 0.01 (on text unlike the calibration text), TEAL is measured again with
its thresholds scaled to SPON's sparsity there; the gap recovered is taken only at matched sparsity.
`--reevaluate` measures checkpoints already in the work directory again, as today's code measures. Each row
records its settings; a rerun resumes only rows of the same settings and stops at any other (`--fresh` redoes).

    .venv/bin/python benchmarks/bench_calibration.py --workdir artifacts/bench [--sparsities 0.25,0.4,0.5,0.6,0.7]
Writes results.json, results.md and perplexity_vs_sparsity.png to the work directory.
With `--quantization fp8` every row is evaluated on fp8-rounded weights (as `vllm serve --quantization fp8`
computes), once for a checkpoint calibrated unquantized and once for one calibrated for fp8: which recipe to
document.
"""

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from vllm_spon.calibration.data import load_text, token_windows
from vllm_spon.calibration.evaluate import compare_methods, teal_baseline
from vllm_spon.calibration.example_model import write_example_model
from vllm_spon.calibration.pipeline import CalibrationArgs, calibrate
from vllm_spon.calibration.sparse_model import SparseModel, load_hf_model, load_tokenizer
from vllm_spon.format.checkpoint import load_checkpoint, read_config
from vllm_spon.format.schema import Quantization

EVAL_SETS = {"persuasion": "builtin:persuasion", "python-docs": "python-docs"}


def evaluate_pair(model_dir: Path, checkpoint: Path, windows: dict[str, torch.Tensor],
                  quantization: Quantization = "none", teal_from: Path | None = None) -> dict:
    """Dense, TEAL (the checkpoint's own TEAL thresholds, or those of checkpoint `teal_from`) and SPON on every
    eval set, with the weights as `quantization` serves them: `vllm-spon eval`'s measurement
    (`compare_methods`), so the table and the tool agree."""
    ckpt = load_checkpoint(checkpoint)
    sparse = SparseModel(load_hf_model(model_dir), ckpt.config.projections)
    sparse.apply_checkpoint(ckpt)
    sparse.quantize(quantization)
    teal_thresholds, _ = teal_baseline(ckpt.config if teal_from is None else read_config(teal_from))
    out: dict = {}
    for name, w in windows.items():
        report = compare_methods(sparse, w, name, teal_thresholds, ckpt.config.thresholds)
        out[name] = {**report.model_dump(), "gap_recovered": report.gap_recovered}
    return out


def biases_kept(checkpoint: Path) -> str:
    """Which layers' SPON biases calibration's per-layer choice kept (`site_choice`): all, some, or none (a
    plain TEAL checkpoint)."""
    ckpt = load_checkpoint(checkpoint)
    if ckpt.config.method == "teal":
        return "none (TEAL)"
    layers = {ckpt.family.layer_index(m) for m in ckpt.biases}
    zeroed = sorted(layers - {ckpt.family.layer_index(m) for m, b in ckpt.biases.items() if b.any()})
    return f"all {len(layers)} layers" if not zeroed else f"{len(layers) - len(zeroed)}/{len(layers)} layers"


def plot(results: list[dict], output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(EVAL_SETS), figsize=(6 * len(EVAL_SETS), 4.5))
    for ax, name in zip(axes, EVAL_SETS, strict=True):
        xs = [r["sparsity"] for r in results]
        ax.plot(xs, [r["eval"][name]["dense"] for r in results], "k--", label="dense")
        ax.plot(xs, [r["eval"][name]["teal"] for r in results], "o-", label="TEAL")
        ax.plot(xs, [r["eval"][name]["spon"] for r in results], "o-", label="SPON")
        ax.set(yscale="log", xlabel="target sparsity", ylabel="perplexity", title=f"held-out: {name}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(output, dpi=110)


def recovered(e: dict) -> str:
    return "not matched" if e["gap_recovered"] is None else f"{e['gap_recovered']:.0%}"


def teal_cell(e: dict) -> str:
    """TEAL with its own thresholds, and where those did not match SPON's sparsity, rescaled to it."""
    own = f"{e['teal']:.2f} ({e['teal_sparsity']:.3f})"
    if e.get("teal_rescaled") is None:
        return own
    scaled = f"{e['teal_rescaled']:.2f} ({e['teal_rescaled_sparsity']:.3f})"
    return f"{own}; thresholds x{e['teal_rescaled_scale']:.3f}: {scaled}"


def markdown(results: list[dict]) -> str:
    lines = ["| target | calibrated for / served | eval text | dense | TEAL (sparsity) | SPON (sparsity) "
             "| gap recovered | SPON biases kept | calib. s |", "|" + " --- |" * 9]
    for r in results:
        for name, e in r["eval"].items():
            lines.append(f"| {r['sparsity']:.2f} | {r['calibrated_for']} / {e['quantization']} | {name} | "
                         f"{e['dense']:.2f} | {teal_cell(e)} | {e['spon']:.2f} ({e['spon_sparsity']:.3f}) | "
                         f"{recovered(e)} | {r.get('biases_kept', 'all (before site choice)')} | "
                         f"{r['calibration_s']:.0f} |")
    return "\n".join(lines)


# calibrate settings a run may change
OVERRIDES = ("steps", "hidden_weight", "data", "windows_per_step", "refit_rounds", "seed", "vector_decay", "allocation")


def check_resumable(row_file: Path, recorded: dict | None, asked: dict, reevaluate: bool) -> None:
    """A row is reused only for the run that made it: the same calibration overrides and, unless it is measured
    again (`--reevaluate`), the same evaluation; otherwise another setting's numbers would be reported as these."""
    if recorded is not None and recorded["calibrate"] == asked["calibrate"] and (reevaluate or recorded == asked):
        return
    what = "evaluated" if recorded is not None and recorded["calibrate"] == asked["calibrate"] else "calibrated"
    raise SystemExit(f"{row_file} was {what} with settings {recorded} (none recorded: an older run), this run asks "
                     f"{asked}: use another --workdir, --fresh to recalibrate over it"
                     + (", or --reevaluate to measure it again" if what == "evaluated" else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("artifacts/bench"))
    parser.add_argument("--sparsities", default="0.25,0.4,0.5,0.6,0.7")
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--steps", type=int, help="override the default SPON step count")
    parser.add_argument("--hidden-weight", type=float, help="override calibrate's --hidden-weight")
    parser.add_argument("--data", help="override calibrate's --data (the calibration text)")
    parser.add_argument("--windows-per-step", type=int, help="override calibrate's --windows-per-step")
    parser.add_argument("--refit-rounds", type=int, help="override calibrate's --refit-rounds")
    parser.add_argument("--vector-decay", type=float, help="override calibrate's --vector-decay")
    parser.add_argument("--seed", type=int, help="override calibrate's --seed (run-to-run spread of a setting)")
    parser.add_argument("--allocation", choices=["uniform", "greedy", "greedy-input"],
                        help="override calibrate's --allocation (TEAL's own thresholds follow the same allocation)")
    parser.add_argument("--teal-from", type=Path, metavar="WORKDIR",
                        help="TEAL's thresholds from the checkpoints of another run's work directory, the same "
                        "sparsity's (e.g. one with --allocation greedy: TEAL as TEAL calibrates itself)")
    parser.add_argument("--fresh", action="store_true", help="recalibrate sparsities already measured")
    parser.add_argument("--reevaluate", action="store_true",
                        help="measure the checkpoints of sparsities already calibrated again, without recalibrating")
    parser.add_argument("--quantization", choices=["none", "fp8", "fp8_per_channel"], default="none",
                        help="serve (evaluate) with this vLLM weight quantization and compare two recipes: "
                        "calibrated unquantized, and calibrated for it (`calibrate --quantization`)")
    ns = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    ns.workdir.mkdir(parents=True, exist_ok=True)
    model_dir = ns.workdir / "smollm2"
    if not (model_dir / "config.json").is_file():
        write_example_model(model_dir)
    tokenizer = load_tokenizer(model_dir)
    windows = {name: token_windows(tokenizer, load_text(spec), 512, ns.eval_windows, source=spec)
               for name, spec in EVAL_SETS.items()}
    results = []
    served: Quantization = ns.quantization
    recipes: list[Quantization] = ["none"] if served == "none" else ["none", served]
    for s in [float(x) for x in ns.sparsities.split(",")]:
        for recipe in recipes:
            name = f"spon{round(s * 100)}" + ("" if recipe == "none" else f"-{recipe}")
            checkpoint = ns.workdir / name
            teal_from = None if ns.teal_from is None else ns.teal_from / name
            # one row per sparsity and recipe, so an interrupted run resumes
            row_file = checkpoint.with_name(checkpoint.name + ("" if served == "none" else f"-served-{served}"))
            row_file = row_file.with_suffix(".json")
            extra = {k: v for k in OVERRIDES if (v := getattr(ns, k)) is not None}
            settings = {"calibrate": extra, "teal_from": teal_from and str(teal_from), "eval_windows": ns.eval_windows}
            if row_file.is_file() and not ns.fresh:
                results.append(json.loads(row_file.read_text()))
                check_resumable(row_file, results[-1].get("settings"), settings, ns.reevaluate)
                if ns.reevaluate:  # today's measurement of the checkpoint calibrated then
                    results[-1]["eval"] = evaluate_pair(model_dir, checkpoint, windows, served, teal_from)
                    results[-1]["settings"] = settings
                    row_file.write_text(json.dumps(results[-1], indent=2))
                continue
            t0 = time.perf_counter()
            calibrate(CalibrationArgs(model=model_dir, output=checkpoint, sparsity=s, layout="overlay",
                                      eval_data=None, overwrite=True, quantization=recipe, **extra))
            seconds = time.perf_counter() - t0
            results.append({"sparsity": s, "calibrated_for": recipe, "settings": settings, "calibration_s": seconds,
                             "biases_kept": biases_kept(checkpoint), "teal_from": teal_from and str(teal_from),
                             "eval": evaluate_pair(model_dir, checkpoint, windows, served, teal_from)})
            row_file.write_text(json.dumps(results[-1], indent=2))
            print(markdown(results[-1:]), flush=True)
    results.sort(key=lambda r: (r["sparsity"], r["calibrated_for"] != "none"))
    (ns.workdir / "results.json").write_text(json.dumps(results, indent=2))
    (ns.workdir / "results.md").write_text(markdown(results) + "\n")
    if served == "none":
        plot(results, ns.workdir / "perplexity_vs_sparsity.png")
    print(markdown(results))


if __name__ == "__main__":
    main()
