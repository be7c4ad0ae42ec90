"""Launch configs per (in, out, token bucket) on an H100 (bf16); None: dense is faster.

Chosen from the H100 sweeps in kernels/NOTES.md (`benchmarks/bench_kernels.py --tune` writes this format):
the v5 GEMV for one token, the tensor-core kernel for two, dense from three tokens on (and for o_proj from
two), where the sparse kernels lost to cuBLAS at 0% sparsity or barely won at 50%. The 4/8/16-token buckets
(added with the H200 tuning) say that as entries; nothing here was re-measured since (no H100 to hand)."""

from .triton_sparse import Config

TUNED: dict[tuple[int, int, int], Config | None] = {
    (4096, 4096, 1): Config("gemv", bn=2048, bm=32, num_warps=8),
    (4096, 4096, 2): None,
    (4096, 4096, 4): None,
    (4096, 4096, 8): None,
    (4096, 4096, 16): None,
    (4096, 6144, 1): Config("gemv", bn=1024, bm=32, num_warps=4),
    (4096, 6144, 2): Config("dot", bn=128, bm=32, split_k=8, num_warps=4, num_stages=3),
    (4096, 6144, 4): None,
    (4096, 6144, 8): None,
    (4096, 6144, 16): None,
    (4096, 14336, 1): Config("gemv", bn=1024, bm=32, num_warps=2),
    (4096, 14336, 2): Config("dot", bn=256, bm=32, split_k=4, num_warps=4, num_stages=3),
    (4096, 14336, 4): None,
    (4096, 14336, 8): None,
    (4096, 14336, 16): None,
    (4096, 28672, 1): Config("gemv", bn=1024, bm=32, num_warps=2),
    (4096, 28672, 2): Config("dot", bn=256, bm=32, split_k=2, num_warps=4, num_stages=4),
    (4096, 28672, 4): None,
    (4096, 28672, 8): None,
    (4096, 28672, 16): None,
    (14336, 4096, 1): Config("gemv", bn=1024, bm=32, num_warps=2),
    (14336, 4096, 2): Config("dot", bn=256, bm=32, split_k=16, num_warps=4, num_stages=3),
    (14336, 4096, 4): None,
    (14336, 4096, 8): None,
    (14336, 4096, 16): None,
}
