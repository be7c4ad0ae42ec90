"""Issue 10: nothing the user owns is lost, runs that go wrong write nothing, and every bad input or bad
checkpoint is refused by every tool with the same one line (no traceback). Tiny random Llama, seconds each."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.checkpoint_edits import claim_calibration, edit_config, edit_tensors
from tests.conftest import TINY_BUDGET
from vllm_spon import __version__
from vllm_spon.calibration.handmade import write_handmade
from vllm_spon.calibration.pipeline import CalibrationArgs
from vllm_spon.calibration.sparse_model import sparsifiable_linears
from vllm_spon.calibration.spon_training import TrainingError
from vllm_spon.cli import build_parser, main
from vllm_spon.format.checkpoint import is_spon_checkpoint, load_checkpoint
from vllm_spon.format.errors import CheckpointError
from vllm_spon.format.schema import PerplexityReport

MODULE = "model.layers.1.mlp.down_proj"
# A subprocess that sends itself SIG when FUNCTION of vllm_spon.calibration.MODULE is called, then runs the CLI.
SIGNAL_AT = """
import os, signal, sys
import vllm_spon.format.{module} as target
original = target.{function}
def signalled(*args, **kwargs):
    os.kill(os.getpid(), signal.{signal})
    return original(*args, **kwargs)
target.{function} = signalled
from vllm_spon.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture()
def model_copy(tiny_model, tmp_path) -> Path:
    """A copy of the tiny model the test may put at risk."""
    return Path(shutil.copytree(tiny_model, tmp_path / "model"))


def run(capsys, *args: str) -> tuple[int, str]:
    """`vllm-spon ARGS` in this process: (exit code, its error line: the last of stderr, asserted to be one)."""
    code = main([str(a) for a in args])
    err = capsys.readouterr().err.replace("\r", "\n")  # progress bars end lines with carriage returns
    assert "Traceback" not in err
    if "\nvllm-spon " not in "\n" + err:
        return code, ""
    line = err[("\n" + err).rindex("\nvllm-spon "):]
    assert "\n" not in line.strip(), f"more than one line: {line}"
    return code, line.strip()


def digest(directory: Path) -> dict[str, str]:
    """Every entry under `directory` (links as their target) and the sha256 of every file's bytes."""
    return {str(p.relative_to(directory)): (f"-> {os.readlink(p)}" if p.is_symlink() else
                                            hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(directory.rglob("*"))}


def tiny_tensors(model: Path) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """One threshold and a small bias for every linear `model` has (sizes from the model itself)."""
    linears = sparsifiable_linears(AutoModelForCausalLM.from_pretrained(model))
    return dict.fromkeys(linears, 0.05), {m: torch.full((linear.out_features,), 0.01) for m, linear in linears.items()}


def tiny_checkpoint(model: Path, output: Path, layout: str = "full") -> Path:
    return write_handmade(model, output, *tiny_tensors(model), layout=layout)


# --- nothing the user owns is lost ---------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["the model", "inside the model", "a parent of the model", "a link to the model",
                                   "inside a link to the model"])
def test_output_at_or_around_the_model_is_refused_and_the_model_kept(capsys, model_copy, tmp_path, where):
    (tmp_path / "link").symlink_to(model_copy)
    output = {"the model": model_copy, "inside the model": model_copy / "spon-out", "a parent of the model": tmp_path,
              "a link to the model": tmp_path / "link", "inside a link to the model": tmp_path / "link" / "out"}[where]
    before = digest(tmp_path)
    code, line = run(capsys, "calibrate", model_copy, "--layout", "overlay", "--output", output, "--overwrite",
                     "--no-eval", *TINY_BUDGET)
    assert code == 1 and "could destroy the base model" in line
    assert digest(tmp_path) == before


def test_output_where_an_overlays_base_lives_is_refused(capsys, tiny_model, tmp_path):
    """Calibrating an overlay onto the full checkpoint it links to would delete the weights it links to."""
    base = tiny_checkpoint(tiny_model, tmp_path / "full")
    overlay = tiny_checkpoint(base, tmp_path / "overlay", layout="overlay")
    before = digest(tmp_path)
    code, line = run(capsys, "calibrate", overlay, "--layout", "overlay", "--output", base, "--overwrite",
                     "--no-eval", *TINY_BUDGET)
    assert code == 1 and f"which holds the files of the model {overlay}" in line
    assert digest(tmp_path) == before


@pytest.mark.parametrize("existing", ["file", "folder", "link to a checkpoint"])
def test_overwrite_replaces_only_a_previous_checkpoint(capsys, tiny_model, tmp_path, existing):
    output = tmp_path / "out"
    if existing == "file":
        output.write_text("the user's notes")
    elif existing == "folder":
        output.mkdir()
        (output / "notes.txt").write_text("the user's notes")
    else:
        output.symlink_to(tiny_checkpoint(tiny_model, tmp_path / "checkpoint"))
    before = digest(tmp_path)
    code, line = run(capsys, "calibrate", tiny_model, "--output", output, "--overwrite", "--no-eval", *TINY_BUDGET)
    assert code == 1 and "--overwrite replaces only a previous vllm-spon checkpoint" in line
    assert digest(tmp_path) == before


def test_overwrite_replaces_a_previous_checkpoint_and_leaves_nothing_else(capsys, tiny_model, tmp_path):
    output = tiny_checkpoint(tiny_model, tmp_path / "out")
    code, _ = run(capsys, "calibrate", tiny_model, "--output", output, "--overwrite", "--no-eval", *TINY_BUDGET)
    assert code == 0 and load_checkpoint(output).config.calibration.data != "hand-made"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_example_model_never_replaces_a_folder_of_the_users(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("the user's notes")
    code, line = run(capsys, "example-model", tmp_path, "--overwrite")
    assert code == 1 and "replaces only a previous output of vllm-spon" in line
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


@pytest.fixture()
def no_heavy_work(monkeypatch):
    """Calibration's first heavy step fails the test: a refusal must come before it."""
    def heavy(*_args, **_kwargs):
        raise AssertionError("calibration started work before the output was checked")

    monkeypatch.setattr("vllm_spon.calibration.pipeline.load_tokenizer", heavy)


@pytest.fixture()
def unwritable(tmp_path) -> Path:
    """A folder this process cannot create entries in."""
    if os.geteuid() == 0:
        return Path("/proc/vllm-spon-out")  # not even root may create folders here
    (tmp_path / "read-only").mkdir(mode=0o500)
    return tmp_path / "read-only"


def test_unwritable_output_is_refused_before_any_work(capsys, tiny_model, unwritable, no_heavy_work):
    code, line = run(capsys, "calibrate", tiny_model, "--output", unwritable / "checkpoint", *TINY_BUDGET)
    assert code == 1 and "cannot create a directory in" in line and "choose a writable --output" in line


def test_unwritable_plot_is_refused_before_the_evaluation(capsys, tiny_model, tmp_path, unwritable, monkeypatch):
    checkpoint = tiny_checkpoint(tiny_model, tmp_path / "ckpt")
    monkeypatch.setattr("vllm_spon.calibration.evaluate.load_tokenizer", lambda *_: pytest.fail("evaluation ran"))
    code, line = run(capsys, "eval", checkpoint, "--plot", unwritable / "plot.png")
    assert code == 1 and "choose a writable --plot" in line


@pytest.mark.parametrize(("name", "message"), [("plot.txt", "must end in one of"), ("folder", "existing folder")])
def test_a_plot_name_matplotlib_would_not_write_is_refused_before_the_evaluation(capsys, tiny_model, tmp_path,
                                                                                 monkeypatch, name, message):
    checkpoint = tiny_checkpoint(tiny_model, tmp_path / "ckpt")
    (tmp_path / "folder").mkdir()
    monkeypatch.setattr("vllm_spon.calibration.evaluate.load_tokenizer", lambda *_: pytest.fail("evaluation ran"))
    code, line = run(capsys, "eval", checkpoint, "--plot", tmp_path / name)
    assert code == 1 and message in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "folder"]


def test_the_plot_replaces_its_file_whole_and_leaves_no_temporary(tiny_model, tmp_path):
    from vllm_spon.calibration.evaluate import plot_checkpoint

    checkpoint = tiny_checkpoint(tiny_model, tmp_path / "ckpt")
    plot = tmp_path / "plots" / "thresholds.png"
    plot.parent.mkdir()
    plot.write_bytes(b"an older plot")
    assert plot_checkpoint(checkpoint, plot) == plot
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in plot.parent.iterdir()] == ["thresholds.png"]


def test_no_room_for_the_checkpoint_is_refused_before_any_work(capsys, tiny_model, tmp_path, monkeypatch,
                                                               no_heavy_work):
    monkeypatch.setattr(shutil, "disk_usage", lambda _: namedtuple("usage", "total used free")(2**30, 2**30, 0))
    code, line = run(capsys, "calibrate", tiny_model, "--output", tmp_path / "out", *TINY_BUDGET)
    assert code == 1 and "MiB free" in line and "--layout overlay" in line


def test_sigterm_during_the_write_keeps_the_previous_checkpoint_and_leaves_nothing(tiny_model, tmp_path):
    previous = tiny_checkpoint(tiny_model, tmp_path / "out")
    before = digest(tmp_path)
    script = SIGNAL_AT.format(module="checkpoint", function="save_file", signal="SIGTERM")
    result = subprocess.run([sys.executable, "-c", script, "calibrate", str(tiny_model), "--output", str(previous),
                             "--overwrite", "--no-eval", *TINY_BUDGET], capture_output=True, text=True, timeout=300)
    assert result.returncode == 128 + signal.SIGTERM, result.stderr
    assert "interrupted (SIGTERM); nothing half-written is left" in result.stderr and "Traceback" not in result.stderr
    assert digest(tmp_path) == before


def test_sigterm_between_the_final_renames_waits_for_them(tiny_model, tmp_path):
    """No stray `.old` and no missing output when the signal lands as the previous checkpoint is swapped out,
    and the message says the new one was written: a script that sees the non-zero exit must not believe the
    previous checkpoint is still there."""
    previous = tiny_checkpoint(tiny_model, tmp_path / "out")
    script = SIGNAL_AT.format(module="atomic", function="os.replace", signal="SIGTERM")
    result = subprocess.run([sys.executable, "-c", script, "calibrate", str(tiny_model), "--output", str(previous),
                             "--overwrite", "--no-eval", *TINY_BUDGET], capture_output=True, text=True, timeout=300)
    assert result.returncode == 128 + signal.SIGTERM, result.stderr
    assert f"interrupted (SIGTERM) after {previous} was written in full" in result.stderr
    assert "nothing half-written" not in result.stderr and "Traceback" not in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert load_checkpoint(previous).config.calibration.data == "builtin:sense-and-sensibility"  # the new one


def test_sigterm_during_training_leaves_nothing(tiny_model, tmp_path):
    output = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "vllm_spon.cli", "calibrate", str(tiny_model), "--output",
                                str(output), "--no-eval", *TINY_BUDGET, "--steps", "100000"],
                               stderr=subprocess.PIPE, text=True)
    seen = ""
    while "SPON training" not in seen:
        chunk = process.stderr.read(64)
        assert chunk, f"calibrate ended before training: {seen}"
        seen += chunk
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM
    assert "interrupted (SIGTERM); nothing half-written is left" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_a_killed_write_is_never_taken_for_a_checkpoint_and_is_cleaned_next_time(capsys, tiny_model, tmp_path):
    output = tmp_path / "out"
    script = SIGNAL_AT.format(module="checkpoint", function="save_file", signal="SIGKILL")
    result = subprocess.run([sys.executable, "-c", script, "calibrate", str(tiny_model), "--output", str(output),
                             "--no-eval", *TINY_BUDGET], capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL
    [stale] = list(tmp_path.iterdir())
    assert not is_spon_checkpoint(stale)
    code, line = run(capsys, "inspect", stale)
    assert code == 1 and "is an unfinished write of vllm-spon" in line
    tiny_checkpoint(tiny_model, output)
    assert list(tmp_path.iterdir()) == [output]


# --- runs that go wrong write nothing ------------------------------------------------------------------------

def test_diverging_training_stops_with_one_line_and_writes_nothing(capsys, tiny_model, tmp_path):
    code, line = run(capsys, "calibrate", tiny_model, "--output", tmp_path / "out", *TINY_BUDGET, "--steps", "3",
                     "--lr", "1e6")
    assert code == 1 and "SPON training diverged" in line and "lower --lr (now 1e+06" in line
    assert list(tmp_path.iterdir()) == []


def test_spon_clearly_worse_than_teal_on_held_out_text_is_refused():
    from vllm_spon.calibration.pipeline import check_held_out

    report = PerplexityReport(data="builtin:persuasion", num_windows=8, window=512, dense=37.0, teal=42.0,
                              spon=316385.0, teal_sparsity=0.5, spon_sparsity=0.5)
    with pytest.raises(TrainingError, match=r"lower --lr \(now 1e\+06\) or raise --steps \(now 100\)"):
        check_held_out(report, lr=1e6, steps=100)
    check_held_out(report.model_copy(update={"spon": 41.0}), lr=1e-3, steps=100)


# --- one validator, the same line from every tool ------------------------------------------------------------

def _drop_module(config: dict) -> None:
    del config["thresholds"][MODULE]


BAD_CHECKPOINTS = {
    "float16 threshold": (lambda p: edit_tensors(p, lambda t: t.update({f"{MODULE}.threshold": t[
        f"{MODULE}.threshold"].half()})), f"tensor {MODULE}.threshold must be a 0-d float32 tensor"),
    "float64 bias": (lambda p: edit_tensors(p, lambda t: t.update({f"{MODULE}.spon_bias": t[
        f"{MODULE}.spon_bias"].double()})), f"tensor {MODULE}.spon_bias is float64; the format stores float32"),
    "mis-shaped bias": (lambda p: edit_tensors(p, lambda t: t.update({f"{MODULE}.spon_bias": t[
        f"{MODULE}.spon_bias"][:-1].contiguous()})), f"tensor {MODULE}.spon_bias has shape [63], but the model's"),
    "spon without a bias": (lambda p: edit_tensors(p, lambda t: t.pop(f"{MODULE}.spon_bias")),
                            f"tensor {MODULE}.spon_bias is missing"),
    "a module left out": (lambda p: (edit_config(p, _drop_module), edit_tensors(p, lambda t: (t.pop(
        f"{MODULE}.threshold"), t.pop(f"{MODULE}.spon_bias")))), f"thresholds lacks module {MODULE}"),
    "projections claim": (lambda p: edit_config(p, lambda c: c.update(projections=["q_proj"])),
                          "not a q_proj module of this 2-layer model"),
    "achieved sparsity claim": (lambda p: edit_config(p, lambda c: claim_calibration(c, achieved=0.99)),
                                "achieved_sparsity 0.99 is not a weighted mean of module_sparsity"),
    "hand-made measurement claim": (lambda p: edit_config(p, lambda c: c.update(achieved_sparsity=0.5)),
                                    "a hand-made checkpoint (calibration null) records no measurements"),
    "invalid JSON": (lambda p: (p / "spon" / "config.json").write_text("{"), "is not a valid SPON config"),
    "truncated tensors": (lambda p: (p / "spon" / "spon.safetensors").write_bytes(
        (p / "spon" / "spon.safetensors").read_bytes()[:-100]), "spon.safetensors cannot be read as safetensors"),
    "renamed pickle": (lambda p: torch.save({"x": torch.zeros(1)}, p / "spon" / "spon.safetensors"),
                       "spon.safetensors cannot be read as safetensors"),
}


@pytest.mark.parametrize("case", BAD_CHECKPOINTS)
def test_inspect_and_eval_refuse_a_bad_checkpoint_with_the_same_line(capsys, tiny_model, tmp_path, case):
    corrupt, message = BAD_CHECKPOINTS[case]
    checkpoint = tiny_checkpoint(tiny_model, tmp_path / "bad")
    corrupt(checkpoint)
    code, inspect_line = run(capsys, "inspect", checkpoint)
    assert code == 1 and message in inspect_line and str(checkpoint / "spon") in inspect_line
    code, eval_line = run(capsys, "eval", checkpoint, "--windows", "1", "--window", "32")
    assert code == 1 and eval_line.removeprefix("vllm-spon eval") == inspect_line.removeprefix("vllm-spon inspect")


def test_an_overlay_whose_base_moved_is_refused_naming_the_base(capsys, model_copy, tmp_path):
    checkpoint = tiny_checkpoint(model_copy, tmp_path / "overlay", layout="overlay")
    shutil.move(model_copy, tmp_path / "moved")
    assert json.loads((checkpoint / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    for command in ("inspect", "eval"):
        code, line = run(capsys, command, checkpoint)
        assert code == 1 and f"the base model {model_copy} recorded in {checkpoint}/spon/config.json moved" in line


def test_calibrations_own_write_refuses_what_the_loader_would(tiny_model, tmp_path):
    with pytest.raises(CheckpointError, match=rf"tensor {MODULE}.spon_bias has shape \[3\], but the model's"):
        thresholds, biases = tiny_tensors(tiny_model)
        write_handmade(tiny_model, tmp_path / "out", thresholds, {**biases, MODULE: torch.zeros(3)})
    assert list(tmp_path.iterdir()) == []


# --- bad arguments: one line, before any work ----------------------------------------------------------------

def test_unsupported_architecture_is_named_with_the_supported_list(capsys, model_copy, tmp_path):
    config = json.loads((model_copy / "config.json").read_text())
    (model_copy / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    code, line = run(capsys, "calibrate", model_copy, "--output", tmp_path / "out", *TINY_BUDGET)
    assert code == 1 and "architecture GPT2LMHeadModel is not supported" in line and "LlamaForCausalLM" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_refused(capsys, tiny_model, tmp_path):
    code, line = run(capsys, "calibrate", tiny_model, "--output", tmp_path / "out", "--device", "cuda", *TINY_BUDGET)
    assert code == 2 and "--device: " in line and "no usable CUDA GPU" in line
    code, line = run(capsys, "eval", tiny_model, "--device", "cuda")
    assert code == 2 and "no usable CUDA GPU" in line


@pytest.mark.parametrize("projections", ["", ",", "x_proj"])
def test_bad_projections_are_refused(capsys, tiny_model, tmp_path, no_heavy_work, projections):
    code, line = run(capsys, "calibrate", tiny_model, "--output", tmp_path / "out", "--projections", projections,
                     *TINY_BUDGET)
    assert code == 2 and "--projections: " in line and "projections must be a non-empty subset" in line


def test_projections_of_another_family_are_refused(capsys, tiny_model, tmp_path, no_heavy_work):
    """Phi-3's fused names are known projections, but not of a Llama block."""
    code, line = run(capsys, "calibrate", tiny_model, "--output", tmp_path / "out", "--projections", "qkv_proj",
                     *TINY_BUDGET)
    assert code == 1 and "--projections qkv_proj: not linears of a llama block" in line


# --- help, version and labels --------------------------------------------------------------------------------

def test_every_option_is_described_with_its_default(capsys):
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in subparsers.items():
        for action in sub._actions:
            if action.dest == "help":
                continue
            assert action.help, f"{name} {action.option_strings or action.dest} has no description"
            if action.option_strings:
                assert "(default: " in action.help or "(required)" in action.help, (name, action.option_strings)
    steps = CalibrationArgs.model_fields["steps"].default
    assert f"SPON training steps (default: {steps})" in subparsers["calibrate"].format_help()
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"vllm-spon {__version__}"


def test_eval_json_and_inspect_label_their_measurements(capsys, tiny_model, tmp_path):
    checkpoint = tiny_checkpoint(tiny_model, tmp_path / "ckpt")
    code = main(["eval", str(checkpoint), "--windows", "1", "--window", "32", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and "achieved_sparsity" not in report  # ambiguous: calibration tokens or these windows?
    assert report["calibration_achieved_sparsity"] == load_checkpoint(checkpoint).config.achieved_sparsity
    assert report["measured_on"] == "1 x 32 tokens of builtin:persuasion" and 0 <= report["spon_sparsity"] <= 1
    assert "thresholds" in report["teal_thresholds"]  # says which thresholds TEAL ran with
    assert main(["inspect", str(checkpoint)]) == 0
    assert "hand-made, not calibrated" in capsys.readouterr().out  # claims no measurement it did not make


def test_the_calibration_text_is_refused_as_held_out_text(capsys, tiny_model, tmp_path, no_heavy_work):
    code, line = run(capsys, "calibrate", tiny_model, "--output", tmp_path / "out", *TINY_BUDGET,
                     "--data", "builtin:persuasion", "--eval-data", "builtin:persuasion")
    assert code == 2 and "is the calibration text" in line and "--no-eval" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra", [["--check-windows", "8"], ["--windows-per-step", "8"]])
def test_too_few_windows_for_training_and_the_check_is_refused(capsys, tiny_model, tmp_path, extra):
    # 6 windows of 32 tokens: 1 for statistics, but not 8 held out (or 8 a step) beside it. Slices counted
    # from the end used to train on 4 and check on 2 without a word.
    text = tmp_path / "short.txt"
    text.write_text("abcdefgh" * 24)  # 192 byte-level tokens
    budget = [*TINY_BUDGET, "--num-tokens", "32", "--data", text, "--no-eval", *extra]
    code, line = run(capsys, "calibrate", tiny_model, "--output", tmp_path / "out", *budget)
    assert code == 1 and "has 6 windows of 32 tokens, too few for" in line
    assert not (tmp_path / "out").exists()


def _inode(path: Path) -> tuple[int, int]:
    status = os.stat(path, follow_symlinks=False)
    return status.st_dev, status.st_ino


@pytest.mark.parametrize("layout", ["full", "overlay"])
def test_the_new_checkpoint_is_on_disk_before_the_previous_one_is_deleted(tiny_model, tmp_path, monkeypatch, layout):
    """So a power loss leaves one of the two whole: every file and folder of the new checkpoint and the rename
    (its parent) are flushed before the old one is deleted; an overlay's links are not followed into the base."""
    output = tiny_checkpoint(tiny_model, tmp_path / "out", layout)
    events: list[tuple[int, int] | str] = []  # the inode of each fsync, the name of each deleted tree
    fsync, rmtree = os.fsync, shutil.rmtree

    def recording_fsync(fd: int) -> None:
        status = os.fstat(fd)
        events.append((status.st_dev, status.st_ino))
        fsync(fd)

    def recording_rmtree(path, *args, **kwargs) -> None:
        events.append(Path(path).name)
        rmtree(path, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(shutil, "rmtree", recording_rmtree)
    tiny_checkpoint(tiny_model, output, layout)
    deleted = next(i for i, e in enumerate(events) if str(e).startswith(".out.vllm-spon-old."))
    written = [output, *output.rglob("*")]
    assert {_inode(p) for p in written if not p.is_symlink()} | {_inode(tmp_path)} <= set(events[:deleted])
    assert (layout == "overlay") == any(p.is_symlink() for p in written)
    assert not {_inode(p) for p in tiny_model.rglob("*")} & set(events)
