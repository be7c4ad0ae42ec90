"""Every supported model family on vLLM's CPU build, and the refusal of the others.

Per family: a tiny random-weight model made with transformers' own config class (seeded), calibrated with a
tiny budget by the real pipeline, its thresholds moved off nearby inputs (`well_conditioned`: reference_cases
says why exact tokens need it), then served by vLLM with `load_format="spon"` in fp32: greedy tokens equal to
the reference sparse model's, log-probabilities equal to rounding; once with tensor parallel 2 (Qwen2: the
fused SPON bias on top of the layer's own qkv bias, both split over the ranks). An architecture outside the
table (GPT-2, mixture-of-experts models) stops calibration with one line and writes nothing.

Model sizes: the CPU attention kernel takes head_dim 32, 64, 80, ... only (16 is refused at start-up), and
4 query / 2 key-value heads split over 2 ranks. The SmolLM2 tokenizer (vocabulary 49152) is copied in.
One engine at a time; each starts in ~25 s on 2 idle cores.
"""

import itertools
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.reference_cases import DENSE_PROMPTS, token_logprobs, tokenize, well_conditioned
from tests.vllm_probes import engine, expected_state, generate_tokens, prompt_logprobs, spon_state
from vllm_spon.calibration.handmade import write_handmade
from vllm_spon.calibration.pipeline import CalibrationArgs, calibrate
from vllm_spon.calibration.sparse_model import SparseModel, load_hf_model
from vllm_spon.calibration.thresholds import block_inputs, block_tail_output, collect_samples
from vllm_spon.format.architectures import SUPPORTED_ARCHITECTURES
from vllm_spon.format.checkpoint import load_checkpoint

COMMON = dict(
    vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    # Not the default 0.02: larger logits keep the greedy top-2 gaps well above `greedy`'s 1e-4 tie check.
    initializer_range=0.1,
)
PROMPTS = DENSE_PROMPTS[:3]
LINEARS_PER_LAYER = 4  # vLLM layers of a decoder block: qkv_proj, o_proj, gate_up_proj, down_proj


@dataclass(frozen=True)
class FamilySpec:
    """How to make a tiny model of one family with transformers' own classes."""

    config_class: str
    model_class: str  # also the `architectures` entry of its config.json
    config: dict = field(default_factory=dict)
    # Gemma multiplies embeddings by sqrt(hidden) and ties the LM head to them: at random init the residual
    # stream is the input embedding and every continuation repeats the prompt's last token. Smaller
    # embeddings let the layers decide the tokens.
    embedding_scale: float = 1.0


SPECS = {
    "llama": FamilySpec("LlamaConfig", "LlamaForCausalLM"),
    # A window shorter than the test sequences, so that attention differs from Llama's.
    "mistral": FamilySpec("MistralConfig", "MistralForCausalLM", {"sliding_window": 8}),
    "qwen2": FamilySpec("Qwen2Config", "Qwen2ForCausalLM"),  # q/k/v biases
    # q/k norms; head_dim 64 with hidden 128 and 4 heads: q_proj is 128 -> 256, o_proj 256 -> 128.
    "qwen3": FamilySpec("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 64}),
    # (1 + w) norms, post-norms, GELU, scaled and tied embeddings, final logit soft-cap, sliding layers.
    # Attention soft-capping off: with any cap (Gemma 2's 50, or 1e4, where tanh is linear) the CPU attention
    # kernel is not fp32 exact: dense log-probabilities 6e-4 off Hugging Face's, 2e-6 without a cap.
    "gemma2": FamilySpec(
        "Gemma2Config", "Gemma2ForCausalLM",
        {"head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 8, "attn_logit_softcapping": None},
        embedding_scale=0.2,
    ),
    "gemma3": FamilySpec(
        "Gemma3TextConfig", "Gemma3ForCausalLM",
        {"head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 8,
         "layer_types": ["sliding_attention", "full_attention"]},
        embedding_scale=0.2,
    ),
    "phi3": FamilySpec("Phi3Config", "Phi3ForCausalLM"),  # qkv_proj and gate_up_proj fused in the checkpoint
    "granite": FamilySpec(
        "GraniteConfig", "GraniteForCausalLM",
        # logits_scaling divides the logits: 8 (Granite 3's) flattened them into near-ties of the top two.
        {"embedding_multiplier": 12.0, "logits_scaling": 0.5, "residual_multiplier": 0.22,
         "attention_multiplier": 0.1},
    ),
}
TP2_FAMILY = "qwen2"


def write_model(spec: FamilySpec, path: Path, tokenizer_from: Path | None = None, common: dict = COMMON) -> Path:
    """A seeded random model of `spec` saved as safetensors. Norm weights and biases get noise: they start
    at constants (ones, zeros) that would hide a wrong norm formula or a dropped bias."""
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, spec.config_class)(**{**common, **spec.config})
    model = getattr(transformers, spec.model_class)(config).to(torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                param.add_(torch.randn_like(param) * 0.2)
        model.get_input_embeddings().weight.mul_(spec.embedding_scale)
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer_from is not None:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tokenizer_from / name, path / name)
    return path


def decoder_linears(model: nn.Module) -> set[str]:
    """Every `nn.Linear` inside the decoder layers, by module name: what a checkpoint must sparsify."""
    return {name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.startswith("model.layers.")}


@dataclass
class FamilyCase:
    """A calibrated, well-conditioned checkpoint of one family and what the reference computes on it."""

    name: str
    served: Path  # the checkpoint vLLM serves: calibrated biases, thresholds moved off the prompts' inputs
    prompts: list[list[int]]
    tokens: list[list[int]]
    logprobs: list[list[float]]  # mode spon
    dense_logprobs: list[list[float]]
    num_layers: int

    @property
    def sequences(self) -> list[list[int]]:
        return [p + t for p, t in zip(self.prompts, self.tokens, strict=True)]


def build_case(name: str, root: Path, tokenizer_from: Path, projections: tuple[str, ...] | None = None) -> FamilyCase:
    """Make, calibrate (a few seconds: 256 tokens, 32-token windows, 4 steps) and condition one family; every
    decoder linear, or only `projections`. No held-out check and no per-layer choice: a random model's
    perplexity on English text (~1e5) says nothing about SPON."""
    model_dir = write_model(SPECS[name], root / "model", tokenizer_from)
    calibrated = calibrate(CalibrationArgs(
        model=model_dir, output=root / "calibrated", sparsity=0.5, layout="overlay", num_tokens=256, window=32,
        steps=4, lr=1e-3, windows_per_step=2, eval_data=None, check_windows=0, train_precision="fp32", device="cpu",
        projections=projections,
    ))
    checkpoint = load_checkpoint(calibrated)
    model = load_hf_model(model_dir)
    if projections is None:
        assert set(checkpoint.thresholds) == decoder_linears(model), "calibration left decoder linears dense"
    sparse = SparseModel(model, checkpoint.config.projections)
    sparse.apply_checkpoint(checkpoint)
    prompts = tokenize(model_dir, PROMPTS)
    tokens = well_conditioned(sparse, prompts, margin=1e-4)
    moved = {m: float(t) for m, t in sparse.thresholds.items()}
    for module, t in checkpoint.config.thresholds.items():  # still the calibration's thresholds, nearly
        assert moved[module] == pytest.approx(t, rel=0.05), module
    sequences = [p + t for p, t in zip(prompts, tokens, strict=True)]
    logprobs = {}
    for mode in ("spon", "dense"):
        with sparse.use(mode):
            logprobs[mode] = [token_logprobs(sparse, s) for s in sequences]
    served = write_handmade(model_dir, root / "served", moved, sparse.fused_biases, layout="overlay",
                            projections=checkpoint.config.projections)
    return FamilyCase(name, served, prompts, tokens, logprobs["spon"], logprobs["dense"],
                      model.config.num_hidden_layers)


@pytest.fixture(scope="session")
def family_cases(tmp_path_factory, example_model_dir):
    """Builds each family's case once per session (the TP2 test reuses its family's)."""
    cases: dict[str, FamilyCase] = {}

    def get(name: str) -> FamilyCase:
        if name not in cases:
            cases[name] = build_case(name, tmp_path_factory.mktemp(f"family-{name}"), example_model_dir)
        return cases[name]

    return get


@pytest.fixture(scope="module", autouse=True)
def _probe_workers():
    """`apply_model(spon_state)` pickles a function into the workers: vLLM does so only if allowed."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        yield


def without_method(state: dict[str, dict]) -> dict[str, dict]:
    return {name: {k: v for k, v in s.items() if k != "method"} for name, s in state.items()}


def test_every_family_of_the_table_has_a_case_here():
    assert sorted(spec.model_class for spec in SPECS.values()) == sorted(SUPPORTED_ARCHITECTURES)


@pytest.mark.parametrize("name", list(SPECS))
def test_greedy_shortcuts_give_the_plain_block_output(name, tmp_path):
    """Greedy allocation's shortcuts (the MLP, the queries and the attention's output projection on the measured
    positions only, the attention's output reused while its thresholds stay) give every block's output as the
    plain forward does, whatever surrounds them in the family (q/k norms, soft-capping, post-norms, residual
    multipliers, fused q/k/v and gate/up), also when attention's thresholds change after an MLP-only change."""
    sparse = SparseModel(load_hf_model(write_model(SPECS[name], tmp_path / "model")))
    windows = torch.randint(0, COMMON["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(0))
    samples = collect_samples(sparse, windows, "dense", 2, 1 << 12)
    inputs = block_inputs(sparse, windows)
    for index, args_kwargs in enumerate(inputs):
        modules = [m for m in sparse.linears if sparse.family.layer_index(m) == index]
        attention = [m for m in modules if ".self_attn." in m]
        mlp = [m for m in modules if ".mlp." in m]
        # Each a change of the one before: MLP only (attention reused), attention only, both, MLP only.
        settings = [dict.fromkeys(modules, 0.3)]
        for changed, sparsity in ((mlp, 0.6), (attention[:1], 0.7), (modules[-2:], 0.1), (mlp[:1], 0.0)):
            settings.append({**settings[-1], **dict.fromkeys(changed, sparsity)})
        outputs = {}
        for shortcuts in (False, True):
            with block_tail_output(sparse, index, *args_kwargs, tail=6, shortcuts=shortcuts) as output:
                outputs[shortcuts] = []
                for sparsity in settings:
                    sparse.set_thresholds({m: samples.threshold(m, s) for m, s in sparsity.items()})
                    outputs[shortcuts].append(output())
        for plain, fast in zip(outputs[False], outputs[True], strict=True):
            torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-6)
        assert all((a - b).abs().max() > 1e-4 for a, b in itertools.pairwise(outputs[False]))


@pytest.mark.slow
@pytest.mark.parametrize("name", [name for name in SPECS if name != TP2_FAMILY])  # that one: with TP 2 below
def test_family_serves_the_reference_sparse_model(name, family_cases):
    case = family_cases(name)
    with engine(str(case.served), load_format="spon") as llm:
        tokens = generate_tokens(llm, case.prompts)
        logprobs = prompt_logprobs(llm, case.sequences)
        [state] = llm.apply_model(spon_state)
    assert tokens == case.tokens
    for ours, spon, dense in zip(logprobs, case.logprobs, case.dense_logprobs, strict=True):
        np.testing.assert_allclose(ours, spon, atol=1e-4)
        assert np.abs(np.subtract(dense, spon)).mean() > 0.05  # sparsity and biases change the model
    assert len(state) == LINEARS_PER_LAYER * case.num_layers
    assert {s["method"] for s in state.values()} == {"SponDenseLinearMethod(UnquantizedLinearMethod)"}
    assert without_method(state) == expected_state(str(case.served), tp_rank=0, tp_size=1)


@pytest.mark.slow
def test_partly_sparsified_fused_layers_serve_the_reference(tmp_path, example_model_dir):
    """`--projections` naming one member of each fused layer (q of q/k/v, up of gate/up): vLLM's fused layers
    then hold [t, 0, 0] and [0, t] with a bias on the sparsified segment only, and give the reference's tokens."""
    case = build_case("llama", tmp_path, example_model_dir, projections=("q_proj", "up_proj", "down_proj"))
    with engine(str(case.served), load_format="spon") as llm:
        tokens = generate_tokens(llm, case.prompts)
        logprobs = prompt_logprobs(llm, case.sequences)
        [state] = llm.apply_model(spon_state)
    assert tokens == case.tokens
    for ours, spon in zip(logprobs, case.logprobs, strict=True):
        np.testing.assert_allclose(ours, spon, atol=1e-4)
    expected = expected_state(str(case.served), tp_rank=0, tp_size=1)
    assert without_method(state) == expected
    assert len(state) == 3 * case.num_layers  # qkv_proj, gate_up_proj, down_proj: o_proj keeps vLLM's method
    qkv = next(s for name, s in expected.items() if name.endswith("qkv_proj"))
    assert qkv["thresholds"][0] > 0 and qkv["thresholds"][1:] == [0.0, 0.0]


@pytest.mark.slow
def test_tensor_parallel_2_serves_the_reference_tokens(family_cases, monkeypatch):
    """Each rank holds its shard of the SPON tensors (and of Qwen2's own qkv biases) and the ranks together
    compute the reference's tokens: Qwen2's exact-token test (the TP 1 path is the other families')."""
    case = family_cases(TP2_FAMILY)
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one core per rank, none held back
    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    with engine(str(case.served), load_format="spon", tensor_parallel_size=2) as llm:
        tokens = generate_tokens(llm, case.prompts)
        logprobs = prompt_logprobs(llm, case.sequences)
        states = llm.apply_model(spon_state)
    assert tokens == case.tokens
    for ours, spon in zip(logprobs, case.logprobs, strict=True):
        np.testing.assert_allclose(ours, spon, atol=1e-4)
    for rank, state in enumerate(states):
        assert without_method(state) == expected_state(str(case.served), tp_rank=rank, tp_size=2), f"rank {rank}"


TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, bos_token_id=0, eos_token_id=0, pad_token_id=0)
UNSUPPORTED = {
    "GPT2LMHeadModel": FamilySpec("GPT2Config", "GPT2LMHeadModel",
                                  {"vocab_size": 256, "n_embd": 64, "n_layer": 2, "n_head": 4,
                                   "bos_token_id": 0, "eos_token_id": 0}),
    # Llama-style attention with experts in place of the MLP: names alone (`mlp.experts.0.gate_proj`) would pass.
    "Qwen2MoeForCausalLM": FamilySpec("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {
        **TINY, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
        "shared_expert_intermediate_size": 64}),
    "MixtralForCausalLM": FamilySpec("MixtralConfig", "MixtralForCausalLM", {
        **TINY, "num_local_experts": 4, "num_experts_per_tok": 2}),
}


@pytest.mark.parametrize("architecture", list(UNSUPPORTED))
def test_unsupported_architecture_is_refused_before_anything_is_written(architecture, tmp_path):
    """The refusal comes first (no tokenizer or data is needed to reach it) in one line that names the
    architecture found and every supported one."""
    model_dir = write_model(UNSUPPORTED[architecture], tmp_path / "model", common={})
    output = tmp_path / "out"
    with pytest.raises(ValueError) as error:
        calibrate(CalibrationArgs(model=model_dir, output=output, sparsity=0.5))
    message = str(error.value)
    assert "\n" not in message
    assert f"architecture {architecture} is not supported" in message
    for spec in SPECS.values():
        assert spec.model_class in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
