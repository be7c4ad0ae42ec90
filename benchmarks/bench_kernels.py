"""Benchmark (and tune) the sparse linear on a CUDA GPU against cuBLAS, at Llama-3-8B shapes, bf16.

    python benchmarks/bench_kernels.py --out DIR           # table with the committed configs
    python benchmarks/bench_kernels.py --tune --out DIR    # sweep kernel configs first; writes DIR/tuned_h100.py

Timing: a CUDA graph of one call per weight copy (about 1 GB of copies, so that even at 90% sparsity a
copy's rows have left the 50 MB L2 before it comes round again), cycling through 8 input sets, replayed
back to back; the median over repeats, per call. No L2 flush: its dirty lines would be written back inside
the next timed kernel. A sparsity s means the threshold is the s-quantile of |x| of each input set (random
normal data, never zeros). Each configuration is checked against `sparse_linear_reference` (poisoned output)
before it is timed. "dense" is the faster of cuBLAS on the two weight layouts (`F.linear` on [out, in],
`addmm` on [in, out]), bias included; "sparse" is what the plugin gets: `sparse_linear` with its dispatch.
"ideal" is 1 / (fraction of weight rows some token keeps).
"""

import argparse
import itertools
import json
import math
import multiprocessing as mp
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from vllm_spon import kernels
from vllm_spon.kernels import configs
from vllm_spon.kernels import triton_sparse as ts
from vllm_spon.kernels.reference import sparse_linear_reference

SHAPES = {  # name: (in, segment ends)
    "gate_up 4096->14336": (4096, [14336]),
    "down 14336->4096": (14336, [4096]),
    "qkv 4096->6144": (4096, [4096, 5120, 6144]),
    "o 4096->4096": (4096, [4096]),
    "gate_up fused 4096->2x14336": (4096, [14336, 28672]),
}
TOKENS = (1, 2, 4, 8, 16)  # the table; tuning covers configs.TOKEN_BUCKETS (more tokens go dense)
PREFILL_TOKENS = (32, 64, 512)
TUNE_SPARSITIES = (0.5, 0.0, 0.75)  # all configs at the first, the best few at all three
TABLE_SPARSITIES = (0.0, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9)
INPUT_SETS = 8
ROTATION_BYTES = 1e9  # weight copies per shape
DTYPE = torch.bfloat16


def bench_us(calls: list[Callable[[], object]], replays: int = 10, repeats: int = 9) -> float:
    """Median µs per call of a CUDA graph of `calls` (warmed up first, outside the graph)."""
    for f in calls:
        f()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in calls:
            f()
    graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / (replays * len(calls)))
    del graph
    return sorted(times)[repeats // 2]


class Case:
    """Weights of one shape (several copies, both layouts), bias, and input sets per (tokens, sparsity)."""

    def __init__(self, k: int, ends: list[int]) -> None:
        self.k, self.ends, self.n = k, ends, ends[-1]
        copies = max(1, math.ceil(ROTATION_BYTES / (k * self.n * 2)))
        self.w = [(torch.randn(k, self.n, device="cuda") / k**0.5).to(DTYPE) for _ in range(copies)]
        self.w_linear = [w.t().contiguous() for w in self.w]  # [out, in]: what stock vLLM multiplies
        self.bias = (torch.randn(self.n, device="cuda") * 0.1).to(DTYPE)
        self._inputs: dict[tuple[int, float], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._refs: dict[tuple[int, float], torch.Tensor] = {}

    def inputs(self, tokens: int, s: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """INPUT_SETS (x, thresholds) sets with threshold = s-quantile of |x| (0 for s = 0)."""
        key = (tokens, s)
        if key not in self._inputs:
            sets = []
            for _ in range(INPUT_SETS):
                x = torch.randn(tokens, self.k, device="cuda").to(DTYPE)
                t = torch.quantile(x.float().abs().flatten(), s).item() if s > 0 else 0.0
                sets.append((x, torch.full((len(self.ends),), t, device="cuda")))
            self._inputs[key] = sets
        return self._inputs[key]

    def union(self, tokens: int, s: float) -> float:
        """Fraction of weight rows that some token keeps (first segment's threshold)."""
        return (
            sum(float((x.float().abs() > t[0]).any(0).float().mean()) for x, t in self.inputs(tokens, s)) / INPUT_SETS
        )

    def calls(self, fn: Callable, tokens: int, s: float, weights: list[torch.Tensor] | None = None) -> list:
        """One fn(x, w, t) call per weight copy, cycling through the input sets."""
        sets = self.inputs(tokens, s)
        return [
            lambda i=i, w=w: fn(sets[i % INPUT_SETS][0], w, sets[i % INPUT_SETS][1])
            for i, w in enumerate(weights or self.w)
        ]

    def dense_us(self, tokens: int) -> tuple[float, float]:
        """(F.linear on [out, in], addmm on [in, out]) µs: cuBLAS on the unthresholded input."""
        lin = bench_us(self.calls(lambda x, w, t: F.linear(x, w, self.bias), tokens, 0.0, self.w_linear))
        mm = bench_us(self.calls(lambda x, w, t: torch.addmm(self.bias, x, w), tokens, 0.0))
        return lin, mm

    def check(self, fn: Callable, tokens: int, s: float, **kwargs) -> float:
        """Relative error of fn(x, w, t, **kwargs) against the float32 reference (NaN if any is NaN)."""
        x, t = self.inputs(tokens, s)[0]
        if (tokens, s) not in self._refs:
            self._refs[tokens, s] = sparse_linear_reference(x.float(), self.w[0].float(), t, self.ends, self.bias)
        ref = self._refs[tokens, s]
        y = fn(x, self.w[0], t, **kwargs).float()
        return float((y - ref).norm() / ref.norm()) if not y.isnan().any() else math.nan

    def poisoned(self, tokens: int) -> torch.Tensor:
        return torch.full((tokens, self.n), float("nan"), dtype=DTYPE, device="cuda")


def candidates(k: int, n: int, tokens: int) -> list[ts.Config]:
    """The sweep (pruned by earlier runs, kernels/NOTES.md): the one-tile GEMV for one token, the tensor-core
    kernel for any count. Its fp32 partials of a K split stay under a tenth of the weight bytes."""
    out = []
    if tokens == 1:
        for bn, bm, nw in itertools.product((256, 512, 1024), (16, 32, 64), (2, 4, 8)):
            if 32 <= bm * bn // (32 * nw) <= 256:  # weight elements per thread
                out.append(ts.Config("gemv", bn, bm, num_warps=nw))
    splits = [2**i for i in range(8) if 2 * 2**i * tokens * n * 4 <= k * n * 2 / 10 or i == 0]
    for bn, bm, ns in itertools.product((128, 256), (32, 64), (3, 4)):
        out += [
            ts.Config("dot", bn, bm, sk, 4, ns)
            for sk in splits
            if k // sk >= bm and (sk == 1 or 132 <= triton.cdiv(n, bn) * sk <= 4096)
        ]
    return out


def _compile_worker(tasks: list[tuple[int, list[int], int, ts.Config]]) -> list[str]:
    """Run each task once so that Triton compiles it into the on-disk cache (many processes at once)."""
    errors, weights = [], {}
    for k, ends, tokens, config in tasks:
        key = (k, ends[-1])
        if key not in weights:
            weights[key] = torch.randn(k, ends[-1], device="cuda", dtype=DTYPE)
        x = torch.randn(tokens, k, device="cuda", dtype=DTYPE)
        b = torch.zeros(ends[-1], device="cuda", dtype=DTYPE)
        try:
            ts.launch(x, weights[key], torch.zeros(len(ends), device="cuda"), ends, b, config)
        except Exception as e:  # reported, and the config is skipped later
            errors.append(f"{config}: {type(e).__name__}: {str(e)[:200]}")
    torch.cuda.synchronize()
    return errors


def precompile(tasks: list, procs: int) -> None:
    t0 = time.time()
    chunks = [tasks[i::procs] for i in range(procs)]
    with mp.get_context("spawn").Pool(procs) as pool:
        errors = [e for errs in pool.map(_compile_worker, chunks) for e in errs]
    print(f"compiled {len(tasks)} launches in {time.time() - t0:.0f} s, {len(errors)} errors", flush=True)
    for e in errors[:10]:
        print("  ", e)


def tune(cases: dict[str, Case], log) -> dict:
    """Best config (or None: dense) per (in, out, tokens), by the geometric mean time over TUNE_SPARSITIES."""
    table = {}
    for name, case in cases.items():
        for tokens in configs.TOKEN_BUCKETS:

            def stacked(x, w, t, c=case):  # the dense path of `sparse_linear`
                return kernels._dense_segments(x, w, c.ends, c.bias, ts.sparsify_segments(x, t).__getitem__)

            dense_path = bench_us(case.calls(stacked, tokens, 0.5))
            results = []
            for config in candidates(case.k, case.n, tokens):

                def run(x, w, t, out=None, c=case, config=config):
                    return ts.launch(x, w, t, c.ends, c.bias, config, out=out)

                try:
                    err = case.check(run, tokens, 0.5, out=case.poisoned(tokens))
                    if not err < 1e-2:
                        print(f"WRONG {name} T={tokens} {config}: rel err {err:.2e}", flush=True)
                        continue
                    results.append([bench_us(case.calls(run, tokens, 0.5)), config, run])
                except Exception as e:
                    print(f"FAILED {name} T={tokens} {config}: {type(e).__name__}: {str(e)[:200]}", flush=True)
            results.sort(key=lambda r: r[0])
            if not results:
                print(f"tune {name:28} T={tokens:2} no working config -> dense", flush=True)
                table[(case.k, case.n, tokens)] = None
                continue
            finalists = []
            for us, config, run in results[:5]:
                times = [us] + [bench_us(case.calls(run, tokens, s)) for s in TUNE_SPARSITIES[1:]]
                finalists.append((math.exp(sum(map(math.log, times)) / len(times)), times, config))
            finalists.sort(key=lambda f: f[0])
            geo, times, best = finalists[0]
            choice = best if geo < dense_path else None
            table[(case.k, case.n, tokens)] = choice
            rec = {
                "shape": name,
                "tokens": tokens,
                "dense_path_us": dense_path,
                "best": repr(best),
                "best_us_by_s": dict(zip(TUNE_SPARSITIES, times, strict=True)),
                "chosen": repr(choice),
                "top": [(r[0], repr(r[1])) for r in results[:12]],
            }
            log.write(json.dumps(rec) + "\n")
            log.flush()
            print(
                f"tune {name:28} T={tokens:2} dense path {dense_path:6.1f} us | best {best} "
                f"{' / '.join(f'{t:.1f}' for t in times)} us at s={TUNE_SPARSITIES} -> "
                f"{'sparse' if choice else 'dense'}",
                flush=True,
            )
    return table


def write_table(table: dict, path: Path) -> None:
    lines = [
        '"""Written by `benchmarks/bench_kernels.py --tune` on an H100 (bf16); None: dense is faster."""',
        "",
        "from .triton_sparse import Config",
        "",
        "TUNED: dict[tuple[int, int, int], Config | None] = {",
    ]
    lines += [f"    {key}: {value!r}," for key, value in sorted(table.items())]
    path.write_text("\n".join([*lines, "}", ""]))


def measure(cases: dict[str, Case], log) -> list[dict]:
    """The table: dense vs the plugin's `sparse_linear` per shape, tokens and sparsity."""
    rows = []
    for name, case in cases.items():
        for tokens in TOKENS + PREFILL_TOKENS:
            lin, mm = case.dense_us(tokens)
            config = configs.select(case.k, case.n, tokens, DTYPE)
            for s in TABLE_SPARSITIES if tokens in TOKENS else (0.5,):

                def e2e(x, w, t, c=case):
                    return kernels.sparse_linear(x, w, t, c.ends, c.bias)

                err = case.check(e2e, tokens, s)
                us = bench_us(case.calls(e2e, tokens, s))
                union = case.union(tokens, s)
                row = {
                    "shape": name,
                    "tokens": tokens,
                    "sparsity": s,
                    "dense_linear_us": lin,
                    "dense_mm_us": mm,
                    "sparse_us": us,
                    "ratio": min(lin, mm) / us,
                    "ideal": 1 / union,
                    "rel_err": err,
                    "path": repr(config) if config else "dense",
                }
                rows.append(row)
                log.write(json.dumps(row) + "\n")
                log.flush()
                print(
                    f"{name:28} T={tokens:3} s={s:.2f} dense {min(lin, mm):7.1f} us  sparse {us:7.1f} us  "
                    f"x{row['ratio']:.2f} (ideal {row['ideal']:.2f}) err {err:.1e} "
                    f"{'OK' if err < 1e-2 else 'WRONG'}",
                    flush=True,
                )
    return rows


def dense_anatomy(case: Case, tokens: int) -> str:
    """Where the dense path's time goes for a fused layer: thresholding, the per-segment matmuls, the bias."""
    segs = list(zip([0, *case.ends[:-1]], case.ends, strict=True))
    y = torch.empty(tokens, case.n, device="cuda", dtype=DTYPE)
    stacked = ts.sparsify_segments(case.inputs(tokens, 0.5)[0][0], case.inputs(tokens, 0.5)[0][1])

    def mms(x, w, t):
        for i, (a, b) in enumerate(segs):
            torch.mm(stacked[i], w[:, a:b], out=y[:, a:b])

    parts = {
        "sparsify": bench_us(case.calls(lambda x, w, t: ts.sparsify_segments(x, t), tokens, 0.5)),
        "segment mms": bench_us(case.calls(mms, tokens, 0.5)),
        "bias add": bench_us([lambda: y.add_(case.bias)] * 8),
    }
    return f"dense path anatomy T={tokens}: " + ", ".join(f"{k} {v:.1f} us" for k, v in parts.items())


def markdown(rows: list[dict]) -> str:
    out = [
        "| shape | T | s | dense us | sparse us | ratio | ideal | path |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        out.append(
            f"| {r['shape']} | {r['tokens']} | {r['sparsity']:.2f} | {min(r['dense_linear_us'], r['dense_mm_us']):.1f} "
            f"| {r['sparse_us']:.1f} | {r['ratio']:.2f} | {r['ideal']:.2f} | {r['path']} |"
        )
    return "\n".join(out) + "\n"


def copy_bandwidth_tbs(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy rate, bytes read + written: the memory ceiling."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / (triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median") * 1e-3) / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("artifacts/bench_kernels"))
    parser.add_argument("--tune", action="store_true", help="sweep configs and use the result")
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--procs", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    copy_tbs = copy_bandwidth_tbs()
    print(
        f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, triton {triton.__version__}, "
        f"device copy {copy_tbs:.2f} TB/s (read + write)",
        flush=True,
    )
    cases = {name: Case(*SHAPES[name]) for name in args.shapes}
    if args.tune:
        tasks = [(c.k, c.ends, t, cfg) for c in cases.values() for t in TOKENS for cfg in candidates(c.k, c.n, t)]
        precompile(tasks, args.procs)
        with open(args.out / "tune.jsonl", "w") as log:
            table = tune(cases, log)
        write_table(table, args.out / "tuned_h100.py")
        configs.TUNED.clear()
        configs.TUNED.update(table)
    with open(args.out / "bench.jsonl", "w") as log:
        rows = measure(cases, log)
    for name, case in cases.items():
        if len(case.ends) > 1:
            for tokens in (16, *PREFILL_TOKENS):
                print(name, dense_anatomy(case, tokens), flush=True)
    (args.out / "bench.json").write_text(
        json.dumps({"device": props.name, "copy_tbs": copy_tbs, "rows": rows}, indent=1)
    )
    (args.out / "bench.md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
