"""Tensor parallelism on the CPU build: 2 ranks give the tokens of 1, and each rank holds its shard of the
SPON tensors (thresholds per segment everywhere, column-parallel biases split, row-parallel biases whole
and added on rank 0 only)."""

import pytest

from tests.plugin_helpers import engine, expected_state, generate_tokens, spon_state

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def _probe_workers():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        yield


def run(checkpoint, prompts, tp: int):
    with pytest.MonkeyPatch.context() as mp:
        if tp > 1:  # one core per rank, none held back for the engine
            mp.setenv("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(r) for r in range(tp)))
            mp.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        with engine(str(checkpoint), load_format="spon", tensor_parallel_size=tp) as llm:
            return generate_tokens(llm, prompts), llm.apply_model(spon_state)


def test_tp2_gives_the_tokens_of_tp1(even_heads_spon_checkpoint, spon_reference_case):
    prompts = spon_reference_case.prompts
    tp1, _ = run(even_heads_spon_checkpoint, prompts, tp=1)
    tp2, states = run(even_heads_spon_checkpoint, prompts, tp=2)
    assert tp1 == spon_reference_case.tokens
    assert tp2 == tp1
    for rank, state in enumerate(states):
        got = {name: {k: v for k, v in s.items() if k != "method"} for name, s in state.items()}
        assert got == expected_state(str(even_heads_spon_checkpoint), tp_rank=rank, tp_size=2), f"rank {rank}"
