"""`vllm-spon calibrate` / `eval` on the real example model, and the pipeline's refusals of bad input."""

import json
import math
import subprocess
import sys

import pytest

from vllm_spon.format.checkpoint import load_checkpoint

CLI = [sys.executable, "-m", "vllm_spon.cli"]
SMALL_BUDGET = ["--num-tokens", "2048", "--window", "128", "--steps", "30", "--lr", "2e-3",
                "--eval-windows", "2"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_calibrated_example_model_beats_teal_on_held_out_text(spon_checkpoint_dir, tmp_path):
    ckpt = load_checkpoint(spon_checkpoint_dir)
    assert ckpt.config.method == "spon" and len(ckpt.biases) == 30 * 7
    assert ckpt.config.achieved_sparsity == pytest.approx(0.5, abs=0.01)
    plot = tmp_path / "thresholds.png"
    result = run_cli("eval", str(spon_checkpoint_dir), "--windows", "4", "--window", "256", "--json",
                     "--plot", str(plot))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["dense_ppl"] < report["spon_ppl"] < report["teal_ppl"]
    assert report["gap_recovered"] > 0.1
    assert report["spon_sparsity"] == pytest.approx(0.5, abs=0.03)
    assert report["calibration_achieved_sparsity"] == ckpt.config.achieved_sparsity
    assert plot.stat().st_size > 10_000


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sparsity", "1.0"], "strictly between 0 and 1"),
        (["--sparsity", "0"], "strictly between 0 and 1"),
        (["--sparsity", "0.5", "--data", "MISSING_DIR"], "neither an existing file or folder"),
        (["--sparsity", "0.5", "--data", "EMPTY"], "holds no text"),
        (["--sparsity", "0.5", "--data", "SHORT"], "too short for"),
    ],
)
def test_bad_input_fails_clearly_and_writes_nothing(example_model_dir, tmp_path, args, message):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "short.txt").write_text("Only a few words here.")
    subst = {"MISSING_DIR": str(tmp_path / "nope"), "EMPTY": str(tmp_path / "empty.txt"),
             "SHORT": str(tmp_path / "short.txt")}
    out = tmp_path / "out"
    result = run_cli("calibrate", str(example_model_dir), "--output", str(out), *SMALL_BUDGET,
                     *[subst.get(a, a) for a in args])
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_missing_model_fails_clearly(tmp_path):
    result = run_cli("calibrate", str(tmp_path / "no-model"), "--sparsity", "0.5", "--output", str(tmp_path / "o"))
    assert result.returncode == 1
    assert "is not a Hugging Face model directory" in result.stderr


def test_nan_loss_stops_training_and_writes_nothing(tiny_llama_dir, tmp_path):
    """A diverging run (absurd learning rate) raises TrainingError before anything is written."""
    import torch
    from transformers import AutoModelForCausalLM

    from vllm_spon.calibration.sparse_model import SparseModel
    from vllm_spon.calibration.spon_training import TrainConfig, TrainingError, train_spon

    model = SparseModel(AutoModelForCausalLM.from_pretrained(tiny_llama_dir))
    model.set_thresholds(dict.fromkeys(model.linears, 0.01))
    for linear in model.linears.values():
        linear.weight.data[0, 0] = math.nan  # a broken model: NaN logits from the first step
    windows = torch.randint(0, 128, (4, 32))
    with pytest.raises(TrainingError, match="loss became nan at step 0"):
        train_spon(model, windows, TrainConfig(steps=3))
