"""Which base model a checkpoint belongs to: its family (architecture), its shapes and one weight's values."""

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

from .architectures import Family, family_of
from .errors import CheckpointError
from .schema import BaseModelRef

# Config fields that must agree between a checkpoint and the model it is loaded onto (those the model has).
SHAPE_FIELDS = (
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
)


def read_hf_config(model_dir: str | os.PathLike) -> dict:
    """A Hugging Face `config.json` as a dict; a missing or unreadable one is named."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{model_dir} is not a Hugging Face model directory: {path} does not exist")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} cannot be read as JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return cfg


def model_family(model_dir: str | os.PathLike) -> Family:
    """The family of a model directory; an unsupported architecture is refused in one line."""
    return family_of(read_hf_config(model_dir), str(Path(model_dir) / "config.json"))


def hf_config_identity(model_dir: str | os.PathLike) -> tuple[str, dict[str, int]]:
    """(architecture, shape fields) of a Hugging Face model directory of a supported family."""
    cfg = read_hf_config(model_dir)
    model_family(model_dir)
    try:
        shape = {k: int(cfg[k]) for k in SHAPE_FIELDS if cfg.get(k) is not None}
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{Path(model_dir) / 'config.json'}: a shape field is not an integer ({e})") from None
    if "num_key_value_heads" not in shape and "num_attention_heads" in shape:
        shape["num_key_value_heads"] = shape["num_attention_heads"]
    return cfg["architectures"][0], shape


def probe_sha256(model_dir: str | os.PathLike, tensor_name: str) -> str:
    """sha256 of one weight tensor's values (as float32), read from the model's safetensors files."""
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(
            f"{model_dir} has no *.safetensors files; vllm-spon reads weights only from safetensors "
            "(never pickles): convert the model with `save_pretrained(..., safe_serialization=True)`"
        )
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                if tensor_name in f.keys():  # noqa: SIM118
                    values = f.get_tensor(tensor_name).to(torch.float32).contiguous()
                    return hashlib.sha256(values.numpy().tobytes()).hexdigest()
        except Exception as e:  # safetensors' own error types, OSError
            raise CheckpointError(f"{file} cannot be read as safetensors ({type(e).__name__}: {e})") from None
    raise CheckpointError(f"{model_dir}: no safetensors file holds {tensor_name}")


def base_model_ref(model_dir: str | os.PathLike) -> BaseModelRef:
    """The identity of a supported base model (checks its config and weights files before any heavy work)."""
    arch, shape = hf_config_identity(model_dir)
    probe = model_family(model_dir).probe_tensor
    return BaseModelRef(path=str(Path(model_dir).resolve()), architecture=arch, shape=shape, probe_tensor=probe,
                        probe_sha256=probe_sha256(model_dir, probe))


def check_base_model(ref: BaseModelRef, model_dir: str | os.PathLike, config_file: Path,
                     check_weights: bool = True) -> None:
    """Refuse a checkpoint (`config_file` records `ref`) made for another base model: architecture, the shape
    fields it recorded, a probe weight (`check_weights=False` skips it, for weights not read from disk)."""
    arch, shape = hf_config_identity(model_dir)
    seen = {k: shape.get(k) for k in ref.shape}
    if arch != ref.architecture or seen != ref.shape:
        raise CheckpointError(
            f"{config_file} was calibrated for {ref.architecture} {ref.shape} ({ref.path}) but "
            f"{model_dir}/config.json describes {arch} {shape}; calibrate this model instead"
        )
    if check_weights and probe_sha256(model_dir, ref.probe_tensor) != ref.probe_sha256:
        raise CheckpointError(
            f"{config_file}: the weights of {model_dir} are not those the checkpoint was calibrated on (tensor "
            f"{ref.probe_tensor} differs from {ref.path}); calibrate this model instead"
        )
