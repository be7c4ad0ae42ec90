"""Activation-sparse linear layers for decode: `y = bias + S(x) @ W^T`, `S(x) = x * (|x| > t)`.

`sparse_linear` is what the vLLM plugin calls. It picks, from the number of tokens alone (so one CUDA graph
per batch size always takes one branch), between the Triton kernels that read only the weight rows whose
input survives (decode) and a dense matmul on the thresholded input (prefill, and batches where reading the
union of the rows costs as much as reading them all); a launch gives the same bits on every run, but the two
paths round differently, so on the GPU a token's result depends on its batch unless vLLM's batch-invariant
mode is on (`vllm_batch_invariant`: then every token count takes the dense path). On the CPU, every token
count takes one C++ kernel (`cpu.py`) that reads only the kept rows and gives a token the same bits alone or
in any batch. Importing this package needs neither a GPU nor Triton, and does not initialise CUDA.
"""

import importlib.util
import os
from collections.abc import Callable, Sequence
from functools import cache

import torch

from . import cpu
from .reference import sparse_linear_reference, sparsify

__all__ = ["HAS_TRITON", "has_triton_cuda", "prepare", "sparse_linear", "sparse_linear_reference", "sparsify",
           "vllm_batch_invariant"]

HAS_TRITON = importlib.util.find_spec("triton") is not None


@cache
def has_triton_cuda() -> bool:
    """Whether CUDA tensors take the Triton kernels (Triton importable, CUDA build of torch, a GPU present)."""
    return HAS_TRITON and torch.version.cuda is not None and torch.cuda.is_available()


@cache
def vllm_batch_invariant() -> bool:
    """Whether vLLM's batch-invariant mode is on (`VLLM_BATCH_INVARIANT=1`, read once). It replaces torch's
    matmuls by ones whose result for a row does not depend on the batch; then every token count takes the
    dense path on the thresholded input, so that decode and prefill alike give a token the same bits (a
    sparse kernel rounds differently from those matmuls, and a last-bit change at a threshold changes an
    answer). Read from the environment, as vLLM reads it, so that this package needs no vLLM."""
    return bool(int(os.environ.get("VLLM_BATCH_INVARIANT", "0") or "0"))


def prepare(device: torch.device, in_features: int) -> None:
    """Allocate the kernels' per-device state (zeroed arrival counters, compaction scratch for `in_features`
    inputs) ahead of time, for each layer before any CUDA-graph capture: a zero-fill recorded inside a
    capture does not run until that graph replays.
    """
    if device.type == "cuda" and has_triton_cuda():
        from . import triton_sparse

        triton_sparse._arrival_counters(device)
        triton_sparse.compaction_scratch(device, in_features)


def sparse_linear(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    thresholds: torch.Tensor | None,
    segment_ends: Sequence[int],
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """`y[:, seg_i] = bias[seg_i] + S_{t_i}(x) @ weight_t[:, seg_i]`, fp32 accumulation, in x's dtype.

    x `[T, in]`; weight_t `[in, out]` contiguous, x's dtype; thresholds float32 `[n_seg]` on x's device, or
    None when x is already thresholded (one threshold for the whole layer, applied by the caller where
    torch.compile can fuse it into the op that produced x; then zero entries are the dropped ones);
    segment_ends cumulative output sizes (last == out); bias `[out]` or None. Same semantics as
    `sparse_linear_reference`; no host synchronisation on the CUDA path (CUDA-graph capturable).
    """
    if x.device.type == "cpu":  # one kernel for every token count: a token's result never depends on T
        return cpu.sparse_linear(x, weight_t, thresholds, segment_ends, bias)
    if x.stride(-1) != 1:
        x = x.contiguous()
    presparsified = thresholds is None
    if presparsified:
        thresholds = _zero_thresholds(x.device, len(segment_ends))
    one_input = presparsified or len(segment_ends) == 1
    if x.is_cuda and has_triton_cuda():
        from . import configs, triton_sparse

        config = configs.select(weight_t.shape[0], weight_t.shape[1], x.shape[0], x.dtype, x.device)
        if config is not None:
            return triton_sparse.launch(x, weight_t, thresholds, segment_ends, bias, config)
        if presparsified:
            return _matmul(x, weight_t, bias)
        stacked = triton_sparse.sparsify_segments(x, thresholds)  # one pass over x for all segments
        inputs: Callable[[int], torch.Tensor] = stacked.__getitem__
    else:
        inputs = (lambda _: x) if presparsified else (lambda i: sparsify(x, thresholds[i]))
    if one_input:
        return _matmul(inputs(0), weight_t, bias)
    return _dense_segments(x, weight_t, segment_ends, bias, inputs)


_zeros: dict[tuple[torch.device, int], torch.Tensor] = {}


def _zero_thresholds(device: torch.device, n: int) -> torch.Tensor:
    """Cached zero thresholds: made on the first call per device (a warm-up call, not a graph capture)."""
    if (device, n) not in _zeros:
        _zeros[device, n] = torch.zeros(n, dtype=torch.float32, device=device)
    return _zeros[device, n]


def _segments(segment_ends: Sequence[int]) -> list[tuple[int, int]]:
    return list(zip([0, *segment_ends[:-1]], segment_ends, strict=True))


def _matmul(xs: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """One cuBLAS/oneDNN matmul on the `[in, out]` weight, the bias in its epilogue."""
    return xs @ weight_t if bias is None else torch.addmm(bias.to(xs.dtype), xs, weight_t)


def _dense_segments(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    segment_ends: Sequence[int],
    bias: torch.Tensor | None,
    inputs: Callable[[int], torch.Tensor],
) -> torch.Tensor:
    """A matmul per segment on its own thresholded input, written in place into the output columns."""
    y = x.new_empty((x.shape[0], weight_t.shape[1]))
    for i, (s, e) in enumerate(_segments(segment_ends)):
        torch.mm(inputs(i), weight_t[:, s:e], out=y[:, s:e])
    return y if bias is None else y.add_(bias)
