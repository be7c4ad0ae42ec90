"""The CPU path of the sparse linear: one C++ kernel for every token count, fp32, bf16 and fp16 inputs.

`kernels/csrc/sparse_linear_cpu.cpp` computes each output as one float32 FMA chain over the token's kept inputs
in increasing order, plus the bias. A dropped input adds nothing to the chain, so a token's result is bitwise the
same alone or inside any batch: vLLM batches decode and chunked-prefill tokens of different requests together,
and a result that depended on the batch (a COO product for one token, a dense matmul for more) changed greedy
answers with server load (issue 10). One token reads only the weight rows it keeps; a tile of tokens reads each
row any of them keeps once (kernels/NOTES.md, "CPU path").

The kernel is compiled on first use by `torch.utils.cpp_extension.load` into torch's extension cache (under its
file lock, rebuilt when the source or torch changes); `scripts/setup.sh` compiles it on CPU machines so that
no server start pays for it. If it cannot be built, the error is raised: there is no other CPU path, since one
with a different summation order would give different answers.
"""

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

SOURCE = Path(__file__).resolve().parent / "csrc" / "sparse_linear_cpu.cpp"
EXTENSION = "vllm_spon_cpu_kernels"


_op: Callable[..., torch.Tensor] | None = None  # torch.ops.spon_cpu.sparse_linear, once loaded


def load_extension() -> Callable[..., torch.Tensor]:
    """Build (once per source and torch version) and load the kernel; returns `torch.ops.spon_cpu.sparse_linear`."""
    global _op
    if _op is None:
        from torch.utils.cpp_extension import load

        load(name=EXTENSION, sources=[str(SOURCE)], extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"],
             is_python_module=False)
        # Shapes for torch.compile, so that traced code calls the C++ op itself: a Python custom op around it
        # cost about 9 us of a 40-150 us call, 1 ms of each decode step of the example model (kernels/NOTES.md).
        torch.library.register_fake("spon_cpu::sparse_linear")(_sparse_linear_fake)
        _op = torch.ops.spon_cpu.sparse_linear
    return _op


def _sparse_linear_fake(x: torch.Tensor, weight_t: torch.Tensor, thresholds: torch.Tensor | None,
                        segment_ends: Sequence[int], bias: torch.Tensor | None = None,
                        vectorized: bool | None = None) -> torch.Tensor:
    return x.new_empty((x.shape[0], weight_t.shape[1]))


def sparse_linear(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    thresholds: torch.Tensor | None,
    segment_ends: Sequence[int],
    bias: torch.Tensor | None = None,
    vectorized: bool | None = None,
) -> torch.Tensor:
    """`y[:, seg_i] = bias[seg_i] + S_{t_i}(x) @ weight_t[:, seg_i]` on CPU tensors, float32 sums, x's dtype.

    x `[T, in]`; weight_t `[in, out]` contiguous in x's dtype; thresholds float32 `[n_seg]`, or None when x is
    already thresholded (its zeros are the dropped inputs). vectorized: None picks AVX-512 where the CPU has it;
    False forces the portable loop, which gives the same bits (the tests compare them). Called once per linear
    layer and token batch, so it is kept to one call into C++.
    """
    return (_op or load_extension())(x, weight_t, thresholds, segment_ends, bias, vectorized)
