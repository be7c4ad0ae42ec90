"""Checkpoints whose thresholds and biases are given rather than calibrated: for thresholds chosen by hand
(tests) or fitted elsewhere (the synthetic GPU benchmark). They say so: `calibration` is null and nothing
measured (achieved sparsity, perplexity) is claimed."""

from pathlib import Path

import torch

from vllm_spon import __version__
from vllm_spon.format.checkpoint import now_iso, write_checkpoint
from vllm_spon.format.identity import base_model_ref, model_family
from vllm_spon.format.schema import FORMAT_VERSION, Layout, SponConfig


def write_handmade(
    model_dir: str | Path,
    output: str | Path,
    thresholds: dict[str, float],
    biases: dict[str, torch.Tensor] | None = None,
    layout: Layout = "full",
    target_sparsity: float = 0.5,
    projections: tuple[str, ...] | None = None,
) -> Path:
    """Write (or replace) a checkpoint with exactly these per-module thresholds and fused biases."""
    biases = biases or {}
    config = SponConfig(
        format_version=FORMAT_VERSION,
        layout=layout,
        base_model=base_model_ref(model_dir),
        method="spon" if biases else "teal",
        bias_space="output" if biases else None,
        target_sparsity=target_sparsity,
        achieved_sparsity=None,
        projections=projections or model_family(model_dir).projections,
        thresholds=dict(thresholds),
        module_sparsity=None,
        calibration=None,
        created_at=now_iso(),
        vllm_spon_version=__version__,
    )
    return write_checkpoint(output, model_dir, config, thresholds, biases, overwrite=True)
