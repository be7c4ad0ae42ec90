"""Shared fixtures. Heavy artifacts (the example model, a calibrated checkpoint) are made once per session.

They live under $VLLM_SPON_TEST_CACHE (default: artifacts/test-cache in the checkout, git-ignored) and are
reused when already complete, so a local re-run does not rebuild them; CI starts from a clean clone.
"""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("VLLM_SPON_TEST_CACHE", ROOT / "artifacts" / "test-cache"))


@pytest.fixture(scope="session")
def example_model_dir() -> Path:
    """SmolLM2-135M-Instruct as a float32 Hugging Face directory."""
    from vllm_spon.calibration.example_model import write_example_model

    path = CACHE / "smollm2"
    if not (path / "model.safetensors").is_file():
        write_example_model(path, overwrite=True)
    return path
