"""Batch-1 decode and time to first token on vLLM's CPU build: dense against `--load-format spon`, one run.

Both engines of a row run one after the other in this process (each shut down before the next starts), with
the test suite's CPU settings (`tests/plugin_helpers.py`: float32, the memory fraction and KV cache that fit
2-core machines), once eager and once with vLLM's default torch.compile. Decode is timed as on the GPU
(`bench_gpu_e2e.decode_rate`); the prompt is held-out text (Persuasion), on which the thresholds zero about
their calibrated fraction. Time to first token is the median over fresh 256-token held-out prompts (no prefix
cache hits): prefill runs the same CPU kernel as decode (kernels/cpu.py), over tiles of tokens.

    .venv/bin/python -m benchmarks.bench_cpu_decode --model artifacts/test-cache/smollm2 \\
        --checkpoint artifacts/test-cache/smollm2-spon50 --json benchmarks/results/cpu_decode.json
(run from the repository root: `-m` puts it on the path, for `benchmarks` and `tests`).
"""

import argparse
import json
import os
import platform
import statistics
from pathlib import Path

import torch

from benchmarks.bench_gpu_e2e import DECODE_TOKENS, decode_rate, timed_generate
from tests.plugin_helpers import ENGINE_KWARGS, engine
from vllm_spon.calibration.checkpoint import read_config
from vllm_spon.calibration.data import DEFAULT_EVAL_DATA, load_text, token_windows
from vllm_spon.calibration.sparse_model import load_tokenizer

PROMPT_TOKENS = 32
PREFILL_TOKENS = 256
PREFILL_REPEATS = 5


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


def measure(model: Path, checkpoint: Path, new_tokens: int, repeats: int) -> dict:
    """Dense and SPON batch-1 decode tokens/s, eager and compiled, with the checkpoint's sparsity."""
    from vllm import __version__ as vllm_version

    prompt = held_out_prompts(model, PROMPT_TOKENS, 1)[0]
    long_prompts = held_out_prompts(model, PREFILL_TOKENS, 1 + PREFILL_REPEATS)
    config = read_config(checkpoint)
    rows = []
    for mode, eager in (("eager", True), ("compiled", False)):
        rates, ttft = {}, {}
        for name, path, load_format in (("dense", model, "auto"), ("spon", checkpoint, "spon")):
            with engine(str(path), load_format=load_format, enforce_eager=eager) as llm:
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
        "engine": {k: v for k, v in ENGINE_KWARGS.items() if k != "enforce_eager"},
        "prompt_tokens": PROMPT_TOKENS,
        "prefill_tokens": PREFILL_TOKENS,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "vllm": vllm_version,
        },
        "rows": rows,
    }


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
    parser.add_argument("--model", type=Path, required=True, help="the dense Hugging Face model directory")
    parser.add_argument("--checkpoint", type=Path, required=True, help="a SPON checkpoint of it")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--new-tokens", type=int, default=DECODE_TOKENS)
    parser.add_argument("--repeats", type=int, default=5)
    ns = parser.parse_args()
    result = measure(ns.model, ns.checkpoint, ns.new_tokens, ns.repeats)
    ns.json.parent.mkdir(parents=True, exist_ok=True)
    ns.json.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))


if __name__ == "__main__":
    main()
