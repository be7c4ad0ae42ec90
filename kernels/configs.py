"""Launch configurations of the sparse kernels, chosen offline per GPU model (no autotuning at call time).

`benchmarks/bench_kernels.py --tune` writes `tuned_<gpu>.py` on the GPU it runs on (`gpu_slug` of the
device name: "NVIDIA H200" -> `tuned_h200.py`): for each tuned (in, out) shape and token bucket, the config
with the best geometric-mean time over sparsities 0/0.5/0.75, or None where that or its time at 0.5 does not
beat cuBLAS by 3% (from 4 tokens on also where it falls below 0.98x of cuBLAS at sparsity 0). The dispatch
reads only the token count, so one CUDA graph per batch size always takes one branch.
A GPU without a table of its own takes `DEFAULT_GPU`'s (the H200's: the kernel design was measured there;
run the tuning on such a GPU for a table of its own). Unseen shapes borrow the nearest tuned shape's choice
(log distance), with split_k rescaled to keep about as many programs in flight.
Float8 weights have a table of their own (`TUNED_FP8`); with no measured fp8 entry for a token bucket,
dispatch keeps the dense path (under vLLM, its own fp8 matmul).
`VLLM_SPON_KERNEL_TABLE=PATH` replaces the packaged tables with a `tuned_<gpu>.py` a tuning run wrote (a GPU
of another model, or a re-tune to try before it is committed).
"""

import dataclasses
import hashlib
import importlib
import math
import os
import re
import runpy
from functools import cache
from pathlib import Path

import torch

from . import vllm_batch_invariant
from .triton_sparse import Config

TOKEN_BUCKETS = (1, 2, 4, 8, 16)  # a token count takes the next bucket up; more tokens: dense (prefill)
DEFAULT_GPU = "h200"
TABLE_ENV = "VLLM_SPON_KERNEL_TABLE"


def gpu_slug(device_name: str) -> str:
    """The model in a device name, lower case: "NVIDIA H100 80GB HBM3" -> "h100", "NVIDIA H200" -> "h200"."""
    return next((w.lower() for w in re.findall(r"[A-Za-z]*\d+[A-Za-z]*", device_name)), "unknown")


@cache
def table_for(device_name: str, fp8: bool = False) -> dict[tuple[int, int, int], Config | None]:
    """The tuned table of a GPU model, or DEFAULT_GPU's when it has none. fp8: the table for float8 weights
    (`TUNED_FP8`, from `bench_kernels.py --fp8`), empty where none was measured. `$VLLM_SPON_KERNEL_TABLE`,
    where set, is read instead, whatever the GPU."""
    override = os.environ.get(TABLE_ENV)
    if override:
        tables = _table_file(Path(override))
    else:
        try:
            tables = vars(importlib.import_module(f".tuned_{gpu_slug(device_name)}", __package__))
        except ModuleNotFoundError:
            tables = vars(importlib.import_module(f".tuned_{DEFAULT_GPU}", __package__))
    return tables.get("TUNED_FP8", {}) if fp8 else tables["TUNED"]


def _table_file(path: Path) -> dict:
    """The names a `tuned_<gpu>.py` outside the package defines; a file that is not one is refused in a line."""
    fix = f"unset {TABLE_ENV} or point it at a tuned_<gpu>.py written by benchmarks/bench_kernels.py --tune"
    try:
        tables = runpy.run_path(str(path))
    except Exception as e:  # any failure to read or run it: the file is not a table
        raise RuntimeError(f"{TABLE_ENV}={path}: cannot be read as a kernel table ({type(e).__name__}: {e}); "
                           f"{fix}") from None  # fmt: skip
    if not isinstance(tables.get("TUNED"), dict):
        raise RuntimeError(f"{TABLE_ENV}={path}: defines no TUNED table; {fix}")
    return tables


def dispatch_identity(device: torch.device) -> str:
    """A digest of everything `select` reads on `device` (its two tables, vLLM's batch-invariant mode).

    Which layers take the sparse fp8 kernel is fixed when the model is built, so a graph that vLLM compiled and
    cached under one table would call layers that another table left on vLLM's matmul; the loader hashes this
    into the compile-cache key."""
    name = _device_name(device)
    tables = [sorted(table_for(name, fp8).items()) for fp8 in (False, True)]
    return hashlib.sha256(repr((name, tables, vllm_batch_invariant())).encode()).hexdigest()[:16]


@cache
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else DEFAULT_GPU


def select(
    k: int, n: int, tokens: int, dtype: torch.dtype, device: torch.device | None = None, fp8: bool = False
) -> Config | None:
    """The sparse-kernel config for x `[tokens, k]` @ W^T `[k, n]` on `device`, or None for the dense path.

    fp8: W^T is float8 (one byte per element): only the fp8 table is read, and a token bucket it has no
    measured entry for takes the dense path (vLLM's own fp8 matmul), never a config borrowed from bf16.
    """
    bucket = next((b for b in TOKEN_BUCKETS if tokens <= b), None)
    if bucket is None or vllm_batch_invariant():  # prefill; or one matmul for every token count
        return None
    table = table_for(DEFAULT_GPU if device is None else _device_name(device), fp8)
    config = table.get((k, n, bucket), ...)
    if config is ...:
        shapes = [(kk, nn) for kk, nn, b in table if b == bucket]
        if not shapes:
            return None if fp8 else _default(k, n, bucket)
        config = _nearest(table, shapes, k, n, bucket)
    if config is not None and dtype == torch.float32:  # twice the bytes per element: same bytes per row
        config = dataclasses.replace(config, bn=max(16, config.bn // 2))
    return config


def _nearest(table: dict, shapes: list[tuple[int, int]], k: int, n: int, bucket: int) -> Config | None:
    kk, nn = min(shapes, key=lambda s: abs(math.log(s[0] / k)) + abs(math.log(s[1] / n)))
    config = table[(kk, nn, bucket)]
    if config is None or config.kind != "dot":  # one tile per program: the grid follows the shape by itself
        return config
    tiles = math.ceil(nn / config.bn) * config.split_k / math.ceil(n / config.bn)
    return dataclasses.replace(config, split_k=max(1, min(round(tiles), k // config.bm)))


def _default(k: int, n: int, bucket: int) -> Config | None:
    """An empty table: the kept-rows kernel for one token (the H200's best for gate_up), dense beyond."""
    return Config("rows", bn=512, bm=16, num_warps=2, groups=8) if bucket == 1 else None
