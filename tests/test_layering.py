"""The folder picture of the README, checked: calibration writes through the format layer and the plugin reads
through it, neither importing the other; the format layer imports neither, nor vLLM."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ("vllm_spon.__init__", "vllm_spon.loader", "vllm_spon.sites", "vllm_spon.linear_method", "vllm_spon.ops")


def imported_modules(path: Path) -> set[str]:
    """Absolute module names a file imports (`from vllm_spon import x` counts as `vllm_spon.x` and `vllm_spon`)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).glob("*.py"))


def offending(paths: list[Path], forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    found = {str(p.relative_to(ROOT)): sorted(m for m in imported_modules(p)
                                                if any(m == f or m.startswith(f + ".") for f in forbidden))
             for p in paths}
    return {path: names for path, names in found.items() if names}


@pytest.mark.parametrize(("folder", "forbidden"), [
    ("format", ("vllm", "vllm_spon.calibration", *PLUGIN, "vllm_spon.__version__", "vllm_spon.cli", "vllm_spon.server",
                "vllm_spon.kernels")),
    ("calibration", ("vllm", *PLUGIN)),
])
def test_a_layer_imports_nothing_above_it(folder, forbidden):
    assert offending(files(folder), forbidden) == {}


def test_the_plugin_reads_the_format_not_calibration():
    plugin = [ROOT / (name.replace(".", "/") + ".py") for name in PLUGIN]
    assert offending(plugin, ("vllm_spon.calibration",)) == {}
    assert all(any(m.startswith("vllm_spon.format") for m in imported_modules(p)) for p in plugin[1:3])
