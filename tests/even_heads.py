"""A copy of SmolLM2 that splits over 2 tensor-parallel ranks and computes exactly what SmolLM2 computes,
and a SPON checkpoint carried over to it: for the tensor-parallel tests."""

import shutil
from pathlib import Path

import torch

from tests.reference_cases import ReferenceCase
from vllm_spon.calibration.handmade import write_handmade
from vllm_spon.format.atomic import atomic_directory
from vllm_spon.format.checkpoint import load_checkpoint

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
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_directory(output, overwrite=True) as tmp:
        config.save_pretrained(tmp)
        save_file(weights, tmp / "model.safetensors", metadata={"format": "pt"})
        for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            shutil.copy(base / name, tmp / name)
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
    return write_handmade(model_dir, output, checkpoint.config.thresholds, biases)
