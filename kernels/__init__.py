"""Activation-sparse linear layers for decode: `y = bias + S(x) @ W^T`, `S(x) = x * (|x| > t)`.

`sparse_linear` is what the vLLM plugin calls. It picks, from the number of tokens alone (so one CUDA graph
per batch size always takes one branch), between the Triton kernels that read only the weight rows whose
input survives (decode) and a dense matmul on the thresholded input (prefill, and batches where reading the
union of the rows costs as much as reading them all). On the CPU, one float32 token multiplies a sparse (COO)
input, which reads only the surviving rows. Importing this package needs neither a GPU nor Triton, and does
not initialise CUDA.
"""

import importlib.util
from collections.abc import Callable, Sequence
from functools import cache

import torch

from .reference import sparse_linear_reference, sparsify

__all__ = ["HAS_TRITON", "has_triton_cuda", "sparse_linear", "sparse_linear_reference", "sparsify"]

HAS_TRITON = importlib.util.find_spec("triton") is not None

# CPU: row skipping (sparse COO input @ dense W^T) only for one float32 token; PyTorch's COO product
# accumulates 16-bit inputs in 16 bits, and for several tokens it re-reads rows (kernels/NOTES.md).
CPU_ROW_SKIP_MAX_TOKENS = 1


@cache
def has_triton_cuda() -> bool:
    """Whether CUDA tensors take the Triton kernels (Triton importable, CUDA build of torch, a GPU present)."""
    return HAS_TRITON and torch.version.cuda is not None and torch.cuda.is_available()


def sparse_linear(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    thresholds: torch.Tensor,
    segment_ends: Sequence[int],
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """`y[:, seg_i] = bias[seg_i] + S_{t_i}(x) @ weight_t[:, seg_i]`, fp32 accumulation, in x's dtype.

    x `[T, in]`; weight_t `[in, out]` contiguous, x's dtype; thresholds float32 `[n_seg]` on x's device;
    segment_ends cumulative output sizes (last == out); bias `[out]` or None. Same semantics as
    `sparse_linear_reference`; no host synchronisation on the CUDA path (CUDA-graph capturable).
    """
    if x.stride(-1) != 1:
        x = x.contiguous()
    if x.is_cuda and has_triton_cuda():
        from . import configs, triton_sparse

        config = configs.select(weight_t.shape[0], weight_t.shape[1], x.shape[0], x.dtype)
        if config is not None:
            return triton_sparse.launch(x, weight_t, thresholds, segment_ends, bias, config)
        stacked = triton_sparse.sparsify_segments(x, thresholds)
        return _dense(x, weight_t, segment_ends, bias, stacked.__getitem__)
    if x.device.type == "cpu" and x.dtype == torch.float32 and x.shape[0] <= CPU_ROW_SKIP_MAX_TOKENS:
        return _skip_rows(x, weight_t, thresholds, segment_ends, bias)
    return _dense(x, weight_t, segment_ends, bias, lambda i: sparsify(x, thresholds[i]))


def _segments(segment_ends: Sequence[int]) -> list[tuple[int, int]]:
    return list(zip([0, *segment_ends[:-1]], segment_ends, strict=True))


def _dense(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    segment_ends: Sequence[int],
    bias: torch.Tensor | None,
    sparse_input: Callable[[int], torch.Tensor],
) -> torch.Tensor:
    """A (cuBLAS) matmul per segment on its thresholded input, written in place into the output columns."""
    if len(segment_ends) == 1:
        xs = sparse_input(0)
        return xs @ weight_t if bias is None else torch.addmm(bias.to(x.dtype), xs, weight_t)
    y = x.new_empty((x.shape[0], weight_t.shape[1]))
    for i, (s, e) in enumerate(_segments(segment_ends)):
        torch.mm(sparse_input(i), weight_t[:, s:e], out=y[:, s:e])
    return y if bias is None else y.add_(bias)


def _skip_rows(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    thresholds: torch.Tensor,
    segment_ends: Sequence[int],
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """CPU decode: per segment, a COO input times W^T reads only the rows of the surviving inputs."""
    y = x.new_empty((x.shape[0], weight_t.shape[1]))
    for i, (s, e) in enumerate(_segments(segment_ends)):
        y[:, s:e] = torch.sparse.mm(sparsify(x, thresholds[i]).to_sparse(), weight_t[:, s:e])
    return y if bias is None else y.add_(bias)
