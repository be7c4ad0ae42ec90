"""Serve a SPON checkpoint with `vllm serve --load-format spon` and query it with the `openai` client.

    .venv/bin/python examples/serve_and_query.py artifacts/smollm2-spon50
    .venv/bin/python examples/serve_and_query.py --base-url http://127.0.0.1:8000/v1   # a server you started

Make a checkpoint first (README, "Calibrate and evaluate"). Started here, the server gets this machine's
defaults (float32 and a smaller memory fraction on the CPU build) and stops when the script ends.
"""

import argparse
import tempfile
from contextlib import nullcontext
from pathlib import Path

from openai import OpenAI

from vllm_spon.server import vllm_server


def query(base_url: str) -> None:
    client = OpenAI(base_url=base_url, api_key="none")
    model = client.models.list().data[0].id
    completion = client.completions.create(model=model, prompt="The capital of France is", max_tokens=16,
                                           temperature=0)
    print("completion:", repr(completion.choices[0].text))
    chat = client.chat.completions.create(
        model=model, max_tokens=64, temperature=0,
        messages=[{"role": "user", "content": "Give me three tips for writing clear code."}],
    )
    print("chat:", chat.choices[0].message.content)
    print("usage:", chat.usage.prompt_tokens, "prompt tokens,", chat.usage.completion_tokens, "completion tokens")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", nargs="?", type=Path, help="SPON checkpoint to serve")
    parser.add_argument("--base-url", help="query this running server instead of starting one")
    ns = parser.parse_args()
    if (ns.checkpoint is None) == (ns.base_url is None):
        parser.error("give a checkpoint to serve or --base-url of a running server, not both")
    log = Path(tempfile.gettempdir()) / "vllm-spon-serve.log"
    server = nullcontext(ns.base_url) if ns.base_url else vllm_server(ns.checkpoint, "--load-format", "spon",
                                                                        log_path=log)
    with server as base_url:
        query(base_url)


if __name__ == "__main__":
    main()
