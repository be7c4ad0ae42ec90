"""Edits of a written checkpoint, for tests of what the validator does with a damaged or dishonest one."""

import json
from collections.abc import Callable
from pathlib import Path

from safetensors.torch import load_file, save_file


def edit_tensors(path: Path, edit: Callable[[dict], object]) -> None:
    file = path / "spon" / "spon.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file)


def edit_config(path: Path, edit: Callable[[dict], object]) -> None:
    file = path / "spon" / "config.json"
    config = json.loads(file.read_text())
    edit(config)
    file.write_text(json.dumps(config))


def claim_calibration(config: dict, achieved: float = 0.5) -> None:
    """Make a hand-made config claim calibration's facts: `achieved` sparsity, 0.5 per module."""
    config.update(achieved_sparsity=achieved, module_sparsity=dict.fromkeys(config["thresholds"], 0.5),
                  calibration={"data": "builtin:persuasion", "num_tokens": 64, "window": 32,
                               "threshold_stats": "dense", "allocation": "uniform", "steps": 0, "lr": 0.0,
                               "tokens_per_step": 0, "seed": 0, "seconds": 1.0})
