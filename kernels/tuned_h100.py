"""Written by `benchmarks/bench_kernels.py --tune` on an NVIDIA H100 80GB HBM3 (bf16); None: cuBLAS is faster.

Run 12 (2026-12-06, kernels/NOTES.md "Run 12"): the one-token entries from `--tune --tokens 1
--candidates-from` the H200 runs 8-9 finalists `--fanins 0 4 8 16` (the compacting kernels; until then this
GPU had only the v3/v5 kernels' entries); the 2-token "dot" entries kept from the H100 run 4 (1.12-1.26x of
cuBLAS at 50% in run 12's table), dense from 4 tokens. TUNED_FP8 from `--fp8 --tune` in the same session: every
fp8 layer but o beats `torch._scaled_mm` by the one-token rule."""

# ruff: noqa: E501

from .triton_sparse import Config

TUNED: dict[tuple[int, int, int], Config | None] = {
    (4096, 4096, 1): Config(kind='compact_mma', bn=256, bm=32, split_k=1, num_warps=8, num_stages=1, groups=8, splits=1, fanin=0),
    (4096, 4096, 2): None,
    (4096, 4096, 4): None,
    (4096, 4096, 8): None,
    (4096, 4096, 16): None,
    (4096, 6144, 1): Config(kind='compact_mma', bn=256, bm=32, split_k=1, num_warps=8, num_stages=1, groups=8, splits=1, fanin=0),
    (4096, 6144, 2): Config(kind='dot', bn=128, bm=32, split_k=8, num_warps=4, num_stages=3, groups=1, splits=1, fanin=0),
    (4096, 6144, 4): None,
    (4096, 6144, 8): None,
    (4096, 6144, 16): None,
    (4096, 14336, 1): Config(kind='compact', bn=1024, bm=8, split_k=1, num_warps=4, num_stages=4, groups=64, splits=1, fanin=0),
    (4096, 14336, 2): Config(kind='dot', bn=256, bm=32, split_k=4, num_warps=4, num_stages=3, groups=1, splits=1, fanin=0),
    (4096, 14336, 4): None,
    (4096, 14336, 8): None,
    (4096, 14336, 16): None,
    (4096, 28672, 1): Config(kind='compact', bn=1024, bm=8, split_k=1, num_warps=4, num_stages=3, groups=64, splits=1, fanin=0),
    (4096, 28672, 2): Config(kind='dot', bn=256, bm=32, split_k=2, num_warps=4, num_stages=4, groups=1, splits=1, fanin=0),
    (4096, 28672, 4): None,
    (4096, 28672, 8): None,
    (4096, 28672, 16): None,
    (14336, 4096, 1): Config(kind='compact', bn=512, bm=8, split_k=1, num_warps=2, num_stages=4, groups=64, splits=1, fanin=8),
    (14336, 4096, 2): Config(kind='dot', bn=256, bm=32, split_k=16, num_warps=4, num_stages=3, groups=1, splits=1, fanin=0),
    (14336, 4096, 4): None,
    (14336, 4096, 8): None,
    (14336, 4096, 16): None,
}

# Float8 weights, one token (`bench_kernels.py --fp8 --tune`); None: vLLM's fp8 matmul.
TUNED_FP8: dict[tuple[int, int, int], Config | None] = {
    (4096, 4096, 1): None,
    (4096, 6144, 1): Config(kind='compact_mma', bn=256, bm=32, split_k=1, num_warps=8, num_stages=1, groups=8, splits=1, fanin=0),
    (4096, 14336, 1): Config(kind='compact', bn=1024, bm=8, split_k=1, num_warps=2, num_stages=4, groups=32, splits=1, fanin=8),
    (4096, 28672, 1): Config(kind='compact', bn=1024, bm=8, split_k=1, num_warps=2, num_stages=3, groups=32, splits=1, fanin=4),
    (14336, 4096, 1): Config(kind='compact', bn=1024, bm=8, split_k=1, num_warps=2, num_stages=4, groups=32, splits=1, fanin=8),
}
