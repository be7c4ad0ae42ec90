"""Tensor parallelism on the CPU build: 2 ranks give the tokens of 1, and each rank holds its shard of the
SPON tensors (thresholds per segment everywhere, column-parallel biases split, row-parallel biases whole
and added on rank 0 only)."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.vllm_probes import engine, expected_state, generate_tokens, spon_state
from vllm_spon.server import CPU_ENGINE_ARGS, CPU_ENV

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


def test_tp2_gives_the_reference_tokens(even_heads_spon_checkpoint, spon_reference_case):
    """The reference sparse model's tokens: the 12-head copy computes the same ones, and one rank serving the
    original gives them too (tests/test_vllm_engine.py), so two ranks give the tokens of one."""
    tp2, states = run(even_heads_spon_checkpoint, spon_reference_case.prompts, tp=2)
    assert tp2 == spon_reference_case.tokens
    for rank, state in enumerate(states):
        got = {name: {k: v for k, v in s.items() if k != "method"} for name, s in state.items()}
        assert got == expected_state(str(even_heads_spon_checkpoint), tp_rank=rank, tp_size=2), f"rank {rank}"


def test_decode_benchmark_runs_with_tensor_parallel_2(even_heads_spon_checkpoint, tmp_path):
    """`bench_gpu_e2e.py engine --tp 2` (the two-GPU benchmark's command) on the CPU build, shortened: both
    ranks load SPON and the run reports decode rates and a time to first token."""
    result = tmp_path / "tp2.json"
    engine_args = {**CPU_ENGINE_ARGS, "enforce_eager": True, "max_model_len": 512}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_gpu_e2e.py"), "engine", str(even_heads_spon_checkpoint),
           "--load-format", "spon", "--tp", "2", "--json", str(result), "--engine-args", json.dumps(engine_args),
           "--batches", "1,2", "--decode-tokens", "4", "--prefill-tokens", "64"]  # fmt: skip
    env = {**CPU_ENV, **os.environ, "VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-3000:]
    assert log.count(f"SPON: {even_heads_spon_checkpoint}") == 2  # one start-up line per rank
    report = json.loads(result.read_text())
    assert report["tensor_parallel_size"] == 2 and report["ttft_ms"] > 0
    assert set(report["decode_tok_s"]) == {"1", "2"} and min(report["decode_tok_s"].values()) > 0
