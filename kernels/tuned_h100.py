"""Written by `benchmarks/bench_kernels.py --tune`; empty until tuned."""

from .triton_sparse import Config

TUNED: dict[tuple[int, int, int], Config | None] = {}
