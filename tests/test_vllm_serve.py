"""A real `vllm serve CHECKPOINT --load-format spon` process on 127.0.0.1, queried with the `openai` client;
and every kind of bad checkpoint stopping `vllm serve` at start-up with a message naming file and tensor."""

import asyncio
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tests.checkpoint_edits import edit_config, edit_tensors
from tests.reference_cases import MAX_TOKENS
from vllm_spon.server import ServerStartError, vllm_server

pytestmark = pytest.mark.slow
SERVED_NAME = "smollm2-spon"


@pytest.fixture(scope="module")
def serve_log(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serve") / "vllm-serve.log"


@pytest.fixture(scope="module")
def base_url(spon_reference_case, serve_log):
    """Eager: this module tests the HTTP surface; `vllm serve` with torch.compile (about 100 s of tracing on two
    cores) is tested by tests/test_batch_invariance.py."""
    with vllm_server(spon_reference_case.checkpoint, "--load-format", "spon", "--served-model-name", SERVED_NAME,
                     "--max-model-len", "512", "--seed", "0", "--enforce-eager", log_path=serve_log) as url:
        yield url


def test_start_up_logs_what_was_loaded(base_url, serve_log, spon_reference_case):
    [line] = [line for line in serve_log.read_text().splitlines() if "SPON: " in line]
    assert spon_reference_case.checkpoint in line and "Installed on 120 vLLM linears" in line
    assert "qkv_proj x30" in line and "SponDenseLinearMethod(UnquantizedLinearMethod) x120" in line
    assert "target sparsity 0.50" in line and "210 fused biases" in line and "21/210 segments thresholded" in line


@pytest.fixture(scope="module")
def tokenizer(example_model_dir):
    return AutoTokenizer.from_pretrained(example_model_dir)


def complete(base_url: str, prompts: list, concurrent: bool) -> list[str]:
    """Greedy completions of `prompts`: all in flight at once, or one after another."""
    from openai import AsyncOpenAI

    async def one(client, prompt) -> str:
        reply = await client.completions.create(model=SERVED_NAME, prompt=prompt, max_tokens=MAX_TOKENS,
                                                temperature=0, extra_body={"ignore_eos": True})
        return reply.choices[0].text

    async def run() -> list[str]:
        async with AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0) as client:
            if concurrent:
                return list(await asyncio.gather(*(one(client, p) for p in prompts)))
            return [await one(client, p) for p in prompts]

    return asyncio.run(run())


def test_completions_give_the_reference_tokens(base_url, spon_reference_case, tokenizer):
    texts = complete(base_url, spon_reference_case.prompts, concurrent=False)  # token-id prompts
    assert texts == [tokenizer.decode(t) for t in spon_reference_case.tokens]


def test_32_concurrent_requests_return_what_they_return_alone(base_url, spon_reference_case, tokenizer):
    prompts = [tokenizer.decode(p) for p in spon_reference_case.prompts]
    requests = [prompts[i % len(prompts)] for i in range(32)]
    alone = dict(zip(prompts, complete(base_url, prompts, concurrent=False), strict=True))
    together = complete(base_url, requests, concurrent=True)
    assert together == [alone[p] for p in requests]
    assert len(set(alone.values())) == len(prompts)


def test_chat_completions_apply_the_chat_template(base_url, tokenizer):
    """A chat request answers exactly like a completion of the chat-templated prompt."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key="none", max_retries=0)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat = client.chat.completions.create(model=SERVED_NAME, messages=messages, max_tokens=12, temperature=0)
    templated = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    plain = client.completions.create(model=SERVED_NAME, prompt=templated, max_tokens=12, temperature=0,
                                      extra_body={"add_special_tokens": False})
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.completion_tokens > 0
    assert chat.choices[0].message.content == plain.choices[0].text
    assert client.models.list().data[0].id == SERVED_NAME


def test_vllm_bench_serve_measures_the_spon_server(base_url, example_model_dir, tmp_path):
    """vLLM's serving benchmark, run against `vllm serve --load-format spon`, completes every request."""
    import subprocess

    from vllm_spon.server import vllm_executable

    cmd = [vllm_executable(), "bench", "serve", "--base-url", base_url.removesuffix("/v1"), "--model", SERVED_NAME,
           "--tokenizer", str(example_model_dir), "--dataset-name", "random", "--random-input-len", "16",
           "--random-output-len", "8", "--num-prompts", "4", "--ignore-eos", "--save-result",
           "--result-dir", str(tmp_path), "--result-filename", "serve.json"]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    result = json.loads((tmp_path / "serve.json").read_text())
    assert result["completed"] == 4 and result["total_output_tokens"] == 32


# --- bad checkpoints: each stops start-up; the message names the file and the tensor ------------------------

def _overlay_copy(checkpoint: Path, output: Path) -> Path:
    """A copy of `checkpoint` with its own `spon/` and links to its model files (no weight copies)."""
    output.mkdir()
    for item in checkpoint.iterdir():
        if item.name == "spon":
            shutil.copytree(item, output / "spon")
        else:
            (output / item.name).symlink_to(item.resolve())
    return output


def _relink(link: Path, target: Path) -> None:
    link.unlink()
    link.symlink_to(target)


MODULE = "model.layers.15.mlp.down_proj"
# One case per kind of refusal (no checkpoint, identity, links, tensors): what each says is the one validator's
# (tests/test_checkpoint.py and tests/test_reliability.py test every refusal without a server); here, that
# `vllm serve` stops with it.
BAD_CHECKPOINTS = {
    "no spon/": (lambda p: shutil.rmtree(p / "spon"), "spon/config.json does not exist"),
    "mis-shaped tensor": (lambda p: edit_tensors(p, lambda t: t.update({f"{MODULE}.spon_bias": t[
        f"{MODULE}.spon_bias"][:-1].contiguous()})), f"tensor {MODULE}.spon_bias has shape [575]"),
    "another base model": (lambda p: edit_config(p, lambda c: c["base_model"].update(probe_sha256="0" * 64)),
                           "are not those the checkpoint was calibrated on"),
    "base weights moved": (lambda p: _relink(p / "model.safetensors", p.parent / "moved" / "model.safetensors"),
                           "which does not exist: the base model"),
}


# Each refusal is a real `vllm serve` start-up, ~45 s of mostly one-core work (imports in three processes, one
# after another). The first refusal test starts them all, a few at a time, and each test then waits for its own
# start-up and asserts on it (the four: 132 s one after another, 90 s two at a time, on 2 busy cores).
REFUSALS_AT_ONCE = 2


def _start(checkpoint: Path, log_path: Path) -> None:
    """`vllm serve` on `checkpoint` as the tests start it; raises `ServerStartError` when it stops at start-up."""
    with vllm_server(checkpoint, "--load-format", "spon", "--max-model-len", "512", log_path=log_path,
                     timeout_s=240):
        pass


@pytest.fixture(scope="module")
def bad_starts(request, spon_reference_case, tmp_path_factory):
    """{case: (bad checkpoint, future of its `vllm serve` start-up)} for the refusal tests this session runs."""
    cases = [item.callspec.params["case"] for item in request.session.items
             if item.module is request.module and item.originalname == "test_bad_checkpoint_stops_start_up"]
    starts = {}
    with ThreadPoolExecutor(max_workers=REFUSALS_AT_ONCE) as pool:
        for case in cases:
            corrupt, _ = BAD_CHECKPOINTS[case]
            work = tmp_path_factory.mktemp("bad-checkpoint")
            checkpoint = _overlay_copy(Path(spon_reference_case.checkpoint), work / "bad")
            corrupt(checkpoint)
            starts[case] = checkpoint, pool.submit(_start, checkpoint, work / "vllm-serve.log")
        yield starts


@pytest.mark.parametrize("case", BAD_CHECKPOINTS)
def test_bad_checkpoint_stops_start_up(case, bad_starts):
    _, message = BAD_CHECKPOINTS[case]
    checkpoint, start = bad_starts[case]
    with pytest.raises(ServerStartError, match="exited with code") as info:
        start.result()
        pytest.fail("vllm serve started on a bad checkpoint")
    assert message in info.value.log
    assert str(checkpoint / "spon") in info.value.log
