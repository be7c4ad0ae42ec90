"""Written by `benchmarks/bench_kernels.py --tune` on an NVIDIA H200 (bf16); None: cuBLAS is faster.

From kernels/NOTES.md, "H200": gate_up / down / fused gate_up from run 4 (the committed kernels), qkv and o
from run 2 (the GEMV, unchanged since). gate_up's 2-token bucket is None where run 4 picked the tensor-core
kernel by 2% against a cuBLAS sample 7% above its other readings: the MARGIN rule added since says None."""

from .triton_sparse import Config

TUNED: dict[tuple[int, int, int], Config | None] = {
    (4096, 4096, 1): Config(kind="gemv", bn=2048, bm=32, num_warps=8),
    (4096, 4096, 2): None,
    (4096, 4096, 4): None,
    (4096, 4096, 8): None,
    (4096, 4096, 16): None,
    (4096, 6144, 1): Config(kind="gemv", bn=1024, bm=32, num_warps=4),
    (4096, 6144, 2): None,
    (4096, 6144, 4): None,
    (4096, 6144, 8): None,
    (4096, 6144, 16): None,
    (4096, 14336, 1): Config(kind="rows", bn=1024, bm=16, num_warps=4, groups=16, splits=4),
    (4096, 14336, 2): None,
    (4096, 14336, 4): None,
    (4096, 14336, 8): None,
    (4096, 14336, 16): None,
    (4096, 28672, 1): Config(kind="rows", bn=1024, bm=16, num_warps=4, groups=16, splits=2),
    (4096, 28672, 2): None,
    (4096, 28672, 4): None,
    (4096, 28672, 8): None,
    (4096, 28672, 16): None,
    (14336, 4096, 1): Config(kind="rows", bn=1024, bm=16, num_warps=4, groups=16, splits=4),
    (14336, 4096, 2): None,
    (14336, 4096, 4): None,
    (14336, 4096, 8): None,
    (14336, 4096, 16): None,
}

# Float8 weights, one token (`bench_kernels.py --fp8`, kernels/NOTES.md "fp8 weights", run 1): no candidate
# beat torch._scaled_mm on the same fp8 weights by 3% over s = 0 / 0.5 / 0.75 while holding 0.97x at s = 0,
# so every shape keeps vLLM's fp8 matmul (the nearest of these also answers for fused gate_up).
TUNED_FP8: dict[tuple[int, int, int], Config | None] = {
    (4096, 4096, 1): None,
    (4096, 6144, 1): None,
    (4096, 14336, 1): None,
    (14336, 4096, 1): None,
}
