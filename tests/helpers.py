"""Test helpers: build checkpoints by hand (for plugin tests that need exact control over thresholds/biases)."""

from pathlib import Path

import torch

from vllm_spon import __version__
from vllm_spon.calibration.checkpoint import (
    FORMAT_VERSION,
    CalibrationInfo,
    SponConfig,
    base_model_ref,
    now_iso,
    write_checkpoint,
)


def make_checkpoint(
    model_dir: str | Path,
    output: str | Path,
    thresholds: dict[str, float],
    biases: dict[str, torch.Tensor] | None = None,
    layout: str = "full",
    target_sparsity: float = 0.5,
    projections: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
) -> Path:
    """Write a checkpoint with exactly the given per-module thresholds and fused biases."""
    biases = biases or {}
    config = SponConfig(
        format_version=FORMAT_VERSION,
        layout=layout,
        base_model=base_model_ref(model_dir),
        method="spon" if biases else "teal",
        bias_space="output" if biases else None,
        target_sparsity=target_sparsity,
        achieved_sparsity=target_sparsity,
        projections=projections,
        thresholds=dict(thresholds),
        module_sparsity={m: target_sparsity for m in thresholds},
        calibration=CalibrationInfo(
            data="tests", num_tokens=1, window=1, threshold_stats="dense", allocation="uniform",
            steps=0, lr=0.0, tokens_per_step=0, seed=0, seconds=0.0,
        ),
        created_at=now_iso(),
        vllm_spon_version=__version__,
    )
    return write_checkpoint(output, model_dir, config, thresholds, biases, overwrite=True)
