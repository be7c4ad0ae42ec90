"""Written by `benchmarks/bench_kernels.py --tune` on an NVIDIA H200 (bf16); None: cuBLAS is faster.

One-token entries from run 8 (kernels/NOTES.md, "Run 8: the same bits on every run"; `--tune --tokens 1
--candidates-from` run 7's finalists, on the kernels with ordered partial sums instead of float atomics; down
from run 9, the full one-token sweep of that shape), the other buckets kept from run 4 (None: cuBLAS) but the
fused gate_up at 2 tokens (runs 10-11: the compacting kernel on the union of the two tokens' rows, 1.13-1.21x
at 50%; the other shapes lose at 2 tokens and 50%). TUNED_FP8 from fp8 run 5 (ordered partial sums, run 4's
finalists, bf16's one-token rule): only the fused gate_up beats `torch._scaled_mm` (1.37x at 50%, 0.90x at
0%); the other fp8 layers keep vLLM's fp8 matmul."""

# ruff: noqa: E501

from .triton_sparse import Config

TUNED: dict[tuple[int, int, int], Config | None] = {
    (4096, 4096, 1): Config(kind='compact_mma', bn=512, bm=32, split_k=1, num_warps=8, num_stages=1, groups=8, splits=2),
    (4096, 4096, 2): None,
    (4096, 4096, 4): None,
    (4096, 4096, 8): None,
    (4096, 4096, 16): None,
    (4096, 6144, 1): Config(kind='compact_mma', bn=256, bm=32, split_k=1, num_warps=8, num_stages=1, groups=8, splits=1),
    (4096, 6144, 2): None,
    (4096, 6144, 4): None,
    (4096, 6144, 8): None,
    (4096, 6144, 16): None,
    (4096, 14336, 1): Config(kind='compact', bn=1024, bm=8, split_k=1, num_warps=4, num_stages=4, groups=64, splits=1),
    (4096, 14336, 2): None,
    (4096, 14336, 4): None,
    (4096, 14336, 8): None,
    (4096, 14336, 16): None,
    (4096, 28672, 1): Config(kind='compact', bn=1024, bm=8, split_k=1, num_warps=4, num_stages=3, groups=64, splits=1),
    (4096, 28672, 2): Config(kind='compact', bn=1024, bm=8, split_k=1, num_warps=4, num_stages=3, groups=128, splits=2),
    (4096, 28672, 4): None,
    (4096, 28672, 8): None,
    (4096, 28672, 16): None,
    (14336, 4096, 1): Config(kind='compact', bn=512, bm=16, split_k=1, num_warps=2, num_stages=3, groups=32, splits=1),
    (14336, 4096, 2): None,
    (14336, 4096, 4): None,
    (14336, 4096, 8): None,
    (14336, 4096, 16): None,
}

# Float8 weights, one token (`bench_kernels.py --fp8 --tune`); None: vLLM's fp8 matmul.
TUNED_FP8: dict[tuple[int, int, int], Config | None] = {
    (4096, 4096, 1): None,
    (4096, 6144, 1): None,
    (4096, 14336, 1): None,
    (4096, 28672, 1): Config(kind='compact', bn=1024, bm=8, split_k=1, num_warps=2, num_stages=3, groups=32, splits=1),
    (14336, 4096, 1): None,
}
