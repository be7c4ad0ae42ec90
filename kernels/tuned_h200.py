"""Placeholder until `benchmarks/bench_kernels.py --tune` runs on an H200; None: dense is faster."""

from .triton_sparse import Config

TUNED: dict[tuple[int, int, int], Config | None] = {
    (4096, 4096, 1): Config("rows", bn=512, bm=32, groups=4, num_warps=4),
    (4096, 4096, 2): Config("rows", bn=512, bm=32, groups=4, num_warps=4),
}
