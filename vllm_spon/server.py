"""Start vLLM the way a user would, with this machine's settings: `vllm serve` as a child process that is
waited on until it answers (the demo, the examples, the server tests), or an in-process `LLM` engine (the
engine tests and the CPU benchmark)."""

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

# What vLLM's CPU build needs on 2-core machines (its default memory fraction does not fit the NUMA node),
# as `LLM(...)` keyword arguments and as the same `vllm serve` flags.
CPU_ENGINE_ARGS = {"dtype": "float32", "gpu_memory_utilization": 0.5}
CPU_SERVE_ARGS = tuple(a for k, v in CPU_ENGINE_ARGS.items() for a in (f"--{k.replace('_', '-')}", str(v)))
CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_TARGET_DEVICE": "cpu"}


@contextmanager
def engine(model: str | os.PathLike, **kwargs) -> Iterator["vllm.LLM"]:  # noqa: F821 (vLLM imported lazily)
    """A vLLM engine (`LLM`) with this machine's defaults (the CPU build's settings on a CPU) overridden by
    `kwargs`; shut down on exit, so the next one can start in the same process."""
    from vllm import LLM

    defaults, env = (CPU_ENGINE_ARGS, CPU_ENV) if not torch.cuda.is_available() else ({}, {})
    for key, value in env.items():
        os.environ.setdefault(key, value)
    llm = LLM(str(model), **{**defaults, **kwargs})
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm


class ServerStartError(RuntimeError):
    """`vllm serve` exited or timed out before answering; `log` holds everything it printed."""

    def __init__(self, message: str, log: str):
        super().__init__(f"{message}\n--- last lines of its log ---\n" + "\n".join(log.splitlines()[-30:]))
        self.log = log


def vllm_executable() -> str:
    """The `vllm` next to this interpreter (set-up makes it work for the CPU build), else the one on PATH."""
    beside = Path(sys.executable).parent / "vllm"
    return str(beside) if beside.is_file() else "vllm"


def machine_defaults() -> tuple[tuple[str, ...], dict[str, str]]:
    """Serve arguments and environment this machine needs: none on a GPU, the CPU build's otherwise."""
    if torch.cuda.is_available():
        return (), {}
    return CPU_SERVE_ARGS, CPU_ENV


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def vllm_server(model: str | os.PathLike, *args: str, log_path: Path, timeout_s: float = 300) -> Iterator[str]:
    """`vllm serve MODEL ARGS` on 127.0.0.1 with this machine's defaults; yields the `/v1` base URL.

    Raises `ServerStartError` (with the log) if the server exits or is not healthy within `timeout_s`;
    the server is stopped on exit either way.
    """
    defaults, env = machine_defaults()
    port = free_port()
    cmd = [vllm_executable(), "serve", str(model), *defaults, *args, "--host", "127.0.0.1", "--port", str(port)]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**env, **os.environ})
    try:
        _wait_healthy(server, f"http://127.0.0.1:{port}/health", log_path, timeout_s)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _wait_healthy(server: subprocess.Popen, health_url: str, log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if server.poll() is not None:
            raise ServerStartError(f"vllm serve exited with code {server.returncode} (log: {log_path})",
                                   log_path.read_text())
        try:
            with urllib.request.urlopen(health_url, timeout=5) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise ServerStartError(f"vllm serve not healthy after {timeout_s:.0f} s (log: {log_path})",
                                   log_path.read_text())
        time.sleep(1)
