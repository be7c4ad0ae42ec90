"""vLLM's own tools on SPON checkpoints (CPU build): `vllm bench latency --load-format spon`, and pipeline
parallelism 2 giving the tokens of one rank. `vllm bench serve` against `vllm serve --load-format spon` is in
test_vllm_serve.py, beside the server it measures."""

import json
import os
import subprocess

import pytest

from tests.vllm_probes import engine, generate_tokens
from vllm_spon.server import CPU_ENV, machine_defaults, vllm_executable

pytestmark = pytest.mark.slow


def test_vllm_bench_latency_runs_the_spon_checkpoint(spon_reference_case, tmp_path):
    """The latency benchmark users already know, on a SPON checkpoint: the plugin loads (its start-up line)
    and the run reports a latency."""
    result = tmp_path / "latency.json"
    defaults, _ = machine_defaults()
    cmd = [vllm_executable(), "bench", "latency", "--model", spon_reference_case.checkpoint,
           "--load-format", "spon", *defaults, "--max-model-len", "512", "--enforce-eager",
           "--input-len", "16", "--output-len", "8", "--batch-size", "2", "--num-iters-warmup", "1",
           "--num-iters", "2", "--output-json", str(result)]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**CPU_ENV, **os.environ})
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-3000:]
    assert f"SPON: {spon_reference_case.checkpoint}" in log
    report = json.loads(result.read_text())
    assert report["avg_latency"] > 0 and len(report["latencies"]) == 2


def test_pipeline_parallel_2_gives_the_reference_tokens(spon_reference_case):
    """Two pipeline stages (layers 0-14 and 15-29, one core each) load only their own layers' SPON tensors
    and give the reference sparse model's greedy tokens, as one rank does (test_vllm_engine.py).

    Compiled, not eager: the CPU build 0.32 cannot run pipeline parallelism eagerly (its last stage fails on
    `assert self.intermediate_tensors is not None`, measured with the dense model too)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
        mp.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        with engine(spon_reference_case.checkpoint, load_format="spon", pipeline_parallel_size=2,
                    enforce_eager=False) as llm:
            tokens = generate_tokens(llm, spon_reference_case.prompts)
    assert tokens == spon_reference_case.tokens
