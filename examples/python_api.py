"""The Python-API twin of `vllm serve CHECKPOINT --load-format spon`: generate and chat with a SPON checkpoint.

    .venv/bin/python examples/python_api.py artifacts/smollm2-spon50

Make a checkpoint first (README, "Calibrate and evaluate"):
    .venv/bin/vllm-spon example-model artifacts/smollm2
    .venv/bin/vllm-spon calibrate artifacts/smollm2 --sparsity 0.5 --output artifacts/smollm2-spon50
"""

import argparse
import os

import torch

from vllm_spon.server import CPU_ENGINE_ARGS, CPU_ENV

PROMPTS = ["The capital of France is", "Once upon a time, in a small village,"]


def engine_settings() -> dict:
    """vLLM's defaults on a GPU. On the CPU build: float32 (the CPU path skips weight rows only for float32),
    and a memory fraction and KV cache (GiB) that fit small machines; set before vLLM is imported."""
    if torch.cuda.is_available():
        return {}
    for key, value in CPU_ENV.items():
        os.environ.setdefault(key, value)
    return {**CPU_ENGINE_ARGS, "max_model_len": 2048}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a SPON checkpoint directory")
    parser.add_argument("--max-tokens", type=int, default=32)
    ns = parser.parse_args()
    settings = engine_settings()
    from vllm import LLM, SamplingParams

    llm = LLM(ns.checkpoint, load_format="spon", **settings)
    greedy = SamplingParams(temperature=0.0, max_tokens=ns.max_tokens)
    for output in llm.generate(PROMPTS, greedy):
        print(f"{output.prompt!r} -> {output.outputs[0].text!r}")
    [reply] = llm.chat([{"role": "user", "content": "In one sentence, who was Jane Austen?"}], greedy)
    print(f"chat -> {reply.outputs[0].text!r}")


if __name__ == "__main__":
    main()
