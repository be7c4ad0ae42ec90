"""Triton's CPU interpreter for the kernel tests: Triton picks it when kernels (its own library's too) are
decorated, at import, so kernel test modules re-run themselves in a fresh `TRITON_INTERPRET=1` process that
imports Triton first, and no Triton import leaks into the rest of the suite or into the GPU tests."""

import os
import subprocess
import sys

import pytest

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not INTERPRETER, reason="runs in the TRITON_INTERPRET=1 subprocess")


def rerun_in_interpreter(test_file: str) -> None:
    """Run the test module `test_file` under the interpreter in a subprocess; fail with its output."""
    if INTERPRETER:
        pytest.skip("already in the interpreter process")
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", test_file]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
