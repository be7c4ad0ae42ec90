"""Greedy answers of `vllm serve --load-format spon` do not depend on the batch (issue 10).

64 different prompts at temperature 0 are sent one at a time, then 2, 4, 8 and 64 at a time; every answer must
equal the same request's answer alone. vLLM schedules decode tokens and chunked-prefill tokens of different
requests into one batch, so this holds only if the sparse linear's result for a token does not depend on how
many (or which) other tokens share its batch: thresholding turns a last-bit difference into a different
token. The checkpoint is the calibrated one with every layer at 50%, where a batch-dependent rounding shows.
"""

import asyncio

import pytest
from transformers import AutoTokenizer

from vllm_spon.calibration.data import DEFAULT_EVAL_DATA, load_text, token_windows
from vllm_spon.server import vllm_server

pytestmark = pytest.mark.slow
SERVED_NAME = "smollm2-spon50"
PROMPTS = 64
MAX_TOKENS = 6
GROUP_SIZES = (2, 4, 8, 64)


def varied_prompts(model_dir) -> list[list[int]]:
    """64 token-id prompts of 6 to 24 tokens, cut from different places of the held-out novel."""
    windows = token_windows(AutoTokenizer.from_pretrained(model_dir), load_text(DEFAULT_EVAL_DATA), 24, PROMPTS)
    return [w[: 6 + (7 * i) % 19].tolist() for i, w in enumerate(windows)]


def answers(base_url: str, prompts: list[list[int]], group_size: int) -> list[list[int]]:
    """Greedy completion token ids of `prompts`, `group_size` requests in flight at a time."""
    from openai import AsyncOpenAI

    async def one(client, prompt: list[int]) -> list[int]:
        reply = await client.completions.create(
            model=SERVED_NAME, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
            extra_body={"ignore_eos": True, "return_token_ids": True},
        )
        return reply.choices[0].token_ids

    async def run() -> list[list[int]]:
        out: list[list[int]] = []
        async with AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0) as client:
            for start in range(0, len(prompts), group_size):
                out += await asyncio.gather(*(one(client, p) for p in prompts[start:start + group_size]))
        return out

    return asyncio.run(run())


@pytest.fixture(scope="module")
def base_url(spon_checkpoint_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-batch") / "vllm-serve.log"
    with vllm_server(spon_checkpoint_dir, "--load-format", "spon", "--served-model-name", SERVED_NAME,
                     "--max-model-len", "512", "--seed", "0", log_path=log) as url:
        yield url


def test_greedy_answers_do_not_depend_on_the_batch(base_url, example_model_dir):
    prompts = varied_prompts(example_model_dir)
    alone = answers(base_url, prompts, 1)
    assert all(len(a) == MAX_TOKENS for a in alone)
    assert len({tuple(a) for a in alone}) > PROMPTS // 2  # varied prompts, varied answers
    differing = {}
    for size in GROUP_SIZES:
        batched = answers(base_url, prompts, size)
        differing[size] = [i for i, (a, b) in enumerate(zip(alone, batched, strict=True)) if a != b]
    assert not any(differing.values()), f"prompts whose answer changed, by group size: {differing}"
