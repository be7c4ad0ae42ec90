"""Helpers of the vLLM plugin tests: SPON checkpoints whose reference tokens are well defined, the
reference's tokens and log-probabilities, a tensor-parallel-friendly copy of SmolLM2, engine settings for the
2-core CPU machines.

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
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from vllm_spon.calibration.checkpoint import load_checkpoint, make_checkpoint
from vllm_spon.calibration.sparse_model import SparseModel, sparsifiable_linears
from vllm_spon.server import CPU_ENGINE_ARGS, CPU_ENV

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
# Engine settings for the CPU build on these machines (the default memory fraction does not fit).
ENGINE_KWARGS = {**CPU_ENGINE_ARGS, "enforce_eager": True, "max_model_len": 512, "seed": 0}


def load_hf(model_dir: str | os.PathLike):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def tokenize(model_dir: str | os.PathLike, prompts: list[str]) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [tokenizer(p)["input_ids"] for p in prompts]


@torch.no_grad()
def quantile_thresholds(model, input_ids: torch.Tensor, sparsity: dict[str, float]) -> dict[str, float]:
    """Per module, the magnitude quantile of its dense input that zeroes `sparsity[projection]` of it."""
    inputs: dict[str, torch.Tensor] = {}
    hooks = [
        linear.register_forward_pre_hook(lambda _m, args, name=name: inputs.__setitem__(name, args[0].abs()))
        for name, linear in sparsifiable_linears(model).items()
    ]
    try:
        model(input_ids=input_ids, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return {
        name: float(torch.quantile(x.flatten().float(), sparsity[name.rsplit(".", 1)[-1]]))
        for name, x in inputs.items()
    }


def random_biases(model, scale: float, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(linear.out_features, generator=generator) * scale
        for name, linear in sparsifiable_linears(model).items()
    }


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
    """A full SPON checkpoint of `model_dir`: quantile thresholds (SPARSITY) on every linear of
    `sparse_layers`, zero elsewhere, made well conditioned on the prompts; random fused biases on all
    linears. With the reference's tokens and log-probabilities; cached under `output` by its parameters."""
    key = json.dumps(
        [str(model_dir), prompts, sparse_layers, margin, bias_scale, max_tokens, SPARSITY, CALIBRATION_TEXT]
    )
    case_dir = output / hashlib.sha256(key.encode()).hexdigest()[:12]
    record = case_dir / "reference.json"
    if record.is_file():
        return ReferenceCase(**json.loads(record.read_text()))
    model = load_hf(model_dir)
    sparse = SparseModel(model)
    calibration_ids = torch.tensor(tokenize(model_dir, [CALIBRATION_TEXT]))
    thresholds = quantile_thresholds(model, calibration_ids, SPARSITY)
    sparse.set_thresholds({m: t if int(m.split(".")[2]) in sparse_layers else 0.0 for m, t in thresholds.items()})
    sparse.fused_biases = random_biases(model, bias_scale)
    prompt_ids = tokenize(model_dir, prompts)
    tokens = well_conditioned(sparse, prompt_ids, max_tokens, margin)
    sequences = [p + t for p, t in zip(prompt_ids, tokens, strict=True)]
    logprobs = {}
    for mode in ("spon", "dense"):
        with sparse.use(mode):
            logprobs[mode] = [token_logprobs(sparse, s) for s in sequences]
    shutil.rmtree(case_dir, ignore_errors=True)
    make_checkpoint(
        model_dir, case_dir / "checkpoint", {n: float(t) for n, t in sparse.thresholds.items()}, sparse.fused_biases
    )
    case = ReferenceCase(str(case_dir / "checkpoint"), prompt_ids, tokens, logprobs["spon"], logprobs["dense"])
    record.write_text(json.dumps(asdict(case)))
    return case


@torch.no_grad()
def dense_greedy(model_dir: Path, prompts: list[str], max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    sparse = SparseModel(load_hf(model_dir))
    with sparse.use("dense"):
        return greedy(sparse, tokenize(model_dir, prompts), max_tokens)


EXTRA_HEADS = 3  # SmolLM2's 9 heads + 3 = 12: splits over 2 ranks, and 576 stays a multiple of the count


def _even_heads(tensor: torch.Tensor, kv_heads: int, heads: int, dim: int) -> torch.Tensor:
    """Rows of a k/v projection (or bias) per query head: the key/value head each query head reads,
    then zero rows for the extra heads."""
    per_head = tensor.reshape(kv_heads, dim, *tensor.shape[1:])
    rows = per_head[[h * kv_heads // heads for h in range(heads)]].reshape(heads * dim, *tensor.shape[1:])
    return torch.cat([rows, rows.new_zeros(EXTRA_HEADS * dim, *tensor.shape[1:])])


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([tensor, tensor.new_zeros(rows, *tensor.shape[1:])])


def write_even_heads_model(output: Path, base: Path) -> Path:
    """SmolLM2 with 3 more attention heads that are exactly zero (query, key, value and output weights)
    and one key/value head per query head (copies of the head each reads): 12 heads split over 2
    tensor-parallel ranks, SmolLM2's 9 query and 3 key/value heads do not. It computes what SmolLM2 does."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig

    if (output / "model.safetensors").is_file():
        return output
    config = AutoConfig.from_pretrained(base)
    heads, kv_heads, dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    weights = load_file(base / "model.safetensors")
    for i in range(config.num_hidden_layers):
        attn = f"model.layers.{i}.self_attn."
        weights[attn + "q_proj.weight"] = _pad_rows(weights[attn + "q_proj.weight"], EXTRA_HEADS * dim)
        weights[attn + "o_proj.weight"] = _pad_rows(weights[attn + "o_proj.weight"].t(), EXTRA_HEADS * dim).t()
        for name in ("k_proj.weight", "v_proj.weight"):
            weights[attn + name] = _even_heads(weights[attn + name], kv_heads, heads, dim)
    weights = {name: w.contiguous() for name, w in weights.items()}
    config.num_attention_heads = config.num_key_value_heads = heads + EXTRA_HEADS
    tmp = output.with_name(output.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config.save_pretrained(tmp)
    save_file(weights, tmp / "model.safetensors", metadata={"format": "pt"})
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(base / name, tmp / name)
    shutil.rmtree(output, ignore_errors=True)
    tmp.rename(output)
    return output


def even_heads_checkpoint(case: ReferenceCase, model_dir: Path, output: Path) -> Path:
    """The case's checkpoint carried over to `write_even_heads_model`'s model: same thresholds, biases laid
    out per head like the weights. Its reference tokens are the case's."""
    from transformers import AutoConfig

    if (output / "spon").is_dir():
        return output
    checkpoint = load_checkpoint(case.checkpoint)
    config = AutoConfig.from_pretrained(case.checkpoint)
    heads, kv_heads, dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    biases = {}
    for module, bias in checkpoint.biases.items():
        if module.endswith((".k_proj", ".v_proj")):
            bias = _even_heads(bias, kv_heads, heads, dim)
        elif module.endswith(".q_proj"):
            bias = _pad_rows(bias, EXTRA_HEADS * dim)
        biases[module] = bias
    return make_checkpoint(model_dir, output, checkpoint.config.thresholds, biases)


@contextmanager
def engine(model: str, **kwargs):
    """A vLLM engine (`LLM`) on the CPU build with the settings above; shut down on exit."""
    from vllm import LLM

    for key, value in CPU_ENV.items():
        os.environ.setdefault(key, value)
    llm = LLM(model, **{**ENGINE_KWARGS, **kwargs})
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm


def generate_tokens(llm, prompts: list[list[int]], max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def prompt_logprobs(llm, sequences: list[list[int]]) -> list[list[float]]:
    """vLLM's log p of each token of each sequence after the first (teacher forcing, one prefill each)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=s) for s in sequences], params, use_tqdm=False)
    return [
        [o.prompt_logprobs[j][s[j]].logprob for j in range(1, len(s))] for s, o in zip(sequences, outputs, strict=True)
    ]


def spon_state(model) -> dict[str, dict]:
    """In a worker (`LLM.apply_model`): each SPON layer's method, thresholds and fused bias on this rank."""
    from vllm_spon.linear_method import SponLinearMethod

    state = {}
    for name, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        if isinstance(method, SponLinearMethod):
            bias = getattr(module, "spon_bias", None)
            state[name] = {
                "method": f"{type(method).__name__}({type(method.inner).__name__})",
                "thresholds": module.spon_threshold.tolist(),
                "bias": None if bias is None else bias.float().tolist(),
                "adds_bias": method.adds_bias,
            }
    return state


def worker_additional_config(worker) -> dict:
    """In a worker (`LLM.collective_rpc`): the config that vLLM's compile-cache key hashes."""
    return dict(worker.vllm_config.additional_config)


FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
ROW_PARALLEL = ("o_proj", "down_proj")


def _vllm_layer(module: str) -> str:
    """`...self_attn.k_proj` -> `...self_attn.qkv_proj`: the vLLM layer holding a Hugging Face module."""
    parent, projection = module.rsplit(".", 1)
    return parent + "." + next((f for f, parts in FUSED.items() if projection in parts), projection)


def expected_state(checkpoint_dir: str, tp_rank: int, tp_size: int) -> dict[str, dict]:
    """What each vLLM layer of rank `tp_rank` should hold, computed from the checkpoint by hand: per
    segment the module's threshold; the bias rows of this rank (column parallel: its slice of each fused
    module, row parallel: all of it, added on rank 0 only)."""
    checkpoint = load_checkpoint(checkpoint_dir)
    state = {}
    for name in sorted({_vllm_layer(m) for m in checkpoint.thresholds}):
        parent, kind = name.rsplit(".", 1)
        members = [f"{parent}.{p}" for p in FUSED.get(kind, (kind,))]
        biases = [checkpoint.biases[m] for m in members]
        if kind not in ROW_PARALLEL:
            biases = [b.chunk(tp_size)[tp_rank] for b in biases]
        state[name] = {
            "thresholds": [checkpoint.config.thresholds[m] for m in members],
            "bias": torch.cat(biases).tolist(),
            "adds_bias": kind not in ROW_PARALLEL or tp_rank == 0,
        }
    return state
