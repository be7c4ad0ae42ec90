"""The sparse linear on float8 weights: vLLM's fp8 weight quantization with 16-bit activations (W8A16).

Decode-sized token counts with a measured entry in the GPU's fp8 table (`configs.select(..., fp8=True)`)
take the one-token kernels of `triton_sparse` on the float8 `[in, out]` weight: only the kept rows are read
(one byte per weight instead of two), sums in fp32, the weight scale applied once per output after
accumulation. Every other call takes `dense`: under vLLM, its own fp8 matmul on the thresholded input.
"""

from collections.abc import Callable, Sequence

import torch

from . import has_triton_cuda
from .reference import sparse_linear_fp8_reference

FP8_DTYPE = torch.float8_e4m3fn  # what vLLM's fp8 methods store on CUDA


def sparse_linear_fp8(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    weight_scale: torch.Tensor,
    thresholds: torch.Tensor,
    segment_ends: Sequence[int],
    bias: torch.Tensor | None = None,
    dense: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """`y[:, seg_i] = bias[seg_i] + scale * (S_{t_i}(x) @ weight_t[:, seg_i])` in x's dtype.

    x `[T, in]` (16-bit); weight_t `[in, out]` row-major float8_e4m3fn; weight_scale float32 `[1]` (per
    tensor) or `[out]` (per output channel); thresholds float32 `[n_seg]`; segment_ends cumulative output
    sizes; bias `[out]` or None. The choice depends on the token count alone (CUDA-graph safe, no host
    sync on the kernel path). `dense(x)` computes the result where no kernel is selected; None: the float32
    reference (tests, CPU).
    """
    if x.is_cuda and has_triton_cuda():
        from . import configs, triton_sparse

        config = configs.select(weight_t.shape[0], weight_t.shape[1], x.shape[0], x.dtype, x.device, fp8=True)
        if config is not None:
            x = x if x.stride(-1) == 1 else x.contiguous()
            return triton_sparse.launch(x, weight_t, thresholds, segment_ends, bias, config, weight_scale=weight_scale)
    if dense is not None:
        return dense(x)
    return sparse_linear_fp8_reference(x, weight_t, weight_scale, thresholds, list(segment_ends), bias)
