"""Benchmark (and tune) the sparse linear on a CUDA GPU against cuBLAS, at Llama-3-8B shapes, bf16.

    python benchmarks/bench_kernels.py --out DIR           # table with the committed configs
    python benchmarks/bench_kernels.py --tune --out DIR    # sweep configs first; writes DIR/tuned_<gpu>.py
    python benchmarks/bench_kernels.py --tune --tokens 1 --candidates-from OLD/tune.jsonl --out DIR
                                                           # one token, only a previous sweep's finalists
    python benchmarks/bench_kernels.py --tune --tokens 1 --candidates-from A/tune.jsonl B/tune.jsonl
        --fanins 0 4 8 16 --out DIR                        # each also with two-level finishes (Config.fanin)
    python benchmarks/bench_kernels.py --fp8 --out DIR     # float8 weights, one token: DIR/fp8.{md,json}

On a host without vLLM, make the checkout importable first: `eval "$(bash scripts/gpu_host_env.sh)"`.

Timing: a CUDA graph of one call per weight copy (about 1 GB of copies, so that even at 90% sparsity a
copy's rows have left the 50 MB L2 before it comes round again), cycling through 8 input sets, replayed
back to back; the median over repeats, per call. No L2 flush: its dirty lines would be written back inside
the next timed kernel. A sparsity s means the threshold is the s-quantile of |x| of each input set (random
normal data, never zeros). Each configuration is checked against `sparse_linear_reference` (poisoned output)
before it is timed. "dense" is the faster of cuBLAS on the two weight layouts (`F.linear` on [out, in],
`addmm` on [in, out]), bias included. "sparse" is what the plugin gets: `sparse_linear` with its dispatch, on
an input the caller thresholded (thresholds None, the plugin's usual case; the tuning sweep passes the
per-segment thresholds instead, which cost the kernels the same). "ideal" is 1 / (fraction of weight rows
some token keeps).

--fp8 (one token): the one-token kernels on float8_e4m3 weights `[in, out]` with a per-output-channel scale
and the fused bias (bf16 x, no activation quantization), against two baselines on the same fp8 weights in
cuBLAS's layout: "mm", `torch._scaled_mm` alone on an x quantized beforehand (vLLM's fp8 linear where its
activation quantization is fused into the op producing x), and "q+mm", a one-kernel dynamic per-tensor
activation quantization (amax and cast in one program, what Inductor makes of vLLM's QuantFP8) followed by
`_scaled_mm`; bf16 cuBLAS alongside; with vLLM importable also vLLM's own `scaled_fp8_quant` and
`cutlass_scaled_mm`. Every row prints the ratio to both. --tune sweeps `fp8_candidates` (all at s=0.5, the
FINALISTS best at s=0 and 0.75) and writes the TUNED_FP8 entries the MARGIN rule picks (bf16's one-token
rule) against "mm" (the stricter baseline) into DIR/tuned_<gpu>.py beside the committed TUNED; without
--tune the committed TUNED_FP8 is measured through `sparse_linear_fp8`. Both end with the table at TABLE_FP8_SPARSITIES.
A written table serves vLLM before it is committed with `VLLM_SPON_KERNEL_TABLE=DIR/tuned_<gpu>.py`, and a
bf16 --tune under that variable keeps its TUNED_FP8.
"""

import argparse
import dataclasses
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
import triton.language as tl

from vllm_spon import kernels
from vllm_spon.kernels import configs
from vllm_spon.kernels import triton_sparse as ts
from vllm_spon.kernels.reference import sparse_linear_reference, sparsify

SHAPES = {  # name: (in, segment ends)
    "gate_up 4096->14336": (4096, [14336]),
    "down 14336->4096": (14336, [4096]),
    "qkv 4096->6144": (4096, [4096, 5120, 6144]),
    "o 4096->4096": (4096, [4096]),
    "gate_up fused 4096->2x14336": (4096, [14336, 28672]),
}
TOKENS = configs.TOKEN_BUCKETS  # the table, and the tuning (a bucket is tuned at its largest token count)
PREFILL_TOKENS = (32, 64, 512)
TUNE_SPARSITIES = (0.5, 0.0, 0.75)  # all configs at the first, the best few at all three
FINALISTS = 8
FLOOR = 0.98  # from FLOOR_TOKENS tokens on, a sparse config must reach this ratio to cuBLAS at sparsity 0
FLOOR_TOKENS = 4
MARGIN = 0.97  # and beat cuBLAS by more than run-to-run noise (one cuBLAS sample read 32.7 us, others 30.5)
TABLE_SPARSITIES = (0.0, 0.4, 0.5, 0.6, 0.75, 0.9)
INPUT_SETS = 8
ROTATION_BYTES = 1e9  # weight copies per shape
DTYPE = torch.bfloat16
FP8 = torch.float8_e4m3fn
FP8_SHAPES = ("gate_up 4096->14336", "down 14336->4096", "qkv 4096->6144", "o 4096->4096",
              "gate_up fused 4096->2x14336")  # fmt: skip
TABLE_FP8_SPARSITIES = (0.0, 0.5, 0.75, 0.9, 1.0)  # 1.0: every input dropped, the kernel's fixed cost


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


@dataclasses.dataclass
class Inputs:
    x: torch.Tensor
    thresholds: torch.Tensor  # [segments], all the s-quantile of |x|
    sparse_x: torch.Tensor  # S(x): what the plugin hands the kernel (thresholds None)


class Case:
    """Weights of one shape (several copies, both layouts), bias, and input sets per (tokens, sparsity)."""

    def __init__(self, k: int, ends: list[int]) -> None:
        self.k, self.ends, self.n = k, ends, ends[-1]
        copies = max(1, math.ceil(ROTATION_BYTES / (k * self.n * 2)))
        self.w = [(torch.randn(k, self.n, device="cuda") / k**0.5).to(DTYPE) for _ in range(copies)]
        self.w_linear = [w.t().contiguous() for w in self.w]  # [out, in]: what stock vLLM multiplies
        self.bias = (torch.randn(self.n, device="cuda") * 0.1).to(DTYPE)
        self._inputs: dict[tuple[int, float], list[Inputs]] = {}
        self._refs: dict[tuple[int, float], torch.Tensor] = {}
        self._dense: dict[int, tuple[float, float]] = {}

    def inputs(self, tokens: int, s: float) -> list[Inputs]:
        """INPUT_SETS input sets with threshold = s-quantile of |x| (0 for s = 0)."""
        key = (tokens, s)
        if key not in self._inputs:
            sets = []
            for _ in range(INPUT_SETS):
                x = torch.randn(tokens, self.k, device="cuda").to(DTYPE)
                t = torch.quantile(x.float().abs().flatten(), s).item() if s > 0 else 0.0
                sets.append(Inputs(x, torch.full((len(self.ends),), t, device="cuda"), sparsify(x, t)))
            self._inputs[key] = sets
        return self._inputs[key]

    def union(self, tokens: int, s: float) -> float:
        """Fraction of weight rows that some token keeps."""
        sets = self.inputs(tokens, s)
        return sum(float((i.sparse_x != 0).any(0).float().mean()) for i in sets) / INPUT_SETS

    def calls(self, fn: Callable, tokens: int, s: float, weights: list[torch.Tensor] | None = None) -> list:
        """One fn(inputs, w) call per weight copy, cycling through the input sets."""
        sets = self.inputs(tokens, s)
        return [lambda i=i, w=w: fn(sets[i % INPUT_SETS], w) for i, w in enumerate(weights or self.w)]

    def dense_us(self, tokens: int) -> tuple[float, float]:
        """(F.linear on [out, in], addmm on [in, out]) µs: cuBLAS on the unthresholded input."""
        if tokens not in self._dense:
            lin = bench_us(self.calls(lambda i, w: F.linear(i.x, w, self.bias), tokens, 0.0, self.w_linear))
            mm = bench_us(self.calls(lambda i, w: torch.addmm(self.bias, i.x, w), tokens, 0.0))
            self._dense[tokens] = (lin, mm)
        return self._dense[tokens]

    def check(self, fn: Callable, tokens: int, s: float, **kwargs) -> float:
        """Relative error of fn(inputs, w, **kwargs) against the float32 reference (NaN if any is NaN)."""
        i = self.inputs(tokens, s)[0]
        if (tokens, s) not in self._refs:
            self._refs[tokens, s] = sparse_linear_reference(
                i.x.float(), self.w[0].float(), i.thresholds, self.ends, self.bias
            )
        ref = self._refs[tokens, s]
        y = fn(i, self.w[0], **kwargs).float()
        return float((y - ref).norm() / ref.norm()) if not y.isnan().any() else math.nan

    def poisoned(self, tokens: int) -> torch.Tensor:
        return torch.full((tokens, self.n), float("nan"), dtype=DTYPE, device="cuda")


def _compact_candidates(k: int, n: int, elem_bytes: int) -> list[ts.Config]:
    """The compacting kernels for W^T `[k, n]`: the FMA form with column tiles of 16 bytes a thread across
    the warps (the row sum stays in each thread), groups of 8-16 rows, the group loop pipelined 2-4 deep
    (fp8 run 2: unpipelined, the loads of one group wait for the previous group's sum) or not, blocks of
    256-1024 inputs and splits such that the grid has 128-1100 programs and a program 1-16 groups at 50%;
    the tensor-core form at the few configs that came near in run 2."""
    per_warp = 32 * 16 // elem_bytes  # columns of one warp's 16-byte loads
    out = []
    for nw, bm, block, splits, stages in itertools.product((2, 4, 8), (8, 16), (256, 512, 1024), (1, 2, 4),
                                                           (1, 2, 3, 4)):  # fmt: skip
        bn = per_warp * nw
        programs = math.ceil(n / bn) * math.ceil(k / block) * splits
        groups_at_half = block / (2 * bm * splits)
        if 128 <= programs <= 1100 and 1 <= groups_at_half <= (4 if stages == 1 else 32):
            out.append(ts.Config("compact", bn, bm, num_warps=nw, num_stages=stages, groups=block // bm, splits=splits))
    for bn, nw, stages in itertools.product((256, 512), (4, 8), (1, 3)):
        for block, splits in ((256, 2), (512, 2), (256, 1)):
            out.append(ts.Config("compact_mma", bn, 32, num_warps=nw, num_stages=stages, groups=block // 32,
                                 splits=splits))  # fmt: skip
    return out


def _full_k_candidates(k: int, n: int, elem_bytes: int) -> list[ts.Config]:
    """`_full_k_kernel` (no partial sums): row pieces of 32-128 bytes, groups of 32-128 rows, 2-8 warps with
    16-128 bytes a thread a stage, 2-4 stages, at least 64 programs."""
    out = []
    for row_bytes, bm, nw, stages in itertools.product((32, 64, 128), (32, 64, 128), (2, 4, 8), (2, 3, 4)):
        bn = row_bytes // elem_bytes
        per_thread = bm * row_bytes // (32 * nw)
        if math.ceil(n / bn) >= 64 and 16 <= per_thread <= 128:
            out.append(ts.Config("full_k", bn, bm, num_warps=nw, num_stages=stages, groups=1024 // bm))
    return out


FINALISTS_OF: list[ts.Config] | None = None  # --candidates-from: these instead of the full sweep
FANINS: tuple[int, ...] = (0,)  # --fanins: the one-token sweep takes each config with each of these


def with_fanins(configs_: list[ts.Config], k: int) -> list[ts.Config]:
    """Each config with every FANINS value that gives its slots on `k` inputs a two-level finish (at least two
    groups), besides its one-level form."""
    out = []
    for c in configs_:
        slots = ts.partial_slots(c, k)
        out += [c] + [dataclasses.replace(c, fanin=f) for f in FANINS if 1 < f < slots and f != c.fanin]
    return list(dict.fromkeys(out))


def finalists_of(paths: list[Path], tokens: int = 1) -> list[ts.Config]:
    """Every finalist config of previous `--tune` logs (tune.jsonl) at `tokens`, all shapes together: a
    re-tune after a kernel change that fits one device call (the full one-token sweep is ~1000 configs)."""
    found: dict[str, ts.Config] = {}
    for line in (line for path in paths for line in path.read_text().splitlines()):
        rec = json.loads(line)
        if rec.get("tokens", 1) == tokens:  # fp8 logs are one-token only
            for *_, config in rec["finalists"]:
                found.setdefault(config, eval(config, {"Config": ts.Config}))  # our own log
    return list(found.values())


def candidates(tokens: int, k: int = 4096, n: int = 14336) -> list[ts.Config]:
    """The bf16 sweep for W^T `[k, n]`, pruned by the H200 runs (kernels/NOTES.md). One token: the
    compacting kernels (`_compact_candidates`), the kept-rows kernel at the configs that won before, and the
    one-tile GEMV at its best configs. 2-4 tokens: the compacting kernels on the union of the kept rows and
    the tensor-core union kernel at its best H100 configs; more tokens: the latter only.
    With `--candidates-from`, one token takes that log's finalists instead, and 2-4 tokens its compacting ones."""
    if tokens == 1 and FINALISTS_OF is not None:
        return with_fanins(FINALISTS_OF, k)
    if tokens > 1:
        dot = [ts.Config("dot", bn, 32, sk, 4, ns) for bn, sk, ns in ((128, 8, 3), (256, 4, 3), (256, 16, 3))]
        if tokens > ts.MAX_COMPACT_TOKENS:
            return dot
        compact = FINALISTS_OF if FINALISTS_OF is not None else _compact_candidates(k, n, 2)
        return [c for c in compact if c.kind in ("compact", "compact_mma")] + dot
    out = _compact_candidates(k, n, 2) + _full_k_candidates(k, n, 2)
    for bn, nw, splits in ((512, 2, 4), (1024, 4, 4), (1024, 4, 2)):  # run 2's best
        out.append(ts.Config("rows", bn, 16, num_warps=nw, groups=16, splits=splits))
    gemv = ((512, 2), (1024, 2), (1024, 4), (2048, 4), (2048, 8))
    return with_fanins(out + [ts.Config("gemv", bn, 32, num_warps=nw) for bn, nw in gemv], k)


def fp8_candidates(k: int, n: int) -> list[ts.Config]:
    """The fp8 sweep (one byte a weight): the compacting kernels, and run 1's best GEMV and kept-rows; with
    `--candidates-from`, that log's finalists."""
    if FINALISTS_OF is not None:
        return with_fanins(FINALISTS_OF, k)
    return with_fanins([*_compact_candidates(k, n, 1), *_full_k_candidates(k, n, 1),
                        ts.Config("gemv", 2048, 32, num_warps=4),
                        ts.Config("rows", 2048, 16, num_warps=4, groups=16, splits=4)], k)  # fmt: skip


def _compile_worker(tasks: list[tuple[int, list[int], int, ts.Config, bool]]) -> list[str]:
    """Run each task once so that Triton compiles it into the on-disk cache (many processes at once)."""
    errors, weights = [], {}
    for k, ends, tokens, config, fp8 in tasks:
        key = (k, ends[-1], fp8)
        if key not in weights:
            weights[key] = torch.randn(k, ends[-1], device="cuda", dtype=DTYPE)
            if fp8:
                weights[key] = weights[key].to(FP8)
        x = torch.randn(tokens, k, device="cuda", dtype=DTYPE)
        b = torch.zeros(ends[-1], device="cuda", dtype=DTYPE)
        scale = torch.ones(ends[-1], device="cuda") if fp8 else None
        try:
            ts.launch(x, weights[key], torch.zeros(len(ends), device="cuda"), ends, b, config, weight_scale=scale)
        except Exception as e:  # reported, and the config is skipped later
            errors.append(f"{config}: {type(e).__name__}: {str(e)[:200]}")
    torch.cuda.synchronize()
    return errors


def precompile(cases: dict[str, "Case"], procs: int, tokens_list=TOKENS, fp8: bool = False) -> None:
    """Compile every candidate once (a binary serves all shapes that tile alike), in parallel processes."""
    tasks, seen = [], set()
    for c in cases.values():
        for tokens in tokens_list:
            for config in fp8_candidates(c.k, c.n) if fp8 else candidates(tokens, c.k, c.n):
                key = (tokens, dataclasses.replace(config, bn=ts.tile_n(config.bn, c.ends)))
                if key not in seen:
                    seen.add(key)
                    tasks.append((c.k, c.ends, tokens, config, fp8))
    t0 = time.time()
    chunks = [tasks[i::procs] for i in range(procs)]
    with mp.get_context("spawn").Pool(procs) as pool:
        errors = [e for errs in pool.map(_compile_worker, chunks) for e in errs]
    print(f"compiled {len(tasks)} launches in {time.time() - t0:.0f} s, {len(errors)} errors", flush=True)
    for e in errors[:10]:
        print("  ", e)


def tune(cases: dict[str, Case], log, tokens_list=TOKENS) -> dict:
    """Per (in, out, token bucket): the sparse config with the best geometric-mean time over TUNE_SPARSITIES
    if that, and its time at sparsity 0.5 (what a checkpoint runs at), beat cuBLAS by MARGIN, else None
    (dense): at 2 tokens a fast 75% can carry a geometric mean while 40-50% lose. From FLOOR_TOKENS tokens on,
    where the union of the rows leaves little to skip, only among configs within FLOOR of cuBLAS at 0."""
    table = {}
    for name, case in cases.items():
        for tokens in tokens_list:
            dense = min(case.dense_us(tokens))
            floor = FLOOR if tokens >= FLOOR_TOKENS else 0.0
            results = []
            for config in candidates(tokens, case.k, case.n):

                def run(i, w, out=None, c=case, config=config):
                    return ts.launch(i.x, w, i.thresholds, c.ends, c.bias, config, out=out)

                try:
                    err = case.check(run, tokens, 0.5, out=case.poisoned(tokens))
                    if not err < 1e-2:
                        print(f"WRONG {name} T={tokens} {config}: rel err {err:.2e}", flush=True)
                        continue
                    results.append([bench_us(case.calls(run, tokens, 0.5)), config, run])
                except Exception as e:
                    print(f"FAILED {name} T={tokens} {config}: {type(e).__name__}: {str(e)[:200]}", flush=True)
            results.sort(key=lambda r: r[0])
            finalists = []
            for us, config, run in results[:FINALISTS]:
                times = [us] + [bench_us(case.calls(run, tokens, s)) for s in TUNE_SPARSITIES[1:]]
                finalists.append((math.exp(sum(map(math.log, times)) / len(times)), times, config))
            finalists.sort(key=lambda f: f[0])
            at = {s: i for i, s in enumerate(TUNE_SPARSITIES)}
            fit = [f for f in finalists if dense / f[1][at[0.0]] >= floor and max(f[0], f[1][at[0.5]]) < MARGIN * dense]
            choice = fit[0][2] if fit else None
            table[(case.k, case.n, tokens)] = choice
            rec = {
                "shape": name,
                "tokens": tokens,
                "dense_us": dense,
                "finalists": [(f[0], dict(zip(TUNE_SPARSITIES, f[1], strict=True)), repr(f[2])) for f in finalists],
                "chosen": repr(choice),
                "all": [(r[0], repr(r[1])) for r in results],  # every config at s = 0.5, fastest first
            }
            log.write(json.dumps(rec) + "\n")
            log.flush()
            best = finalists[0] if finalists else (math.nan, [math.nan] * 3, None)
            print(
                f"tune {name:28} T={tokens:2} cuBLAS {dense:6.1f} us | best {best[2]} "
                f"{' / '.join(f'{t:.1f}' for t in best[1])} us at s={TUNE_SPARSITIES} -> {choice}",
                flush=True,
            )
    return table


def write_table(table: dict, path: Path, device: str, fp8_table: dict | None = None) -> None:
    lines = [
        f'"""Written by `benchmarks/bench_kernels.py --tune` on an {device} (bf16); None: cuBLAS is faster."""',
        "",
        "# ruff: noqa: E501",
        "",
        "from vllm_spon.kernels.triton_sparse import Config",
        "",
        "TUNED: dict[tuple[int, int, int], Config | None] = {",
    ]
    lines += [f"    {key}: {value!r}," for key, value in sorted(table.items())]
    lines.append("}")
    if fp8_table is not None:
        lines += ["", "# Float8 weights, one token (`bench_kernels.py --fp8 --tune`); None: vLLM's fp8 matmul.",
                  "TUNED_FP8: dict[tuple[int, int, int], Config | None] = {"]  # fmt: skip
        lines += [f"    {key}: {value!r}," for key, value in sorted(fp8_table.items())]
        lines.append("}")
    path.write_text("\n".join([*lines, ""]))


def measure(cases: dict[str, Case], log) -> list[dict]:
    """The table: cuBLAS vs the plugin's `sparse_linear` (presparsified input) per shape, tokens, sparsity."""
    rows = []
    for name, case in cases.items():
        for tokens in TOKENS + PREFILL_TOKENS:
            lin, mm = case.dense_us(tokens)
            config = configs.select(case.k, case.n, tokens, DTYPE, torch.device("cuda"))
            for s in TABLE_SPARSITIES if tokens in TOKENS else (0.5,):

                def e2e(i, w, c=case):
                    return kernels.sparse_linear(i.sparse_x, w, None, c.ends, c.bias)

                err = case.check(e2e, tokens, s)
                us = bench_us(case.calls(e2e, tokens, s))
                row = {
                    "shape": name,
                    "tokens": tokens,
                    "sparsity": s,
                    "dense_linear_us": lin,
                    "dense_mm_us": mm,
                    "sparse_us": us,
                    "ratio": min(lin, mm) / us,
                    "ideal": 1 / case.union(tokens, s),
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


def markdown(rows: list[dict]) -> str:
    """One line per (shape, tokens): cuBLAS µs, then sparse µs (ratio) per sparsity, and the path."""
    out = [
        "| shape | T | cuBLAS us | " + " | ".join(f"s={s}" for s in TABLE_SPARSITIES) + " | path |",
        "| --- " * (len(TABLE_SPARSITIES) + 4) + "|",
    ]
    for (shape, tokens), group in itertools.groupby(rows, key=lambda r: (r["shape"], r["tokens"])):
        group = list(group)
        by_s = {r["sparsity"]: f"{r['sparse_us']:.1f} ({r['ratio']:.2f}x)" for r in group}
        dense = min(group[0]["dense_linear_us"], group[0]["dense_mm_us"])
        cells = [by_s.get(s, "") for s in TABLE_SPARSITIES]
        out.append(f"| {shape} | {tokens} | {dense:.1f} | " + " | ".join(cells) + f" | {group[0]['path']} |")
    return "\n".join(out) + "\n"


@triton.jit
def _quant_fp8_kernel(x_ptr, q_ptr, s_ptr, K, BLOCK: tl.constexpr):
    """Dynamic per-tensor fp8 quantization of one token in one program: scale = amax / 448, q = x / scale."""
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < K, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), axis=0) / 448.0, 1e-12)
    tl.store(s_ptr, scale)
    tl.store(q_ptr + offs, (x / scale).to(tl.float8e4nv), mask=offs < K)


class Fp8Case:
    """The fp8 copies of a Case's weights (per-output-channel amax scales): `[in, out]` row-major for the
    kernels and the same bytes column-major for `_scaled_mm`; the baselines' µs, measured once."""

    def __init__(self, case: Case) -> None:
        self.case = case
        self.weights = []  # (fp8 [in, out] row-major, its scale, the same weight column-major)
        for w in case.w:
            scale = (w.float().abs().amax(dim=0) / 448.0).clamp_min(1e-12)
            w8 = (w.float() / scale).to(FP8)
            self.weights.append((w8, scale, w8.t().contiguous().t()))
        self.baselines = self._baselines()

    def _baselines(self) -> dict[str, float]:
        case, one = self.case, torch.ones((), device="cuda")
        x8 = {id(i): (i.x.float() / (i.x.float().abs().amax() / 448.0)).to(FP8) for i in case.inputs(1, 0.0)}
        q = torch.empty(1, case.k, dtype=FP8, device="cuda")
        qs = torch.empty((), device="cuda")
        block = triton.next_power_of_2(case.k)

        def quant(x):
            _quant_fp8_kernel[(1,)](x, q, qs, case.k, BLOCK=block, num_warps=16)
            return q, qs

        def mm(i, w):
            return torch._scaled_mm(x8[id(i)], w[2], one, one, out_dtype=DTYPE)

        def qmm(i, w):
            xq, sx = quant(i.x)
            return torch._scaled_mm(xq, w[2], sx, one, out_dtype=DTYPE)

        i0 = case.inputs(1, 0.0)[0]
        ref = i0.x.float() @ self.weights[0][0].float()  # scale_b is one: the weight's raw fp8 values
        err = float((qmm(i0, self.weights[0]).float() - ref).norm() / ref.norm())
        out = {"mm": bench_us(case.calls(mm, 1, 0.0, self.weights)),
               "q+mm": bench_us(case.calls(qmm, 1, 0.0, self.weights)),
               "bf16": min(case.dense_us(1)), "q+mm rel err": err}  # fmt: skip
        try:  # vLLM's own kernels, where vLLM is installed (the e2e call)
            from vllm import _custom_ops as ops

            def vq(i, w):
                xq, sx = ops.scaled_fp8_quant(i.x, None)
                return ops.cutlass_scaled_mm(xq, w[2], sx, one.reshape(1), out_dtype=DTYPE)

            def vmm(i, w):
                return ops.cutlass_scaled_mm(x8[id(i)], w[2], one.reshape(1), one.reshape(1), out_dtype=DTYPE)

            out["vllm cutlass"] = bench_us(case.calls(vmm, 1, 0.0, self.weights))
            out["vllm quant+cutlass"] = bench_us(case.calls(vq, 1, 0.0, self.weights))
        except Exception as e:  # no vLLM here
            out["vllm"] = f"{type(e).__name__}: {str(e)[:120]}"
        return out

    def run_fn(self, config: ts.Config | None):
        """fn(inputs, w) of the kernel under `config`, or of the plugin's entry (the committed table) if None."""
        from vllm_spon.kernels.fp8 import sparse_linear_fp8

        c = self.case
        if config is None:
            return lambda i, w: sparse_linear_fp8(i.x, w[0], w[1], i.thresholds, c.ends, c.bias)
        return lambda i, w: ts.launch(i.x, w[0], i.thresholds, c.ends, c.bias, config, weight_scale=w[1])

    def check(self, fn, s: float) -> float:
        i0 = self.case.inputs(1, s)[0]
        w8, scale, _ = self.weights[0]
        ref = sparse_linear_reference(i0.x.float(), w8.float() * scale, i0.thresholds, self.case.ends, self.case.bias)
        y = fn(i0, self.weights[0]).float()
        return float((y - ref).norm() / ref.norm()) if not y.isnan().any() else math.nan

    def time(self, fn, s: float) -> float:
        return bench_us(self.case.calls(fn, 1, s, self.weights))


def tune_fp8(fcases: dict[str, Fp8Case], log) -> tuple[dict, dict]:
    """Per shape: every fp8 candidate at s = 0.5, the FINALISTS best at s = 0 and 0.75; the TUNED_FP8 entry
    is the best geometric mean over TUNE_SPARSITIES if it beats "mm" (`_scaled_mm` alone) by MARGIN, else
    None (vLLM's fp8 matmul): the bf16 rule for one token, with no floor at s = 0 (a checkpoint's thresholds
    are fitted to its target sparsity, where the kernel is timed). Returns (table, the best geometric mean
    whether chosen or not)."""
    table, best = {}, {}
    for name, fc in fcases.items():
        base = fc.baselines["mm"]
        results = []
        for config in fp8_candidates(fc.case.k, fc.case.n):
            fn = fc.run_fn(config)
            try:
                err = fc.check(fn, 0.5)
                if not err < 1e-2:
                    print(f"WRONG fp8 {name} {config}: rel err {err:.2e}", flush=True)
                    continue
                results.append([fc.time(fn, 0.5), config, fn])
            except Exception as e:
                print(f"FAILED fp8 {name} {config}: {type(e).__name__}: {str(e)[:200]}", flush=True)
        results.sort(key=lambda r: r[0])
        finalists = []
        for us, config, fn in results[:FINALISTS]:
            times = [us] + [fc.time(fn, s) for s in TUNE_SPARSITIES[1:]]
            finalists.append((math.exp(sum(map(math.log, times)) / len(times)), times, config))
        finalists.sort(key=lambda f: f[0])
        fit = [f for f in finalists if f[0] < MARGIN * base]
        choice = fit[0][2] if fit else None
        table[(fc.case.k, fc.case.n, 1)] = choice
        best[(fc.case.k, fc.case.n, 1)] = finalists[0][2] if finalists else None
        rec = {"shape": name, "baselines": fc.baselines, "chosen": repr(choice),
               "finalists": [(f[0], dict(zip(TUNE_SPARSITIES, f[1], strict=True)), repr(f[2])) for f in finalists],
               "all": [(r[0], repr(r[1])) for r in results]}  # fmt: skip
        log.write(json.dumps(rec) + "\n")
        log.flush()
        for f in finalists:
            ratios = " ".join(f"s={s}: {t:.1f} ({base / t:.2f}x)" for s, t in zip(TUNE_SPARSITIES, f[1], strict=True))
            print(f"fp8 tune {name:28} mm {base:5.1f} | {f[2]} {ratios}", flush=True)
        print(f"fp8 tune {name:28} -> {choice}", flush=True)
    return table, best


def measure_fp8(fcases: dict[str, Fp8Case], table: dict | None, log, best: dict | None = None) -> list[dict]:
    """The fp8 table: per shape and TABLE_FP8_SPARSITIES, the kernel (under `table`'s config, or through
    `sparse_linear_fp8` with the committed TUNED_FP8 when table is None; where the entry is None, `best`'s
    config, labelled as not in the table) against every baseline."""
    rows = []
    for name, fc in fcases.items():
        key = (fc.case.k, fc.case.n, 1)
        config = table.get(key) if table is not None else configs.select(*key, DTYPE, torch.device("cuda"), fp8=True)
        fn = fc.run_fn(config) if table is not None else fc.run_fn(None)
        label = repr(config) if config else "vLLM fp8 matmul"
        if config is None and best and best.get(key) is not None:
            config = best[key]
            fn, label = fc.run_fn(config), f"not in the table (below the rules): {config!r}"
        for s in TABLE_FP8_SPARSITIES:
            if config is None:  # the dense path: nothing of ours to time
                us, err = math.nan, math.nan
            else:
                err = fc.check(fn, s)
                us = fc.time(fn, s)
            b = {k: v for k, v in fc.baselines.items() if isinstance(v, float) and "err" not in k}
            union = fc.case.union(1, s)
            row = {"shape": name, "sparsity": s, "us": us, "rel_err": err, "path": label, "baselines_us": b,
                   "ratios": {k: v / us for k, v in b.items()}, "ideal": 1 / union if union else math.inf}  # fmt: skip
            rows.append(row)
            log.write(json.dumps(row) + "\n")
            log.flush()
            r = row["ratios"]
            extra = "".join(f" | {k} {b[k]:.1f} x{r[k]:.2f}" for k in b if k.startswith("vllm"))
            print(f"fp8 {name:28} s={s:.2f} ours {us:6.1f} us | mm {b['mm']:5.1f} x{r['mm']:.2f} | q+mm "
                  f"{b['q+mm']:5.1f} x{r['q+mm']:.2f} | bf16 {b['bf16']:5.1f} x{r['bf16']:.2f}{extra} | err {err:.1e} "
                  f"{row['path']}", flush=True)  # fmt: skip
    return rows


def fp8_markdown(rows: list[dict]) -> str:
    """One line per shape: the baselines' µs, then ours µs (x ratio to "mm" / to "q+mm") per sparsity."""
    out = ["| shape | mm us | q+mm us | bf16 us | " + " | ".join(f"s={s}" for s in TABLE_FP8_SPARSITIES)
           + " | path |", "| --- " * (5 + len(TABLE_FP8_SPARSITIES)) + "|"]  # fmt: skip
    for shape, group in itertools.groupby(rows, key=lambda r: r["shape"]):
        group = list(group)
        b = group[0]["baselines_us"]
        cells = [f"{r['us']:.1f} ({r['ratios']['mm']:.2f}x / {r['ratios']['q+mm']:.2f}x)" for r in group]
        out.append(f"| {shape} | {b['mm']:.1f} | {b['q+mm']:.1f} | {b['bf16']:.1f} | " + " | ".join(cells)
                   + f" | {group[0]['path']} |")  # fmt: skip
    return "\n".join(out) + "\n"


def dump_kernels(path: Path) -> None:
    """Registers, spills and shared memory of every compiled variant of the sparse kernels in this process."""
    out = []
    for fn in (ts._compact_kernel, ts._kept_rows_kernel, ts._gemv_kernel):
        try:
            for cache in fn.device_caches.values():
                for key, k in cache[0].items():
                    out.append({"kernel": fn.__name__, "key": str(key)[:400], "n_regs": k.n_regs,
                                "n_spills": k.n_spills, "shared": k.metadata.shared})  # fmt: skip
        except Exception as e:
            out.append({"kernel": fn.__name__, "error": f"{type(e).__name__}: {e}"})
    path.write_text(json.dumps(out, indent=1))


def copy_bandwidth_tbs(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy rate, bytes read + written: the memory ceiling."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / (triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median") * 1e-3) / 1e12


def main() -> None:
    global FINALISTS_OF, FANINS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("artifacts/bench_kernels"))
    parser.add_argument("--tune", action="store_true", help="sweep configs and use the result")
    parser.add_argument("--fp8", action="store_true", help="float8 weights, one token (see above)")
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--tokens", nargs="*", type=int, default=list(TOKENS), choices=list(TOKENS),
                        help="token buckets --tune sweeps (the others keep the committed table's entries)")
    parser.add_argument("--no-table", action="store_true", help="--tune only, no table afterwards")
    parser.add_argument("--procs", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    parser.add_argument("--candidates-from", type=Path, nargs="+", help="previous --tune logs (tune.jsonl): "
                        "their one-token finalists are the one-token sweep")  # fmt: skip
    parser.add_argument("--fanins", nargs="*", type=int, default=list(FANINS),
                        help="one-token sweep: each config also with these two-level finishes (Config.fanin)")
    args = parser.parse_args()
    FANINS = tuple(args.fanins)
    if args.candidates_from:
        FINALISTS_OF = finalists_of(args.candidates_from)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    copy_tbs = copy_bandwidth_tbs()
    print(
        f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, triton {triton.__version__}, "
        f"device copy {copy_tbs:.2f} TB/s (read + write)",
        flush=True,
    )
    if args.fp8:
        shapes = [s for s in args.shapes if s in FP8_SHAPES]
        fcases = {name: Fp8Case(Case(*SHAPES[name])) for name in shapes}
        for name, fc in fcases.items():
            print(f"fp8 baselines {name}: {fc.baselines}", flush=True)
        table, best = None, None
        if args.tune:
            precompile({n: fc.case for n, fc in fcases.items()}, args.procs, (1,), fp8=True)
            with open(args.out / "fp8_tune.jsonl", "w") as log:
                table, best = tune_fp8(fcases, log)
            write_table(configs.table_for(props.name), args.out / f"tuned_{configs.gpu_slug(props.name)}.py",
                        props.name, table)  # fmt: skip
        with open(args.out / "fp8.jsonl", "w") as log:
            rows = measure_fp8(fcases, table, log, best)
        (args.out / "fp8.json").write_text(json.dumps({"device": props.name, "copy_tbs": copy_tbs, "rows": rows},
                                                      indent=1))  # fmt: skip
        (args.out / "fp8.md").write_text(fp8_markdown(rows))
        dump_kernels(args.out / "fp8_kernels.json")
        print(fp8_markdown(rows), table)
        return
    cases = {name: Case(*SHAPES[name]) for name in args.shapes}
    if args.tune:
        tokens = tuple(args.tokens)
        precompile(cases, args.procs, tokens)
        with open(args.out / "tune.jsonl", "w") as log:
            table = tune(cases, log, tokens)
        committed = configs.table_for(props.name)
        table = {**committed, **table}
        write_table(table, args.out / f"tuned_{configs.gpu_slug(props.name)}.py", props.name,
                    dict(configs.table_for(props.name, fp8=True)))  # fmt: skip
        dump_kernels(args.out / "tune_kernels.json")
        committed.clear()
        committed.update(table)
        if args.no_table:
            return
    with open(args.out / "bench.jsonl", "w") as log:
        rows = measure(cases, log)
    (args.out / "bench.json").write_text(
        json.dumps({"device": props.name, "copy_tbs": copy_tbs, "rows": rows}, indent=1)
    )
    (args.out / "bench.md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
