"""docker/Dockerfile, checked without Docker: the supported vLLM image, this project installed into it from
files the repository holds, and an entry point that serves with `--load-format spon`."""

import argparse
import fnmatch
import json
import re
import shlex
import tomllib
from pathlib import Path, PurePosixPath

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
# The vLLM release of the GPU path, from its one source: pyproject.toml's `gpu` extra (`vllm==X`).
GPU_VLLM_VERSION = next(
    req.split("==")[1] for req in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["gpu"] if req.startswith("vllm==")
)


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: comment lines dropped, then backslash continuations joined, as
    Docker does."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    logical = re.sub(r"\\[ \t]*\n", "", "\n".join(lines))
    return [
        (parts[0].upper(), parts[1].strip() if len(parts) > 1 else "")
        for line in logical.splitlines()
        if (parts := line.strip().split(None, 1))
    ]


def exec_form(arguments: str) -> list[str]:
    """A JSON-form ENTRYPOINT/CMD (the shell form would run under `sh -c`, which does not forward signals)."""
    argv = json.loads(arguments)
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), arguments
    return argv


def copies(instructions: list[tuple[str, str]]) -> dict[str, PurePosixPath]:
    """Where each COPY source lands in the image: a file into a destination ending in '/', else at the
    destination itself (for a folder, its contents)."""
    placed = {}
    for name, arguments in instructions:
        if name in ("COPY", "ADD"):
            *sources, destination = [a for a in shlex.split(arguments) if not a.startswith("--")]
            for source in sources:
                into = destination.endswith("/") and (ROOT / source).is_file()
                placed[source] = PurePosixPath(destination) / (PurePosixPath(source).name if into else "")
    return placed


def ignored(path: str, patterns: list[str]) -> bool:
    """.dockerignore semantics for a top-level path: the last matching pattern decides, `!` re-includes."""
    verdict = False
    for pattern in patterns:
        if fnmatch.fnmatch(path, pattern.removeprefix("!")):
            verdict = not pattern.startswith("!")
    return verdict


@pytest.fixture(scope="module")
def instructions() -> list[tuple[str, str]]:
    return parse_dockerfile((DOCKER / "Dockerfile").read_text())


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_parser_joins_continuations_and_skips_comments():
    text = 'FROM a\n# RUN not this\nRUN x \\\n  # inside\n  && y\nCMD ["b"]\n'
    assert parse_dockerfile(text) == [("FROM", "a"), ("RUN", "x   && y"), ("CMD", '["b"]')]


def test_base_image_is_the_supported_vllm_release(instructions):
    args = dict(a.split("=", 1) for n, a in instructions if n == "ARG" and "=" in a)
    [base] = [a for n, a in instructions if n == "FROM"]
    image = re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], base)
    assert image == f"vllm/vllm-openai:v{GPU_VLLM_VERSION}"
    assert sum(GPU_VLLM_VERSION in a for _, a in instructions) == 1, "the version is set in more than one place"


def test_entrypoint_serves_with_spon_load_format(instructions):
    [entrypoint] = [exec_form(a) for n, a in instructions if n == "ENTRYPOINT"]
    [command] = [exec_form(a) for n, a in instructions if n == "CMD"]
    assert entrypoint[:2] == ["vllm", "serve"]
    # The two arguments of `vllm serve` that matter here, parsed as vLLM's argparse CLI parses them.
    serve = argparse.ArgumentParser(exit_on_error=False)
    serve.add_argument("model_tag", nargs="?")
    serve.add_argument("--load-format")
    default = serve.parse_known_args(entrypoint[2:] + command)[0]
    assert (default.model_tag, default.load_format) == ("/model", "spon")
    replaced = serve.parse_known_args([*entrypoint[2:], "/ckpt", "--dtype", "bfloat16"])[0]
    assert (replaced.model_tag, replaced.load_format) == ("/ckpt", "spon"), "a replaced CMD loses spon"


def test_installs_this_project_from_files_it_copies(instructions, pyproject):
    placed = copies(instructions)
    setuptools = pyproject["tool"]["setuptools"]
    needed = ["pyproject.toml", pyproject["project"]["readme"], *setuptools["package-dir"].values()]
    project = placed["pyproject.toml"].parent
    assert {s: placed.get(s) for s in needed} == {s: project / s for s in needed}
    installs = [shlex.split(a) for n, a in instructions if n == "RUN" and "pip install" in a]
    assert any("--no-deps" in argv and str(project) in argv for argv in installs), installs


def test_copied_files_exist_and_reach_the_build_context(instructions):
    patterns = [
        line.strip()
        for line in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for source in copies(instructions):
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
        assert not ignored(source, patterns), f"COPY {source}: excluded by Dockerfile.dockerignore"
