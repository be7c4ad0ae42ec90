"""Weights rounded to fp8 exactly as vLLM's online fp8 quantization rounds them, for the reference model.

`vllm serve --quantization fp8` (an alias of `fp8_per_tensor` in vLLM 0.32, `Fp8Config` with an unserialized
checkpoint in 0.26: the same `Fp8PerTensorOnlineLinearMethod` in both) and `--quantization fp8_per_channel`
(`Fp8PtpcOnlineLinearMethod`) quantize a 16-bit checkpoint's linear weights while loading. Both versions
compute, with tensor parallelism 1 (0.26 computes per-tensor scales per TP shard, 0.32 from the whole weight):

    w      = the checkpoint weight cast to the model dtype (vLLM's weight loader copies it into a
             parameter of that dtype; fp8 needs --dtype bfloat16 or float16)
    amax   = max |w|, in float32: over the whole fused module (qkv_proj = q,k,v; gate_up_proj = gate,up)
             for per-tensor, over each output row for per-channel
    scale  = amax / 448                                   per-tensor: unclamped
           = max(amax / 448, 1 / (448 * 512))             per-channel: all-zero rows stay finite
    q      = float8_e4m3fn(clamp(w * (1 / scale), -448, 448))   per-tensor (the reciprocal, as the kernel)
           = float8_e4m3fn(clamp(w / scale, -448, 448))         per-channel (true division)
             round-to-nearest-even, in float32

and the matmul then sees `q * scale` (fp32 accumulation, the scale applied after it). Sources: vLLM 0.32
`model_executor/layers/quantization/online/fp8.py` (`_fp8_scale`, `_fp8_channel_scale`,
`_fp8_quant_per_channel`, the two `process_weights_after_loading`) and `csrc/quantization/w8a8/fp8/common.cu(h)`
(`scaled_fp8_quant_kernel_strided_group_shape`, `dynamic_per_token_scaled_fp8_quant_kernel_strided`,
`scaled_fp8_conversion`), which 0.26 runs for both schemes through `ops.scaled_fp8_quant(weight, scale=None)`.
Only the weights are modelled: vLLM's W8A8 kernels also quantize activations, the sparse fp8 path does not.
"""

from typing import Literal

import torch
from torch import nn

from vllm_spon.format.architectures import Family
from vllm_spon.kernels.fp8 import FP8_DTYPE

Fp8Scheme = Literal["per_tensor", "per_channel"]
# What each `--quantization` (vLLM's name) does to the weights.
FP8_SCHEME: dict[str, Fp8Scheme] = {"fp8": "per_tensor", "fp8_per_channel": "per_channel"}

FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448


def _fp8_max() -> torch.Tensor:
    # A float32 tensor, so the divisions below are float32 divisions, as in vLLM and its kernels.
    return torch.tensor(FP8_MAX, dtype=torch.float32)


def fp8_scale(amax: torch.Tensor, scheme: Fp8Scheme) -> torch.Tensor:
    """The weight scale vLLM derives from `amax` (max |w|; a scalar, or one per output row)."""
    scale = amax.to(torch.float32) / _fp8_max()
    return scale if scheme == "per_tensor" else scale.clamp_min(1.0 / (_fp8_max() * 512))


def quantize_fp8(weight: torch.Tensor, scheme: Fp8Scheme, scale: torch.Tensor | None = None,
                 model_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, float32 scale: shape [1] per-tensor, [out, 1] per-channel) as vLLM stores them.

    `weight` is [out, in], first cast to `model_dtype` (vLLM quantizes what its loader put in a parameter of
    the model dtype, not the checkpoint tensor). `scale` overrides the per-tensor scale: a fused module's,
    from the amax of all its shards (`round_linears_to_fp8` passes it)."""
    w = weight if model_dtype is None else weight.to(model_dtype)
    if scheme == "per_tensor":
        if scale is None:
            scale = fp8_scale(w.abs().amax().reshape(1), scheme)
        x = w.float() * (1.0 / scale)
    else:
        if scale is not None:
            raise ValueError("per-channel scales come from each row's own amax; pass no scale")
        scale = fp8_scale(w.abs().amax(dim=-1, keepdim=True), scheme)
        x = w.float() / scale
    # The kernel's fmaxf/fminf clamp maps NaN to +448: an all-zero tensor (scale 0, 0 * inf) gives q = 448 and
    # dequantizes to 448 * 0 = 0, where torch's clamp would keep the NaN.
    return x.nan_to_num(nan=FP8_MAX).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def round_to_fp8(weight: torch.Tensor, scheme: Fp8Scheme, scale: torch.Tensor | None = None,
                 model_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight vLLM's fp8 matmul computes with, `q.float() * scale`, in `weight`'s dtype (exact in float32,
    the reference model's dtype; a bfloat16 result adds one bfloat16 rounding the fp8 kernels do not have)."""
    q, scale = quantize_fp8(weight, scheme, scale, model_dtype)
    return (q.float() * scale).to(weight.dtype)


@torch.no_grad()
def round_linears_to_fp8(linears: dict[str, nn.Linear], family: Family, scheme: Fp8Scheme,
                         model_dtype: torch.dtype | None = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Round, in place, the weights of `linears` (every linear of every block: vLLM's fp8 configs quantize
    all of its `LinearBase` layers, sparsified or not, and neither embeddings nor the LM head) as
    `--quantization fp8` (per_tensor) or `fp8_per_channel` does; returns the original weights by module name.

    Per-tensor, the projections of one vLLM layer (q/k/v: qkv_proj, gate/up: gate_up_proj, the family's
    table says which) share one scale, as in vLLM. `model_dtype` is the dtype vLLM serves in (`--dtype`;
    None: quantize the weights as they are)."""
    groups: dict[tuple[int, str], list[nn.Linear]] = {}
    for name, linear in linears.items():
        index, projection = family.parse(name)
        groups.setdefault((index, projection.vllm_layer), []).append(linear)
    originals = {name: linear.weight.detach().clone() for name, linear in linears.items()}
    for shards in groups.values():
        scale = None
        if scheme == "per_tensor":
            amax = torch.stack([s.weight.to(model_dtype or s.weight.dtype).abs().amax() for s in shards]).amax()
            scale = fp8_scale(amax.reshape(1), scheme)
        for shard in shards:
            shard.weight.copy_(round_to_fp8(shard.weight, scheme, scale, model_dtype))
    return originals
