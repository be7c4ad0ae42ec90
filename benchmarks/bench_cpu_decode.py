"""Batch-1 decode and time to first token on vLLM's CPU build: dense against `--load-format spon`, one run.

Both engines of a row run one after the other in this process (each shut down before the next starts), with
the CPU build's settings (`vllm_spon/server.py`: float32 unless `--dtype bfloat16`, the memory fraction and KV
cache that fit 2-core machines), once eager and once with vLLM's default torch.compile. Decode is timed as on the GPU
(`bench_gpu_e2e.decode_rate`); the prompt is held-out text (Persuasion), on which the thresholds zero about
their calibrated fraction. Time to first token is the median over fresh 256-token held-out prompts (no prefix
cache hits): prefill runs the same CPU kernel as decode (kernels/cpu.py), over tiles of tokens.

    .venv/bin/python -m benchmarks.bench_cpu_decode --model artifacts/test-cache/smollm2 \\
        --checkpoint artifacts/test-cache/smollm2-spon50 --json benchmarks/results/cpu_decode.json
(run from the repository root: `-m` puts it on the path, for `benchmarks`).

`--kernels` times the op alone instead, at the example model's shapes: `vllm_spon.kernels.sparse_linear` on an
input thresholded at 50% against the layer vLLM's dense CPU path builds (`dispatch_cpu_unquantized_gemm`:
oneDNN with a prepacked weight, or its AMX kernel for 16-bit weights), weights rotated through copies of twice
the last-level cache so that every call reads them from memory, as in decode, and on as many threads as vLLM's
CPU worker computes with: it keeps one core of the node for its scheduler (2 cores: one thread).
"""

import argparse
import itertools
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from benchmarks.bench_gpu_e2e import DECODE_TOKENS, decode_rate, timed_generate
from vllm_spon.calibration.data import DEFAULT_EVAL_DATA, load_text, token_windows
from vllm_spon.calibration.sparse_model import load_tokenizer
from vllm_spon.format.checkpoint import read_config
from vllm_spon.server import CPU_ENGINE_ARGS, engine

PROMPT_TOKENS = 32
PREFILL_TOKENS = 256
PREFILL_REPEATS = 5
# A short context and a fixed seed; eager and compiled are both measured.
ENGINE_KWARGS = {"max_model_len": 512, "seed": 0}


def held_out_prompts(model: Path, tokens: int, count: int) -> list[list[int]]:
    """`count` windows of `tokens` tokens of the held-out novel, 32k tokens in: text like the calibration data,
    not seen by it."""
    offset = 32_000 // tokens
    windows = token_windows(load_tokenizer(model), load_text(DEFAULT_EVAL_DATA), tokens, count, offset_windows=offset)
    return windows.tolist()


def ttft_ms(llm, prompts: list[list[int]]) -> float:
    """Median time to first token of prompts sent one at a time, after one warm-up prompt."""
    timed_generate(llm, prompts[:1], 1)
    return statistics.median(timed_generate(llm, [p], 1) * 1e3 for p in prompts[1:])


def machine() -> dict:
    from vllm import __version__ as vllm_version

    return {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__, "vllm": vllm_version, "load_average": os.getloadavg()}


def measure(model: Path, checkpoint: Path, new_tokens: int, repeats: int, dtype: str = "float32") -> dict:
    """Dense and SPON batch-1 decode tokens/s, eager and compiled, with the checkpoint's sparsity, both engines
    in `dtype`."""
    prompt = held_out_prompts(model, PROMPT_TOKENS, 1)[0]
    long_prompts = held_out_prompts(model, PREFILL_TOKENS, 1 + PREFILL_REPEATS)
    config = read_config(checkpoint)
    rows = []
    for mode, eager in (("eager", True), ("compiled", False)):
        rates, ttft = {}, {}
        for name, path, load_format in (("dense", model, "auto"), ("spon", checkpoint, "spon")):
            with engine(str(path), load_format=load_format, enforce_eager=eager, dtype=dtype, **ENGINE_KWARGS) as llm:
                rates[name] = decode_rate(llm, [prompt], new_tokens, repeats)
                ttft[name] = ttft_ms(llm, long_prompts)
            print(f"{mode} {name}: {rates[name]:.1f} tok/s, TTFT {ttft[name]:.0f} ms", flush=True)
        rows.append(
            {
                "mode": mode,
                "dense_tok_s": rates["dense"],
                "spon_tok_s": rates["spon"],
                "ratio": rates["spon"] / rates["dense"],
                "dense_ttft_ms": ttft["dense"],
                "spon_ttft_ms": ttft["spon"],
                "ttft_ratio": ttft["dense"] / ttft["spon"],
            }
        )
    return {
        "model": str(model),
        "checkpoint": str(checkpoint),
        "method": config.method,
        "target_sparsity": config.target_sparsity,
        "achieved_sparsity": config.achieved_sparsity,
        "held_out_sparsity": config.perplexity.spon_sparsity if config.perplexity else None,
        "engine": {**CPU_ENGINE_ARGS, **ENGINE_KWARGS, "dtype": dtype},
        "prompt_tokens": PROMPT_TOKENS,
        "prefill_tokens": PREFILL_TOKENS,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "machine": machine(),
        "rows": rows,
    }


def last_level_cache_bytes(default: int = 32 << 20) -> int:
    """Size of CPU 0's last-level cache (Linux sysfs), or `default` where it cannot be read."""
    caches = sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"))
    try:
        size = caches[-1].read_text().strip()
    except (IndexError, OSError):
        return default
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)


def worker_threads() -> int:
    """Threads vLLM's CPU worker computes with by default: the cores it may run on but one, which its OpenMP
    binding leaves to the engine's scheduler process (`VLLM_CPU_OMP_THREADS_BIND=auto`)."""
    return max(1, len(os.sched_getaffinity(0)) - 1)


KERNEL_SHAPES = {"qkv": (576, 960), "o": (576, 576), "gate_up": (576, 3072), "down": (1536, 576)}
KERNEL_TOKENS = (1, 4, 32, 256)


def _median_us(fn, calls: int) -> float:
    fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def _time_pair(xs: torch.Tensor, layers: list, calls: int) -> tuple[float, float]:
    """(SPON, dense) microseconds per call on input xs, each call on the next weight copy."""
    from vllm_spon.kernels import sparse_linear

    weights = itertools.cycle(layers)

    def spon():
        weight_t = next(weights)[1]
        return sparse_linear(xs, weight_t, None, [weight_t.shape[1]])

    def dense():
        layer = next(weights)[0]
        return layer.cpu_linear(xs, layer.weight, None)

    return _median_us(spon, calls), _median_us(dense, calls)


def measure_kernels(dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16), calls: int = 40) -> list[dict]:
    """Microseconds per call, SPON op at 50% against vLLM's dense CPU linear, per shape, dtype and token count."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    from vllm_spon.kernels import sparsify

    gen = torch.Generator().manual_seed(0)
    rotation = 2 * last_level_cache_bytes()
    torch.set_num_threads(worker_threads())
    print(f"{torch.get_num_threads()} threads, weights rotated through {rotation / 2**20:.0f} MB", flush=True)
    rows = []
    for dtype in dtypes:
        for name, (k, n) in KERNEL_SHAPES.items():
            copies = max(2, int(rotation // (k * n * dtype.itemsize)))
            layers = []
            for _ in range(copies):
                layer = torch.nn.Module()
                layer.weight = torch.nn.Parameter((torch.randn(n, k, generator=gen) / k**0.5).to(dtype), False)
                dispatch_cpu_unquantized_gemm(layer, remove_weight=False)
                layers.append((layer, layer.weight.t().contiguous()))
            for tokens in KERNEL_TOKENS:
                x = torch.randn(tokens, k, generator=gen).to(dtype)
                spon_us, dense_us = _time_pair(sparsify(x, x.float().abs().median()), layers, calls)
                rows.append({"dtype": str(dtype).removeprefix("torch."), "layer": name, "in": k, "out": n,
                             "tokens": tokens, "spon_us": spon_us, "dense_us": dense_us, "ratio": dense_us / spon_us})
                print(f"{rows[-1]['dtype']} {name} {k}->{n} T={tokens}: SPON {spon_us:.0f} us, dense {dense_us:.0f} us,"
                      f" {dense_us / spon_us:.2f}x", flush=True)
    return rows


def kernel_table(rows: list[dict]) -> str:
    lines = ["| dtype | layer | T | dense us | SPON 50% us | dense/SPON |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['dtype']} | {r['layer']} {r['in']}->{r['out']} | {r['tokens']} | {r['dense_us']:.0f} | "
              f"{r['spon_us']:.0f} | {r['ratio']:.2f}x |" for r in rows]
    return "\n".join(lines)


def table(result: dict) -> str:
    held_out = result["held_out_sparsity"]
    sparsity = (
        f"SPON at target {result['target_sparsity']:.0%}: achieved {result['achieved_sparsity']:.1%} on "
        f"calibration tokens" + (f", {held_out:.1%} held out" if held_out is not None else "")
    )
    lines = [
        sparsity,
        f"| vLLM CPU, batch 1 | dense tok/s | SPON tok/s | SPON/dense | TTFT {result['prefill_tokens']} tokens, "
        "dense / SPON ms | dense/SPON |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['mode']} | {r['dense_tok_s']:.1f} | {r['spon_tok_s']:.1f} | {r['ratio']:.2f}x | "
        f"{r['dense_ttft_ms']:.0f} / {r['spon_ttft_ms']:.0f} | {r['ttft_ratio']:.2f}x |"
        for r in result["rows"]
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="the dense Hugging Face model directory")
    parser.add_argument("--checkpoint", type=Path, help="a SPON checkpoint of it")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--new-tokens", type=int, default=DECODE_TOKENS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="both engines' dtype (bfloat16: vLLM's AMX path for dense, where the CPU has AMX)")
    parser.add_argument("--kernels", action="store_true", help="time the op alone at the example model's shapes")
    ns = parser.parse_args()
    if ns.kernels:
        result = {"machine": machine(), "threads": worker_threads(), "kernels": measure_kernels()}
    elif ns.model is None or ns.checkpoint is None:
        parser.error("--model and --checkpoint are required (or --kernels)")
    else:
        result = measure(ns.model, ns.checkpoint, ns.new_tokens, ns.repeats, ns.dtype)
    ns.json.parent.mkdir(parents=True, exist_ok=True)
    ns.json.write_text(json.dumps(result, indent=1) + "\n")
    print(kernel_table(result["kernels"]) if ns.kernels else table(result))


if __name__ == "__main__":
    main()
