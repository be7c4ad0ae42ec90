"""Probe (issue 8/9): how fast can a GPU stream gathered weight rows, apart from every other cost of the
sparse kernels? And what do two launches (compact x once, then a perfectly balanced gather) cost?

A kernel over a precompacted list of kept row indices (sorted, random, fraction f of K) sums the rows of
W^T [K, N] (row-major, or tile-major [N/bn, K, bn]) times the kept values into one partial-sum slot per
program; programs (column tile, split) take contiguous, equal shares of the list. Timed as
bench_kernels.py times (CUDA graph, weight copies rotated past L2). Prints TB/s of kept bytes, and the
two-launch time beside cuBLAS and the committed one-launch kernel.

    python benchmarks/probe_row_gather.py --out DIR
"""

# ruff: noqa: B023  (every lambda is timed inside the iteration that made it)
import argparse
import itertools
import json
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from bench_kernels import bench_us  # run as benchmarks/probe_row_gather.py: its folder is on sys.path

from vllm_spon.kernels import configs
from vllm_spon.kernels import triton_sparse as ts


@triton.jit
def _gather_kernel(w_ptr, idx_ptr, xs_ptr, cnt_ptr, part_ptr, N, stride_row, stride_tile,
                   SPLITS, BN: tl.constexpr, BM: tl.constexpr, STAGES: tl.constexpr):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    count = tl.load(cnt_ptr)
    per = tl.cdiv(tl.cdiv(count, SPLITS), BM) * BM
    lo = pid_s * per
    hi = tl.minimum(lo + per, count)
    offs = tl.arange(0, BN)
    base = w_ptr + pid_n.to(tl.int64) * stride_tile
    acc = tl.zeros([BN], dtype=tl.float32)
    for r0 in tl.range(lo, hi, BM, num_stages=STAGES):
        ranks = r0 + tl.arange(0, BM)
        valid = ranks < hi
        rows = tl.load(idx_ptr + ranks, mask=valid, other=0)
        xv = tl.load(xs_ptr + ranks, mask=valid, other=0.0)
        w = tl.load(base + rows[:, None].to(tl.int64) * stride_row + offs[None, :], mask=valid[:, None],
                    other=0.0, eviction_policy="evict_first")  # fmt: skip
        acc += tl.sum(w.to(tl.float32) * xv[:, None], axis=0)
    tl.store(part_ptr + pid_s * N + pid_n * BN + offs, acc)


@triton.jit
def _compact_all_kernel(x_ptr, thr_ptr, idx_ptr, xs_ptr, cnt_ptr, K, BLOCK: tl.constexpr):
    """One program: the kept inputs of all of x, in order (the first launch of the two-launch design)."""
    offs = tl.arange(0, BLOCK)
    xv = tl.load(x_ptr + offs, mask=offs < K, other=0.0).to(tl.float32)
    keep = tl.abs(xv) > tl.load(thr_ptr)
    dst = tl.cumsum(keep.to(tl.int32), axis=0) - 1
    tl.store(idx_ptr + dst, offs, mask=keep)
    tl.store(xs_ptr + dst, xv, mask=keep)
    tl.store(cnt_ptr, tl.sum(keep.to(tl.int32), axis=0))


SHAPES = {"gate_up": (4096, 14336), "down": (14336, 4096), "fused": (4096, 28672)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda")
    rows_out: list[dict] = []
    log = args.out / "probe_row_gather.log"
    log.write_text("")

    def emit(r: dict) -> None:
        rows_out.append(r)
        line = json.dumps(r)
        print(line, flush=True)
        with log.open("a") as f:
            f.write(line + "\n")

    fracs = (0.5, 1.0)
    for (name, (K, N)), dtype in itertools.product(SHAPES.items(), (torch.bfloat16, torch.float8_e4m3fn)):
        elem = dtype.itemsize
        copies = max(2, int(1e9 // (K * N * elem)))
        ws = [(torch.randn(K, N, device=dev) * 0.02).to(dtype) for _ in range(copies)]
        w_lin = [(torch.randn(N, K, device=dev) * 0.02).to(torch.bfloat16) for _ in range(max(2, int(5e8 // (K * N))))]
        xb = torch.randn(1, K, device=dev, dtype=torch.bfloat16)
        dense = bench_us([lambda i=i: F.linear(xb, w_lin[i]) for i in range(len(w_lin))])
        emit({"shape": name, "dtype": str(dtype), "what": "cuBLAS bf16", "us": dense})
        w_lin = None
        if elem == 1:  # the fp8 baseline: cuBLASLt on the same bytes in its own layout, x quantized beforehand
            one = torch.ones((), device=dev)
            x8 = torch.zeros(1, K, device=dev).to(dtype)
            cm = [w.t().contiguous().t() for w in ws]
            mm = bench_us([lambda i=i: torch._scaled_mm(x8, cm[i], one, one, out_dtype=torch.bfloat16)
                           for i in range(len(cm))])  # fmt: skip
            emit({"shape": name, "dtype": str(dtype), "what": "_scaled_mm", "us": mm})
            cm = None
        tiled: dict[int, list[torch.Tensor]] = {}  # tile-major copies of ws, one bn at a time
        for f in fracs:
            count = int(K * f)
            idx = torch.sort(torch.randperm(K, device=dev)[:count]).values.to(torch.int32)
            idx = torch.cat([idx, torch.zeros(8192, dtype=torch.int32, device=dev)])
            xs = torch.randn(count + 8192, device=dev)
            cnt = torch.tensor([count], dtype=torch.int32, device=dev)
            kept_bytes = count * N * elem
            bns = (1024, 2048, 4096) if elem == 2 else (2048, 4096)
            for bn, stages, progs, layout in itertools.product(bns, (1, 3), (264, 1056), ("row", "tile")):
                bm, warps = 8, 8 if bn * elem > 4096 else 4
                if N % bn:
                    continue
                tiles = N // bn
                splits = max(1, progs // tiles)
                if layout == "tile":
                    if bn not in tiled:
                        tiled.clear()
                        tiled[bn] = [w.view(K, tiles, bn).transpose(0, 1).contiguous() for w in ws]
                    wl, stride_row, stride_tile = tiled[bn], bn, K * bn
                else:
                    wl, stride_row, stride_tile = ws, N, bn
                part = torch.empty(splits * N, device=dev)

                def call(i, wl=wl, splits=splits, tiles=tiles, bn=bn, bm=bm, stages=stages, warps=warps,
                         sr=stride_row, st=stride_tile, part=part):  # fmt: skip
                    _gather_kernel[(tiles, splits)](wl[i], idx, xs, cnt, part, N, sr, st, splits, BN=bn, BM=bm,
                                                    STAGES=stages, num_warps=warps)  # fmt: skip

                try:
                    us = bench_us([lambda i=i: call(i) for i in range(len(wl))])
                except Exception as e:  # out of resources etc.
                    emit({"shape": name, "dtype": str(dtype), "f": f, "bn": bn, "bm": bm, "warps": warps,
                          "stages": stages, "splits": splits, "layout": layout, "error": str(e)[:200]})  # fmt: skip
                    continue
                emit({"shape": name, "dtype": str(dtype), "f": f, "bn": bn, "bm": bm, "warps": warps,
                      "stages": stages, "splits": splits, "layout": layout, "us": us,
                      "tbs": kept_bytes / us / 1e6})  # fmt: skip
        # The two-launch design end to end, at its best gather config, against the committed one-launch kernel.
        tiled.clear()
        for f in (0.5, 0.75, 1.0):
            x = torch.randn(1, K, device=dev, dtype=torch.bfloat16)
            thr = torch.quantile(x.float().abs(), f).reshape(1) if f < 1 else torch.tensor([1e9], device=dev)
            idx = torch.zeros(K + 8192, dtype=torch.int32, device=dev)
            xs = torch.zeros(K + 8192, device=dev)
            cnt = torch.zeros(1, dtype=torch.int32, device=dev)
            block = triton.next_power_of_2(K)

            def compact():
                _compact_all_kernel[(1,)](x, thr, idx, xs, cnt, K, BLOCK=block, num_warps=16)

            emit({"shape": name, "dtype": str(dtype), "what": "compact_all", "s": f, "us": bench_us([compact])})
            for layout in ("row", "tile"):
                best = min((r for r in rows_out if r.get("shape") == name and r.get("dtype") == str(dtype)
                            and r.get("f") == 0.5 and r.get("layout") == layout and "us" in r),
                           key=lambda r: r["us"])  # fmt: skip
                bn, tiles, splits = best["bn"], N // best["bn"], best["splits"]
                wl = ws if layout == "row" else [w.view(K, tiles, bn).transpose(0, 1).contiguous() for w in ws]
                sr, st = (N, bn) if layout == "row" else (bn, K * bn)
                part = torch.empty(splits * N, device=dev)

                def two(i, wl=wl, bn=bn, tiles=tiles, splits=splits, sr=sr, st=st, part=part, best=best):
                    compact()
                    _gather_kernel[(tiles, splits)](wl[i], idx, xs, cnt, part, N, sr, st, splits, BN=bn,
                                                    BM=best["bm"], STAGES=best["stages"],
                                                    num_warps=best["warps"])  # fmt: skip

                us = bench_us([lambda i=i: two(i) for i in range(len(wl))])
                emit({"shape": name, "dtype": str(dtype), "what": f"two launches ({layout}, no finish)", "s": f,
                      "us": us, "gather": {k: best[k] for k in ("bn", "stages", "splits")}})  # fmt: skip
                wl = None
            cfg = configs.select(K, N, 1, torch.bfloat16, dev, fp8=elem == 1)
            if cfg is not None:
                scale = torch.ones(N, device=dev) if elem == 1 else None
                one = bench_us([lambda i=i: ts.launch(x, ws[i], thr, [N], None, cfg, weight_scale=scale)
                                for i in range(len(ws))])  # fmt: skip
                emit({"shape": name, "dtype": str(dtype), "what": "committed one-launch", "s": f, "us": one,
                      "config": str(cfg)})  # fmt: skip
        tiled.clear()
        ws = None
        torch.cuda.empty_cache()
    (args.out / "probe_row_gather.json").write_text(json.dumps(rows_out, indent=1))


if __name__ == "__main__":
    main()
