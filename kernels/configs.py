"""Launch configurations of the sparse kernels, chosen offline (no autotuning at call time).

`tuned_h100.py` is written by `benchmarks/bench_kernels.py --tune` on an H100: for each tuned (in, out) shape
and token bucket, the fastest config over sparsities 0/0.5/0.75, or None where a dense matmul was faster.
Unseen shapes borrow the nearest tuned shape's choice (log distance), with split_k rescaled to keep about as
many programs in flight.
"""

import dataclasses
import math

import torch

from .triton_sparse import Config
from .tuned_h100 import TUNED

TOKEN_BUCKETS = (1, 2)  # tuned token counts (next bucket up); more tokens: dense (NOTES.md)


def select(k: int, n: int, tokens: int, dtype: torch.dtype) -> Config | None:
    """The sparse-kernel config for x `[tokens, k]` @ W^T `[k, n]`, or None for the dense path."""
    bucket = next((b for b in TOKEN_BUCKETS if tokens <= b), None)
    if bucket is None:  # prefill
        return None
    config = TUNED.get((k, n, bucket), ...)
    if config is ...:
        config = _nearest(k, n, bucket)
    if config is not None and dtype == torch.float32:  # twice the bytes per element: same bytes per row
        config = dataclasses.replace(config, bn=max(16, config.bn // 2))
    return config


def _nearest(k: int, n: int, bucket: int) -> Config | None:
    shapes = [(kk, nn) for kk, nn, b in TUNED if b == bucket]
    if not shapes:
        return _default(k, n, bucket)
    kk, nn = min(shapes, key=lambda s: abs(math.log(s[0] / k)) + abs(math.log(s[1] / n)))
    config = TUNED[(kk, nn, bucket)]
    if config is None:
        return None
    if config.kind == "gemv":  # one tile per program: the grid follows the shape by itself
        return config
    tiles = math.ceil(nn / config.bn) * config.split_k / math.ceil(n / config.bn)
    return dataclasses.replace(config, split_k=max(1, min(round(tiles), k // config.bm)))


def _default(k: int, n: int, bucket: int) -> Config:
    """No table at all: the GEMV for one token, else about 4 programs per SM of an H100-sized GPU."""
    if bucket == 1:
        return Config("gemv", bn=1024, bm=32, num_warps=2)
    split_k = max(1, min(528 // math.ceil(n / 128), k // 64))
    return Config("dot", 128, 64, split_k, num_warps=4, num_stages=3)
