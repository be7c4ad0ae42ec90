"""fp8 weight rounding (calibration/fp8_weights.py) against vLLM's own quantization, bit for bit.

On the CPU build (vLLM 0.32) `ops.scaled_fp8_quant` cannot run (its `_C` ops are argument-less stubs there), so
the references are vLLM's torch implementations of the same steps: `online/fp8.py`'s `_fp8_scale`,
`_fp8_channel_scale` and `_fp8_quant_per_channel` (what `Fp8PerTensorOnlineLinearMethod` and
`Fp8PtpcOnlineLinearMethod` call) and `QuantFP8.forward_native` (input_quant_fp8.py: the torch twin of the static
per-tensor kernel `Fp8PerTensorOnlineLinearMethod` runs). Where CUDA is available the CUDA kernels themselves
are compared too (vLLM 0.26's online path calls them with `scale=None`).
"""

import json

import pytest
import torch
from torch import nn

from tests.conftest import TINY_BUDGET
from vllm_spon.calibration.fp8_weights import (
    FP8_DTYPE,
    FP8_MAX,
    fp8_scale,
    quantize_fp8,
    round_linears_to_fp8,
    round_to_fp8,
)
from vllm_spon.calibration.sparse_model import SparseModel, load_hf_model, sparsifiable_linears
from vllm_spon.format.architectures import FAMILIES
from vllm_spon.format.checkpoint import load_checkpoint

SHAPES = [(1, 1), (3, 7), (37, 53), (64, 96), (5, 300)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def random_weight(shape: tuple[int, int], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Rows of very different magnitudes (including tiny ones below the per-channel scale floor) and, where
    there is room, an all-zero row."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 10.0 ** torch.randint(-9, 3, (shape[0], 1), generator=g)
    if shape[0] > 2:
        w[1] = 0
    return w.to(dtype)


def bits(q: torch.Tensor) -> torch.Tensor:
    return q.view(torch.uint8)


@pytest.fixture(scope="module")
def vllm_reference():
    """vLLM's (0.32) torch quantization functions, run on the CPU."""
    online = pytest.importorskip("vllm.model_executor.layers.quantization.online.fp8")
    if not hasattr(online, "_fp8_quant_per_channel"):
        pytest.skip("this vLLM (< 0.32) quantizes online weights with CUDA kernels only: "
                    "test_matches_vllm_cuda_kernels compares those")
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.quantization.input_quant_fp8 import QuantFP8
    from vllm.model_executor.layers.quantization.utils.quant_utils import GroupShape, weight_amax

    with set_current_vllm_config(VllmConfig()):
        static_per_tensor = QuantFP8(static=True, group_shape=GroupShape.PER_TENSOR)

    def per_tensor(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = online._fp8_scale(weight_amax(w).reshape(1))
        return static_per_tensor.forward_native(w, scale)[0], scale

    def per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = online._fp8_channel_scale(weight_amax(w, dim=-1, keepdim=True))
        return online._fp8_quant_per_channel(w, scale), scale

    return {"per_tensor": per_tensor, "per_channel": per_channel}


@pytest.mark.parametrize("scheme", ["per_tensor", "per_channel"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_vllm_bit_for_bit(vllm_reference, scheme, dtype, shape):
    for seed in range(3):
        w = random_weight(shape, dtype, seed)
        q, scale = quantize_fp8(w, scheme)
        ref_q, ref_scale = vllm_reference[scheme](w)
        assert torch.equal(bits(q), bits(ref_q))
        assert torch.equal(scale, ref_scale.reshape(scale.shape))
        rounded = round_to_fp8(w, scheme)
        assert rounded.dtype == dtype
        assert torch.equal(rounded, (ref_q.float() * ref_scale).to(dtype))


def test_ties_and_saturation_match_vllm(vllm_reference):
    """Every midpoint between neighbouring fp8 values (ties go to even) and values past 448, at scale 1."""
    grid = torch.arange(256, dtype=torch.uint8).view(FP8_DTYPE).float()
    grid = grid[grid.isfinite()].unique()
    w = torch.cat([grid, (grid[1:] + grid[:-1]) / 2, torch.tensor([FP8_MAX, 500.0, -1e4])]).reshape(1, -1)
    for scheme in ("per_tensor", "per_channel"):
        q, _ = quantize_fp8(w, scheme)
        ref_q, _ = vllm_reference[scheme](w)
        assert q.dtype == FP8_DTYPE and torch.equal(bits(q), bits(ref_q))


def test_per_channel_rows_are_independent_and_zero_rows_stay_zero():
    w = random_weight((9, 40), torch.float32, 0)
    rounded = round_to_fp8(w, "per_channel")
    assert torch.equal(rounded[1], torch.zeros(40))
    for row in range(9):
        assert torch.equal(rounded[row], round_to_fp8(w[row: row + 1], "per_channel")[0])


def test_all_zero_tensor_per_tensor_is_zero_not_nan():
    """amax 0 gives scale 0 (vLLM does not clamp per-tensor scales): the kernel's clamp turns 0 * inf into 448,
    which dequantizes to 0."""
    q, scale = quantize_fp8(torch.zeros(4, 6, dtype=torch.bfloat16), "per_tensor")
    assert scale.item() == 0 and torch.equal(q.float(), torch.full((4, 6), FP8_MAX))
    assert torch.equal(round_to_fp8(torch.zeros(4, 6), "per_tensor"), torch.zeros(4, 6))


@pytest.mark.parametrize("scheme", ["per_tensor", "per_channel"])
def test_quantizes_from_the_model_dtype(vllm_reference, scheme):
    """vLLM loads an fp32 checkpoint into bf16 parameters and quantizes those: same as casting first."""
    w = random_weight((37, 53), torch.float32, 1)
    rounded = round_to_fp8(w, scheme, model_dtype=torch.bfloat16)
    ref_q, ref_scale = vllm_reference[scheme](w.to(torch.bfloat16))
    assert rounded.dtype == torch.float32 and torch.equal(rounded, ref_q.float() * ref_scale)
    assert not torch.equal(rounded, round_to_fp8(w, scheme))  # the bf16 cast matters


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs vLLM's CUDA fp8 kernels")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_vllm_cuda_kernels(dtype):
    """The kernels both vLLM versions run: 0.26's online path (`scale=None`: dynamic per-tensor and per-token
    kernels) and 0.32's per-tensor one (the static kernel with `_fp8_scale`'s scale)."""
    from vllm import _custom_ops as ops

    for shape in [*SHAPES, (4096, 4096), (1536, 576)]:
        for seed in range(3):
            w = random_weight(shape, dtype, seed)
            wc = w.cuda()
            dynamic_tensor = ops.scaled_fp8_quant(wc, scale=None)
            dynamic_channel = ops.scaled_fp8_quant(wc, scale=None, use_per_token_if_dynamic=True)
            static_tensor = ops.scaled_fp8_quant(wc, scale=fp8_scale(w.abs().amax().reshape(1), "per_tensor").cuda())
            for scheme, (ref_q, ref_scale) in [("per_tensor", dynamic_tensor), ("per_channel", dynamic_channel),
                                               ("per_tensor", static_tensor)]:
                q, scale = quantize_fp8(w, scheme)
                assert torch.equal(bits(q), bits(ref_q.cpu()))
                assert torch.equal(scale, ref_scale.cpu().reshape(scale.shape))


BLOCKS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
# vLLM's modules and the Hugging Face ones they fuse.
VLLM_MODULES = {"self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"), "self_attn.o_proj": ("o_proj",),
                "mlp.gate_up_proj": ("gate_proj", "up_proj"), "mlp.down_proj": ("down_proj",)}


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    return LlamaConfig(**{**dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                 tie_word_embeddings=False), **overrides})


@pytest.fixture()
def tiny_llama() -> nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


def fused_weight(params: dict[str, torch.Tensor], layer: int, module: str) -> torch.Tensor:
    """The weight of vLLM's `module` (e.g. self_attn.qkv_proj) of `layer`, from Hugging Face parameters."""
    block = module.split(".")[0]
    return torch.cat([params[f"model.layers.{layer}.{block}.{p}.weight"] for p in VLLM_MODULES[module]])


@pytest.mark.parametrize("scheme", ["per_tensor", "per_channel"])
def test_rounds_exactly_the_linears_vllm_quantizes(tiny_llama, scheme):
    before = {name: p.detach().clone() for name, p in tiny_llama.named_parameters()}
    block = sparsifiable_linears(tiny_llama)
    originals = round_linears_to_fp8(block, FAMILIES[0], scheme)
    expected = {f"model.layers.{i}.{block}.{p}" for i in range(2) for p, block in BLOCKS.items()}
    assert set(originals) == expected
    assert all(torch.equal(originals[m], before[f"{m}.weight"]) for m in expected)  # what the teacher gets back
    changed = {name for name, p in tiny_llama.named_parameters() if not torch.equal(p, before[name])}
    assert changed == {f"{m}.weight" for m in expected}  # not embed_tokens, lm_head or the norms
    if scheme == "per_channel":
        for name in expected:
            expected_weight = round_to_fp8(before[f"{name}.weight"], scheme, model_dtype=torch.bfloat16)
            weight = block[name].weight
            assert weight.dtype == torch.float32 and torch.equal(weight, expected_weight)


def test_per_tensor_shares_one_scale_per_fused_module(tiny_llama):
    """q/k/v (vLLM's qkv_proj) and gate/up (gate_up_proj) are quantized with the scale of their concatenation."""
    before = {name: p.detach().clone() for name, p in tiny_llama.named_parameters()}
    round_linears_to_fp8(sparsifiable_linears(tiny_llama), FAMILIES[0], "per_tensor")
    after = dict(tiny_llama.named_parameters())
    for layer in range(2):
        for module in VLLM_MODULES:
            q, scale = quantize_fp8(fused_weight(before, layer, module).to(torch.bfloat16), "per_tensor")
            assert torch.equal(fused_weight(after, layer, module), q.float() * scale)


def vllm_fp8_weights(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(fp8 weight as float32, scale) of every module vLLM quantized, as vLLM holds them after loading."""
    return {name: (m.weight.float().cpu(), m.weight_scale.float().cpu())
            for name, m in model.named_modules() if hasattr(m, "weight_scale")}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs vLLM's CUDA build and a GPU")
@pytest.mark.parametrize(("quantization", "scheme"), [("fp8", "per_tensor"), ("fp8_per_channel", "per_channel")])
def test_vllm_engine_holds_the_rounded_weights(tmp_path, monkeypatch, quantization, scheme):
    """An fp32 checkpoint served with --dtype bfloat16: what vLLM's layers compute with after loading
    (q * scale) equals round_linears_to_fp8's weights bit for bit, and only the decoder linears are fp8."""
    from transformers import LlamaForCausalLM
    from vllm import LLM

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    torch.manual_seed(0)
    # No square weights (head_dim * heads != hidden), so the stored orientation is unambiguous.
    hf = LlamaForCausalLM(tiny_llama_config(vocab_size=512, hidden_size=256, intermediate_size=768, head_dim=96))
    hf.save_pretrained(tmp_path)
    llm = LLM(str(tmp_path), quantization=quantization, dtype="bfloat16", skip_tokenizer_init=True,
              enforce_eager=True, gpu_memory_utilization=0.2, max_model_len=256)
    [held] = llm.apply_model(vllm_fp8_weights)
    del llm
    round_linears_to_fp8(sparsifiable_linears(hf), FAMILIES[0], scheme)
    params = {name: p.detach() for name, p in hf.named_parameters()}
    assert set(held) == {f"model.layers.{i}.{m}" for i in range(2) for m in VLLM_MODULES}
    for name, (weight, scale) in held.items():
        layer, module = int(name.split(".")[2]), name.split(".", 3)[3]
        expected = fused_weight(params, layer, module)
        weight = weight if weight.shape == expected.shape else weight.t()
        assert torch.equal(weight * (scale.reshape(-1, 1) if scale.numel() > 1 else scale), expected), name


def test_a_quantized_reference_keeps_its_unquantized_teacher(tiny_llama_dir):
    """All three modes compute with the rounded weights; `unquantized()` (SPON training's teacher) puts the
    originals back exactly, and leaves the rounded ones in place afterwards."""
    sparse = SparseModel(load_hf_model(tiny_llama_dir))
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with sparse.use("dense"):
        original = sparse.logits(ids)
        sparse.quantize("fp8")
        rounded = sparse.logits(ids)
        with sparse.unquantized():
            teacher = sparse.logits(ids)
        after = sparse.logits(ids)
    assert not torch.equal(rounded, original)
    assert torch.equal(teacher, original) and torch.equal(after, rounded)


def test_calibrate_and_eval_target_fp8(capsys, tiny_model, tmp_path):
    """`calibrate --quantization fp8` records it (and its held-out check ran on fp8 weights); `eval
    --quantization fp8` measures dense-fp8 / TEAL-fp8 / SPON-fp8 and the unquantized dense for scale."""
    from vllm_spon.cli import main

    output = tmp_path / "ckpt"
    assert main(["calibrate", str(tiny_model), "--output", str(output), "--quantization", "fp8", *TINY_BUDGET]) == 0
    config = load_checkpoint(output).config
    assert config.calibration.quantization == "fp8" and config.perplexity.quantization == "fp8"
    capsys.readouterr()
    assert main(["eval", str(output), "--windows", "1", "--window", "32", "--quantization", "fp8", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["quantization"] == report["calibrated_for_quantization"] == "fp8"
    assert report["dense_ppl"] != report["dense_unquantized_ppl"]
    assert main(["eval", str(output), "--windows", "1", "--window", "32", "--json"]) == 0
    unquantized = json.loads(capsys.readouterr().out)
    assert unquantized["quantization"] == "none" and "dense_unquantized_ppl" not in unquantized
    assert unquantized["dense_ppl"] == report["dense_unquantized_ppl"]
