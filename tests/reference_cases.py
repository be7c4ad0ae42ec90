"""What the reference sparse model computes on the test prompts, with thresholds moved so that the answer
is well defined: the SPON checkpoints (and their expected tokens and log-probabilities) that the vLLM tests
compare against.

Why thresholds are nudged (`well_conditioned`) and only a few layers sparsified for exact-token tests: two
correct fp32 implementations of the same sparse model differ by rounding. Measured between vLLM's CPU build
and the Hugging Face reference on SmolLM2: inputs near a threshold t differ by 1e-5 t typically, up to
9e-5 t (attention and matmul summation orders). An input that close to its threshold is kept by one and
zeroed by the other, a discrete change that moved later logits by up to a nat; with quantile thresholds on
all 210 linears this happened about once per 20 tokens, so exact token equality is not a well-posed test
there. It is on sequences where no input lies within 1e-4 t of its threshold; with few sparsified layers
such thresholds exist close to the quantiles, and `well_conditioned` finds them.
"""

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from vllm_spon.calibration.handmade import write_handmade
from vllm_spon.calibration.sparse_model import SparseModel, load_hf_model, load_tokenizer
from vllm_spon.calibration.thresholds import fit_thresholds

# Differ per projection so that fused layers get a different threshold per segment.
SPARSITY = {
    "q_proj": 0.5,
    "k_proj": 0.4,
    "v_proj": 0.6,
    "o_proj": 0.5,
    "gate_proj": 0.5,
    "up_proj": 0.45,
    "down_proj": 0.55,
}
CALIBRATION_TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
    "want of a wife. However little known the feelings or views of such a man may be on his first entering "
    "a neighbourhood, this truth is so well fixed in the minds of the surrounding families."
)
# Prompts whose greedy continuation survives 50% sparsity: with them, nudging the thresholds converges.
SPARSE_PROMPTS = [
    "1, 2, 3, 4, 5, 6, 7,",
    "A, B, C, D, E, F, G,",
    "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog. The quick",
    "Roses are red, violets are blue. Roses are red, violets are blue. Roses",
    "10, 20, 30, 40, 50,",
]
DENSE_PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "The best way to learn a language is",
    "Water boils at a temperature of",
]
MAX_TOKENS = 8


def tokenize(model_dir: str | os.PathLike, prompts: list[str]) -> list[list[int]]:
    tokenizer = load_tokenizer(model_dir)
    return [tokenizer(p)["input_ids"] for p in prompts]


def random_biases(sparse: SparseModel, scale: float, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(linear.out_features, generator=generator) * scale
            for name, linear in sparse.linears.items()}


@torch.no_grad()
def greedy(sparse: SparseModel, prompts: list[list[int]], max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    """Greedy tokens of the reference in its current mode (Hugging Face generation, no stop at EOS)."""
    outputs = []
    for prompt in prompts:
        out = sparse.model.generate(
            torch.tensor([prompt]),
            do_sample=False,
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
        for scores in out.scores:
            top2 = scores[0].topk(2).values
            assert top2[0] - top2[1] > 1e-4, f"prompt {prompt}: near-tie of the top logits ({top2.tolist()})"
        outputs.append(out.sequences[0, len(prompt) :].tolist())
    return outputs


@torch.no_grad()
def token_logprobs(sparse: SparseModel, sequence: list[int]) -> list[float]:
    """log p(sequence[j] | sequence[:j]) for j >= 1, as the reference computes it (one full forward)."""
    logprobs = torch.log_softmax(sparse.logits(torch.tensor([sequence]))[0].double(), dim=-1)
    return [float(logprobs[j - 1, sequence[j]]) for j in range(1, len(sequence))]


def _nearest_free_threshold(values: torch.Tensor, t: float, margin: float) -> float:
    """The middle m of the gap between sorted values nearest to t with both ends more than `margin * m` away
    (the fewest inputs crossed; 2.5 rather than 2 half-gaps: m itself is rounded to float32)."""
    vals = values.sort().values
    mids = (vals[1:] + vals[:-1]) / 2
    free = (vals[1:] - vals[:-1]) >= 2.5 * margin * mids
    mids = mids[free]
    return float(mids[(mids - t).abs().argmin()])


@torch.no_grad()
def _move_thresholds_off_inputs(sparse: SparseModel, sequences: list[list[int]], margin: float) -> int:
    """One batched forward over the sequences (right-padded: causal attention keeps real positions exact) in
    which each module, before thresholding, moves its threshold off its inputs; returns how many moved.
    Modules run in forward order, so each sees inputs computed with the final thresholds before it."""
    length = max(map(len, sequences))
    ids = torch.tensor([s + [0] * (length - len(s)) for s in sequences])
    real = torch.tensor([[i < len(s) for i in range(length)] for s in sequences])
    moved = 0

    def hook(name: str):
        def move(_module, args):
            nonlocal moved
            values = args[0].abs().float()[real].flatten()
            t = float(sparse.thresholds[name])
            if (values - t).abs().min() < margin * t:
                sparse.thresholds[name].fill_(_nearest_free_threshold(values, t, margin))
                moved += 1

        return move

    hooks = [linear.register_forward_pre_hook(hook(n), prepend=True) for n, linear in sparse.linears.items()]
    try:
        sparse.logits(ids)
    finally:
        for h in hooks:
            h.remove()
    return moved


def well_conditioned(
    sparse: SparseModel, prompts: list[list[int]], max_tokens: int = MAX_TOKENS, margin: float = 3e-5, sweeps: int = 6
) -> list[list[int]]:
    """Move the reference's thresholds until no input on the prompts and their greedy continuations lies
    within `margin * t` of its threshold t; return those greedy tokens.

    A threshold too close to an input moves to the middle of the nearest wide enough gap between the
    observed magnitudes. That crosses a few inputs, which can change the continuation: repeat until it does not.
    """
    with sparse.use("spon"):
        for _ in range(sweeps):
            tokens = greedy(sparse, prompts, max_tokens)
            sequences = [p + t[:-1] for p, t in zip(prompts, tokens, strict=True)]
            if not _move_thresholds_off_inputs(sparse, sequences, margin):
                return tokens
    raise AssertionError(f"thresholds still within {margin} of an input after {sweeps} sweeps: other prompts")


@dataclass
class ReferenceCase:
    """A SPON checkpoint and what the reference sparse model computes on the test prompts."""

    checkpoint: str
    prompts: list[list[int]]
    tokens: list[list[int]]  # greedy continuations
    logprobs: list[list[float]]  # log p of each token of prompt + continuation after the first, in mode spon
    dense_logprobs: list[list[float]]  # the same in mode dense

    @property
    def sequences(self) -> list[list[int]]:
        return [p + t for p, t in zip(self.prompts, self.tokens, strict=True)]


def reference_case(
    model_dir: Path,
    output: Path,
    prompts: list[str],
    sparse_layers: tuple[int, ...],
    margin: float = 1e-4,
    bias_scale: float = 0.02,
    max_tokens: int = MAX_TOKENS,
) -> ReferenceCase:
    """A full SPON checkpoint of `model_dir`: TEAL thresholds (SPARSITY, on CALIBRATION_TEXT) on every linear of
    `sparse_layers`, zero elsewhere, made well conditioned on the prompts; random fused biases on all
    linears. With the reference's tokens and log-probabilities; cached under `output` by its parameters."""
    key = json.dumps(
        [str(model_dir), prompts, sparse_layers, margin, bias_scale, max_tokens, SPARSITY, CALIBRATION_TEXT, "fit"]
    )
    case_dir = output / hashlib.sha256(key.encode()).hexdigest()[:12]
    record = case_dir / "reference.json"
    if record.is_file():
        return ReferenceCase(**json.loads(record.read_text()))
    sparse = SparseModel(load_hf_model(model_dir))
    family = sparse.family
    calibration_ids = torch.tensor(tokenize(model_dir, [CALIBRATION_TEXT]))
    module_sparsity = {m: SPARSITY[family.parse(m)[1].name] for m in sparse.linears}
    thresholds = fit_thresholds(sparse, calibration_ids, module_sparsity, stats="dense")
    sparse.set_thresholds({m: t if family.layer_index(m) in sparse_layers else 0.0 for m, t in thresholds.items()})
    sparse.fused_biases = random_biases(sparse, bias_scale)
    prompt_ids = tokenize(model_dir, prompts)
    tokens = well_conditioned(sparse, prompt_ids, max_tokens, margin)
    sequences = [p + t for p, t in zip(prompt_ids, tokens, strict=True)]
    logprobs = {}
    for mode in ("spon", "dense"):
        with sparse.use(mode):
            logprobs[mode] = [token_logprobs(sparse, s) for s in sequences]
    shutil.rmtree(case_dir, ignore_errors=True)
    write_handmade(
        model_dir, case_dir / "checkpoint", {n: float(t) for n, t in sparse.thresholds.items()}, sparse.fused_biases
    )
    case = ReferenceCase(str(case_dir / "checkpoint"), prompt_ids, tokens, logprobs["spon"], logprobs["dense"])
    record.write_text(json.dumps(asdict(case)))
    return case


@torch.no_grad()
def dense_greedy(model_dir: Path, prompts: list[str], max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    sparse = SparseModel(load_hf_model(model_dir))
    with sparse.use("dense"):
        return greedy(sparse, tokenize(model_dir, prompts), max_tokens)
