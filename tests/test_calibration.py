"""`vllm-spon calibrate` / `eval` on the real example model, and the pipeline's refusals of bad input."""

import json
import math
import subprocess
import sys

import pytest

from vllm_spon.format.checkpoint import load_checkpoint

CLI = [sys.executable, "-m", "vllm_spon.cli"]
SMALL_BUDGET = ["--num-tokens", "2048", "--window", "128", "--steps", "30", "--lr", "2e-3", "--windows-per-step",
                "2", "--eval-windows", "2"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_calibrated_example_model_beats_teal_on_held_out_text(spon_checkpoint_dir, tmp_path):
    ckpt = load_checkpoint(spon_checkpoint_dir)
    assert ckpt.config.method == "spon" and len(ckpt.biases) == 30 * 7
    assert ckpt.config.achieved_sparsity == pytest.approx(0.5, abs=0.01)
    # The default allocation (greedy-input) varies sparsity between a block's inputs but keeps one threshold
    # per input, so every fused vLLM layer (qkv_proj, gate_up_proj) takes one.
    assert ckpt.config.calibration.allocation == "greedy-input"
    by_input: dict[str, set[float]] = {}
    for module, threshold in ckpt.config.thresholds.items():
        by_input.setdefault(ckpt.family.site(module), set()).add(threshold)
    assert all(len(t) == 1 for t in by_input.values())
    achieved = ckpt.config.module_sparsity.values()
    assert max(achieved) - min(achieved) > 0.2  # uniform allocation keeps every module within ~0.02 of 0.5
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
        (["--sparsity", "0.995"], "use --allocation uniform"),
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


def test_site_choice_drops_the_layers_whose_biases_hurt(tiny_llama_dir):
    """Biases that hurt (large, on layer 1) are zeroed; harmless ones (layer 0) are kept as they are."""
    import torch
    from transformers import AutoModelForCausalLM

    from vllm_spon.calibration.site_choice import choose_sites
    from vllm_spon.calibration.sparse_model import SparseModel

    model = SparseModel(AutoModelForCausalLM.from_pretrained(tiny_llama_dir))
    thresholds = dict.fromkeys(model.linears, 0.01)
    generator = torch.Generator().manual_seed(0)
    model.fused_biases = {name: (torch.zeros(linear.out_features) if model.family.layer_index(name) == 0 else
                                 5 * torch.randn(linear.out_features, generator=generator))
                          for name, linear in model.linears.items()}
    kept = {n: b for n, b in model.fused_biases.items() if model.family.layer_index(n) == 0}
    choice = choose_sites(model, torch.randint(0, 128, (4, 32), generator=generator), thresholds, thresholds)
    assert choice.dropped_layers == (1,) and choice.keeps_any
    assert choice.chosen < choice.spon and choice.chosen == pytest.approx(choice.teal)
    for name, bias in model.fused_biases.items():
        assert torch.equal(bias, kept[name]) if name in kept else not bias.any(), name


def test_spon_worse_than_teal_on_the_check_writes_plain_teal(tiny_model, tmp_path, monkeypatch):
    """Training that only hurts (stubbed: large vectors) yields a valid TEAL checkpoint with TEAL's own
    thresholds and no biases, never a SPON one worse than TEAL; training never saw the check windows."""
    from vllm_spon.calibration import pipeline
    from vllm_spon.calibration.data import DEFAULT_CALIBRATION_DATA, load_text, token_windows
    from vllm_spon.calibration.sparse_model import load_tokenizer

    data = tmp_path / "text.txt"
    data.write_text(load_text(DEFAULT_CALIBRATION_DATA)[:4000])
    seen = {}

    def harmful_training(model, windows, config, log, between_rounds=None):
        seen["windows"] = windows
        for vector in model.init_vectors(config.bias_space):
            vector.data.fill_(3.0)
        return []

    monkeypatch.setattr(pipeline, "train_spon", harmful_training)
    output = pipeline.calibrate(pipeline.CalibrationArgs(
        model=tiny_model, output=tmp_path / "ckpt", sparsity=0.5, data=str(data), num_tokens=256, window=32,
        steps=2, eval_data="builtin:persuasion", eval_windows=1, eval_window=32, check_windows=4))
    every = token_windows(load_tokenizer(tiny_model), load_text(str(data)), 32, None)
    assert seen["windows"].equal(every[:-4])
    ckpt = load_checkpoint(output)
    config = ckpt.config
    assert config.method == "teal" and config.bias_space is None and not ckpt.biases
    assert config.thresholds == config.teal_thresholds and config.calibration.steps == 2
    assert config.perplexity.spon == config.perplexity.teal
    assert config.perplexity.spon_sparsity == config.perplexity.teal_sparsity


def test_hidden_weight_adds_the_hidden_state_term_to_the_kl(tiny_llama_dir):
    """With --hidden-weight w the first step's loss is the KL plus w times the normalised hidden-state MSE of
    the same batch (both windows, so the order does not matter); the MSE is positive for a sparse student."""
    import torch
    from transformers import AutoModelForCausalLM

    from vllm_spon.calibration.sparse_model import SparseModel
    from vllm_spon.calibration.spon_training import TrainConfig, hidden_alignment, train_spon

    model = SparseModel(AutoModelForCausalLM.from_pretrained(tiny_llama_dir))
    model.set_thresholds(dict.fromkeys(model.linears, 0.05))
    windows = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    kl_only = train_spon(model, windows, TrainConfig(steps=1, windows_per_step=2))[0]
    model.init_vectors("output")
    with torch.no_grad(), model.use("dense"):
        _, teacher = model.logits_and_hidden(windows)
    with torch.no_grad(), model.use("spon"):
        _, student = model.logits_and_hidden(windows)
    term = hidden_alignment(teacher, student).item()
    assert len(teacher) == len(model.decoder_layers()) + 1 and term > 1e-4
    with_hidden = train_spon(model, windows, TrainConfig(steps=1, windows_per_step=2, hidden_weight=2.0))[0]
    assert with_hidden == pytest.approx(kl_only + 2.0 * term, rel=1e-4)


def test_vector_decay_shrinks_the_vectors_and_adds_its_penalty_to_the_loss(tiny_llama_dir):
    """--vector-decay d adds d * sum ||v||^2 to the loss: the same training with it ends with smaller vectors
    than without; the first step (zero vectors) has no penalty; the penalty is the sum of squared norms."""
    import torch
    from transformers import AutoModelForCausalLM

    from vllm_spon.calibration.sparse_model import SparseModel
    from vllm_spon.calibration.spon_training import TrainConfig, train_spon, vector_penalty

    model = SparseModel(AutoModelForCausalLM.from_pretrained(tiny_llama_dir))
    model.set_thresholds(dict.fromkeys(model.linears, 0.05))
    windows = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    norms, losses = {}, {}
    for decay in (0.0, 1.0):
        losses[decay] = train_spon(model, windows, TrainConfig(steps=8, vector_decay=decay))
        norms[decay] = vector_penalty(list(model.vectors.values())).item()
    assert norms[0.0] > 0 and norms[1.0] < 0.8 * norms[0.0]
    assert losses[1.0][0] == pytest.approx(losses[0.0][0], rel=1e-6)  # zero vectors: no penalty yet
    params = model.init_vectors("output")
    with torch.no_grad():
        for p in params:
            p.fill_(0.01)
    assert vector_penalty(params).item() == pytest.approx(sum(p.numel() for p in params) * 1e-4, rel=1e-5)


@pytest.mark.parametrize("quantization", ["none", "fp8"])
def test_bf16_training_on_weight_copies_is_autocast_training_bit_for_bit(tiny_llama_dir, monkeypatch, quantization):
    """bf16 training copies the block weights to bf16 once instead of autocast casting them on every call: the
    same losses and vectors, the model's own weights back for the refit between rounds and after training, and
    the casting path where the copies would not fit."""
    import torch
    from transformers import AutoModelForCausalLM

    from vllm_spon.calibration import spon_training
    from vllm_spon.calibration.sparse_model import SparseModel
    from vllm_spon.calibration.spon_training import TrainConfig, train_spon

    model = SparseModel(AutoModelForCausalLM.from_pretrained(tiny_llama_dir))
    model.quantize(quantization)
    model.set_thresholds(dict.fromkeys(model.linears, 0.05))
    weights = {name: linear.weight for name, linear in model.linears.items()}
    windows = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    dtypes_between_rounds: list[set[torch.dtype]] = []

    def refit() -> None:  # what the pipeline's refit sees: float32 weights, a float32 forward that runs
        dtypes_between_rounds.append({linear.weight.dtype for linear in model.linears.values()})
        with torch.no_grad(), model.use("teal"):
            model.logits(windows)

    config = TrainConfig(steps=4, precision="bf16", rounds=2)
    messages: list[str] = []
    runs = {}
    for free in ("plenty", "none"):
        if free == "none":
            monkeypatch.setattr(spon_training, "free_memory_bytes", lambda _device: 0)
        losses = train_spon(model, windows, config, log=messages.append, between_rounds=refit)
        runs[free] = (losses, [v.detach().clone() for v in model.vectors.values()])
    assert runs["plenty"][0] == runs["none"][0]
    assert all(torch.equal(a, b) for a, b in zip(runs["plenty"][1], runs["none"][1], strict=True))
    assert any("copied to bf16" in m for m in messages) and any("casts the weights" in m for m in messages)
    assert dtypes_between_rounds == [{torch.float32}, {torch.float32}]
    assert all(linear.weight is weights[name] for name, linear in model.linears.items())
    assert all(linear.weight.dtype == torch.float32 for linear in model.linears.values())


def test_calibrate_passes_hidden_weight_to_training(tiny_model, tmp_path, monkeypatch):
    from vllm_spon.calibration import pipeline

    seen = {}

    def record(model, windows, config, log, between_rounds=None):
        seen["config"] = config
        raise pipeline.TrainingError("stop after recording the config")

    monkeypatch.setattr(pipeline, "train_spon", record)
    with pytest.raises(pipeline.TrainingError, match="stop after"):
        pipeline.calibrate(pipeline.CalibrationArgs(
            model=tiny_model, output=tmp_path / "ckpt", sparsity=0.5, num_tokens=256, window=32, steps=2,
            eval_data=None, check_windows=0, hidden_weight=0.5, vector_decay=0.01))
    assert seen["config"].hidden_weight == 0.5 and seen["config"].vector_decay == 0.01


@pytest.mark.parametrize("rounds", [1, 2])
def test_refit_rounds_train_later_rounds_against_refitted_thresholds(tiny_model, tmp_path, monkeypatch, rounds):
    """--refit-rounds 2 refits the thresholds with the vectors in place halfway through training: the second
    half's student runs other thresholds than the first half's (TEAL's own); with 1 round every step runs
    TEAL's."""
    from vllm_spon.calibration import pipeline
    from vllm_spon.calibration.data import DEFAULT_CALIBRATION_DATA, load_text

    data = tmp_path / "text.txt"
    data.write_text(load_text(DEFAULT_CALIBRATION_DATA)[:4000])
    seen: list[dict[str, float]] = []
    train = pipeline.train_spon

    def recording(model, windows, config, log, between_rounds=None):
        forward = model.logits_and_hidden

        def spy(input_ids, hidden=True):
            if model.mode == "spon":
                seen.append({m: float(t) for m, t in model.thresholds.items()})
            return forward(input_ids, hidden)

        monkeypatch.setattr(model, "logits_and_hidden", spy)
        return train(model, windows, config, log, between_rounds)

    monkeypatch.setattr(pipeline, "train_spon", recording)
    output = pipeline.calibrate(pipeline.CalibrationArgs(
        model=tiny_model, output=tmp_path / "ckpt", sparsity=0.5, data=str(data), num_tokens=256, window=32,
        steps=4, eval_data=None, check_windows=0, refit_rounds=rounds))
    teal = load_checkpoint(output).config.teal_thresholds
    assert len(seen) == 4 and seen[0] == seen[1] == teal
    assert (seen[2] == seen[3] == teal) if rounds == 1 else (seen[2] == seen[3] != teal)


def test_builtin_mixed_interleaves_novel_code_and_prose_without_the_eval_texts():
    """Every slice of builtin:mixed (statistics come from its start, check windows from its end) holds more
    than the novel; neither evaluation text is in it."""
    from pydoc_data.topics import topics

    from vllm_spon.calibration.data import load_text

    text = load_text("builtin:mixed")
    head, tail = text[:len(text) // 10], text[-len(text) // 10:]
    for part in (head, tail):
        assert "def " in part and "Elinor" in part
    assert "PYTHON SOFTWARE FOUNDATION LICENSE" in text
    assert "Anne Elliot" not in text and topics["assert"][:200] not in text
