"""Written by `benchmarks/bench_kernels.py --tune` on an H100 (bf16); None: dense is faster."""

from .triton_sparse import Config

TUNED: dict[tuple[int, int, int], Config | None] = {
    (4096, 4096, 1): Config(bn=256, bm=32, split_k=16, num_warps=4, num_stages=3, dot=True),
    (4096, 4096, 2): Config(bn=128, bm=32, split_k=16, num_warps=4, num_stages=3, dot=True),
    (4096, 4096, 4): Config(bn=128, bm=32, split_k=8, num_warps=4, num_stages=4, dot=True),
    (4096, 4096, 8): None,
    (4096, 4096, 16): None,
    (4096, 6144, 1): Config(bn=256, bm=32, split_k=16, num_warps=4, num_stages=3, dot=True),
    (4096, 6144, 2): Config(bn=128, bm=32, split_k=8, num_warps=4, num_stages=3, dot=True),
    (4096, 6144, 4): Config(bn=128, bm=32, split_k=8, num_warps=4, num_stages=3, dot=True),
    (4096, 6144, 8): Config(bn=128, bm=32, split_k=8, num_warps=4, num_stages=3, dot=True),
    (4096, 6144, 16): Config(bn=128, bm=32, split_k=4, num_warps=4, num_stages=4, dot=True),
    (4096, 14336, 1): Config(bn=1024, bm=8, split_k=32, num_warps=4, num_stages=1, dot=False),
    (4096, 14336, 2): Config(bn=256, bm=32, split_k=4, num_warps=4, num_stages=3, dot=True),
    (4096, 14336, 4): Config(bn=256, bm=32, split_k=4, num_warps=4, num_stages=3, dot=True),
    (4096, 14336, 8): Config(bn=256, bm=32, split_k=4, num_warps=4, num_stages=3, dot=True),
    (4096, 14336, 16): Config(bn=256, bm=32, split_k=4, num_warps=4, num_stages=3, dot=True),
    (4096, 28672, 1): Config(bn=1024, bm=8, split_k=32, num_warps=4, num_stages=1, dot=False),
    (4096, 28672, 2): Config(bn=256, bm=32, split_k=2, num_warps=4, num_stages=4, dot=True),
    (4096, 28672, 4): Config(bn=256, bm=32, split_k=2, num_warps=4, num_stages=3, dot=True),
    (4096, 28672, 8): Config(bn=256, bm=32, split_k=2, num_warps=4, num_stages=3, dot=True),
    (4096, 28672, 16): Config(bn=256, bm=32, split_k=2, num_warps=4, num_stages=3, dot=True),
    (14336, 4096, 1): Config(bn=256, bm=32, split_k=32, num_warps=4, num_stages=3, dot=True),
    (14336, 4096, 2): Config(bn=256, bm=32, split_k=16, num_warps=4, num_stages=3, dot=True),
    (14336, 4096, 4): Config(bn=128, bm=32, split_k=16, num_warps=4, num_stages=3, dot=True),
    (14336, 4096, 8): Config(bn=128, bm=32, split_k=8, num_warps=4, num_stages=4, dot=True),
    (14336, 4096, 16): Config(bn=128, bm=32, split_k=8, num_warps=4, num_stages=4, dot=True),
}
