"""The SPON checkpoint format: `spon/config.json` (validated) and `spon/spon.safetensors`.

A checkpoint is a Hugging Face model directory with a `spon/` sub-folder. The *full* form holds the base
model's files; the *overlay* form holds `spon/` plus symbolic links to the base model's top-level files, so
a large base model is referenced, never copied, and every tool that expects a model directory still works.

Tensors are named after the Hugging Face module they belong to:
  `<module>.threshold`  0-d float32, the magnitude below which the module's inputs are zeroed;
  `<module>.spon_bias`  float32 `[out_features]`, the fused SPON bias `W a`, added to the module's output
                        (on top of the module's own bias, if it has one).
Writes are atomic (a temporary sibling directory renamed into place) and reads never unpickle.
"""

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from safetensors import safe_open
from safetensors.torch import save_file

from vllm_spon import __version__

FORMAT_VERSION = 1
SPON_DIR = "spon"
CONFIG_FILE = "config.json"
TENSORS_FILE = "spon.safetensors"
THRESHOLD_SUFFIX = ".threshold"
BIAS_SUFFIX = ".spon_bias"
PROBE_TENSOR = "model.layers.0.self_attn.q_proj.weight"

# Input sites of a Llama-style block and the projections that read each one.
PROJECTION_SITE = {
    "q_proj": "attn_in",
    "k_proj": "attn_in",
    "v_proj": "attn_in",
    "o_proj": "attn_out",
    "gate_proj": "mlp_in",
    "up_proj": "mlp_in",
    "down_proj": "mlp_out",
}
ALL_PROJECTIONS = tuple(PROJECTION_SITE)


def _known_projections(v: tuple[str, ...]) -> tuple[str, ...]:
    unknown = sorted(set(v) - set(ALL_PROJECTIONS))
    if unknown or not v:
        raise ValueError(f"projections must be a non-empty subset of {ALL_PROJECTIONS}, got {list(v)}")
    return v


# Which Hugging Face linear modules (by leaf name) are sparsified; shared by the checkpoint and calibration.
Projections = Annotated[tuple[str, ...], AfterValidator(_known_projections)]
# Config fields that must agree between a checkpoint and the model it is loaded onto.
SHAPE_FIELDS = (
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)


class CheckpointError(ValueError):
    """A SPON checkpoint is missing, malformed or does not belong to the model it is used with."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BaseModelRef(_Strict):
    """Identity of the base model a checkpoint was calibrated on."""

    path: str = Field(description="base model directory at calibration time (overlays load weights from it)")
    architecture: str
    shape: dict[str, int] = Field(description="the config fields in SHAPE_FIELDS")
    probe_tensor: str = PROBE_TENSOR
    probe_sha256: str = Field(description="sha256 of the probe tensor's values as float32")


class CalibrationInfo(_Strict):
    """How the thresholds and biases were made: enough to reproduce them."""

    data: str
    num_tokens: int = Field(gt=0)
    window: int = Field(gt=0)
    threshold_stats: Literal["dense", "sequential"]
    allocation: Literal["uniform", "greedy"]
    steps: int = Field(ge=0)
    lr: float = Field(ge=0)
    tokens_per_step: int = Field(ge=0)
    seed: int
    seconds: float = Field(ge=0)


class PerplexityReport(_Strict):
    """Perplexities measured at calibration time on held-out text (same windows for all three)."""

    data: str
    num_windows: int = Field(gt=0)
    window: int = Field(gt=0)
    dense: float = Field(gt=0)
    teal: float = Field(gt=0)
    spon: float = Field(gt=0)
    teal_sparsity: float = Field(ge=0, le=1)
    spon_sparsity: float = Field(ge=0, le=1)


class SponConfig(_Strict):
    """`spon/config.json`."""

    format: Literal["spon"] = "spon"
    format_version: int
    layout: Literal["full", "overlay"]
    base_model: BaseModelRef
    method: Literal["teal", "spon"] = Field(description="teal: thresholds only; spon: thresholds + biases")
    bias_space: Literal["input", "output"] | None = Field(
        default=None, description="where the SPON vectors were learned before fusion (None for teal)"
    )
    target_sparsity: float = Field(ge=0, lt=1)
    achieved_sparsity: float = Field(ge=0, le=1, description="parameter-weighted, on calibration tokens")
    projections: Projections = Field(description="which projections of every block are sparsified")
    thresholds: dict[str, float] = Field(description="module name -> threshold (a copy of the tensors)")
    module_sparsity: dict[str, float] = Field(description="module name -> sparsity on calibration tokens")
    calibration: CalibrationInfo
    perplexity: PerplexityReport | None = None
    created_at: str
    vllm_spon_version: str

    @field_validator("format_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v != FORMAT_VERSION:
            raise ValueError(
                f"unknown format_version {v}: this vllm-spon reads version {FORMAT_VERSION}; "
                "re-run `vllm-spon calibrate` or install the vllm-spon release that wrote it"
            )
        return v

    @field_validator("thresholds")
    @classmethod
    def _finite_non_negative(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: t for k, t in v.items() if not (math.isfinite(t) and t >= 0)}
        if bad:
            raise ValueError(f"thresholds must be finite and >= 0: {bad}")
        return v

    @model_validator(mode="after")
    def _bias_space_matches_method(self) -> "SponConfig":
        if (self.method == "spon") != (self.bias_space is not None):
            raise ValueError("bias_space is required for method 'spon' and must be null for method 'teal'")
        return self


class SponCheckpoint:
    """A validated checkpoint in memory: config plus tensors keyed by Hugging Face module name."""

    def __init__(
        self, config: SponConfig, thresholds: dict[str, torch.Tensor], biases: dict[str, torch.Tensor]
    ):
        self.config = config
        self.thresholds = thresholds
        self.biases = biases

    @property
    def modules(self) -> list[str]:
        return sorted(self.thresholds)

    def threshold(self, module: str) -> float:
        return float(self.thresholds[module])

    def summary(self) -> str:
        """One line for logs: what is sparsified and how hard."""
        values = torch.stack([self.thresholds[m] for m in self.modules])
        c = self.config
        return (
            f"{c.method.upper()} checkpoint: {len(self.modules)} linears ({', '.join(c.projections)}), "
            f"target sparsity {c.target_sparsity:.2f}, achieved {c.achieved_sparsity:.3f}, "
            f"thresholds min {values.min():.4g} / median {values.median():.4g} / max {values.max():.4g}, "
            f"{len(self.biases)} fused biases"
        )


def spon_dir(checkpoint: str | os.PathLike) -> Path:
    return Path(checkpoint) / SPON_DIR


def is_spon_checkpoint(path: str | os.PathLike) -> bool:
    return (spon_dir(path) / CONFIG_FILE).is_file()


def read_config(checkpoint: str | os.PathLike) -> SponConfig:
    """Read and validate `spon/config.json`; errors name the file and the fix."""
    path = spon_dir(checkpoint) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{checkpoint} is not a SPON checkpoint: {path} does not exist. "
            "Create one with `vllm-spon calibrate MODEL --output DIR`, or drop `--load-format spon` to serve "
            "the dense model."
        )
    try:
        return SponConfig.model_validate_json(path.read_text())
    except ValidationError as e:
        raise CheckpointError(f"{path} is not a valid SPON config:\n{e}") from None


def load_checkpoint(checkpoint: str | os.PathLike) -> SponCheckpoint:
    """Load and validate a checkpoint: config, tensor names, shapes, values and their agreement."""
    config = read_config(checkpoint)
    path = spon_dir(checkpoint) / TENSORS_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete; re-run calibration")
    thresholds: dict[str, torch.Tensor] = {}
    biases: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            tensor = f.get_tensor(name)
            if name.endswith(THRESHOLD_SUFFIX):
                thresholds[name.removesuffix(THRESHOLD_SUFFIX)] = tensor
            elif name.endswith(BIAS_SUFFIX):
                biases[name.removesuffix(BIAS_SUFFIX)] = tensor
            else:
                raise CheckpointError(
                    f"{path}: unexpected tensor {name!r}; names end in {THRESHOLD_SUFFIX} or {BIAS_SUFFIX}"
                )
    _validate_tensors(path, config, thresholds, biases)
    return SponCheckpoint(config, thresholds, biases)


def _validate_tensors(
    path: Path, config: SponConfig, thresholds: dict[str, torch.Tensor], biases: dict[str, torch.Tensor]
) -> None:
    if set(thresholds) != set(config.thresholds):
        missing = sorted(set(config.thresholds) - set(thresholds))
        extra = sorted(set(thresholds) - set(config.thresholds))
        raise CheckpointError(
            f"{path}: thresholds do not match {CONFIG_FILE} (missing tensors: {missing[:5]}, "
            f"not in config: {extra[:5]}); the checkpoint was edited or half-written, re-run calibration"
        )
    for module, t in thresholds.items():
        name = module + THRESHOLD_SUFFIX
        if t.dim() != 0 or not t.dtype.is_floating_point:
            raise CheckpointError(f"{path}: tensor {name} must be a 0-d float, got {t.dtype} {list(t.shape)}")
        value = float(t)
        if not math.isfinite(value) or value < 0:
            raise CheckpointError(f"{path}: tensor {name} is {value}; thresholds must be finite and >= 0")
        if not math.isclose(value, config.thresholds[module], rel_tol=1e-6, abs_tol=1e-12):
            raise CheckpointError(
                f"{path}: tensor {name} = {value} disagrees with {CONFIG_FILE} ({config.thresholds[module]})"
            )
    if config.method == "teal" and biases:
        raise CheckpointError(f"{path}: method 'teal' but the file holds {len(biases)} {BIAS_SUFFIX} tensors")
    for module, b in biases.items():
        name = module + BIAS_SUFFIX
        if module not in thresholds:
            raise CheckpointError(f"{path}: tensor {name} belongs to no sparsified module")
        if b.dim() != 1 or not b.dtype.is_floating_point:
            raise CheckpointError(f"{path}: tensor {name} must be a 1-d float vector, got {list(b.shape)}")
        if not torch.isfinite(b).all():
            raise CheckpointError(f"{path}: tensor {name} holds NaN or Inf values")


def checkpoint_tensors(
    thresholds: dict[str, float], biases: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The flat `spon.safetensors` dictionary for the given per-module thresholds and fused biases."""
    out = {m + THRESHOLD_SUFFIX: torch.tensor(float(t), dtype=torch.float32) for m, t in thresholds.items()}
    out.update({m + BIAS_SUFFIX: b.detach().float().contiguous().cpu() for m, b in biases.items()})
    return out


@contextmanager
def atomic_directory(final: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `final`; on success rename it into place, on failure delete it."""
    final = Path(final).absolute()
    if final.exists() and not overwrite:
        raise CheckpointError(f"{final} already exists; choose another --output or pass --overwrite")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the checkpoint should not be
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_checkpoint(
    output: str | os.PathLike,
    base_model_dir: str | os.PathLike,
    config: SponConfig,
    thresholds: dict[str, float],
    biases: dict[str, torch.Tensor],
    overwrite: bool = False,
) -> Path:
    """Write a full or overlay checkpoint atomically: either all of it lands or nothing does."""
    base = Path(base_model_dir).absolute()
    tensors = checkpoint_tensors(thresholds, biases)
    _validate_tensors(Path(output) / SPON_DIR / TENSORS_FILE, config,
                      {k.removesuffix(THRESHOLD_SUFFIX): v for k, v in tensors.items()
                       if k.endswith(THRESHOLD_SUFFIX)},
                      {k.removesuffix(BIAS_SUFFIX): v for k, v in tensors.items() if k.endswith(BIAS_SUFFIX)})
    with atomic_directory(Path(output), overwrite=overwrite) as tmp:
        for item in sorted(base.iterdir()):
            if item.name == SPON_DIR or item.name.startswith("."):
                continue
            if config.layout == "overlay":
                if item.is_file():
                    (tmp / item.name).symlink_to(item.resolve())
            elif item.is_file():
                shutil.copy2(item, tmp / item.name)
            elif item.is_dir():
                shutil.copytree(item, tmp / item.name)
        (tmp / SPON_DIR).mkdir()
        save_file(tensors, str(tmp / SPON_DIR / TENSORS_FILE), metadata={"format": "spon"})
        (tmp / SPON_DIR / CONFIG_FILE).write_text(config.model_dump_json(indent=2) + "\n")
    return Path(output)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def hf_config_identity(model_dir: str | os.PathLike) -> tuple[str, dict[str, int]]:
    """(architecture, shape fields) read from a Hugging Face `config.json`."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{model_dir} is not a Hugging Face model directory: {path} does not exist")
    cfg = json.loads(path.read_text())
    archs = cfg.get("architectures") or ["?"]
    shape = {k: int(cfg[k]) for k in SHAPE_FIELDS if k in cfg}
    if "num_key_value_heads" not in shape and "num_attention_heads" in shape:
        shape["num_key_value_heads"] = shape["num_attention_heads"]
    return archs[0], shape


def probe_sha256(model_dir: str | os.PathLike, tensor_name: str = PROBE_TENSOR) -> str:
    """sha256 of one weight tensor's values (as float32), read from the model's safetensors files."""
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(
            f"{model_dir} has no *.safetensors files; vllm-spon reads weights only from safetensors "
            "(never pickles): convert the model with `save_pretrained(..., safe_serialization=True)`"
        )
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            if tensor_name in f.keys():  # noqa: SIM118
                values = f.get_tensor(tensor_name).to(torch.float32).contiguous()
                return hashlib.sha256(values.numpy().tobytes()).hexdigest()
    raise CheckpointError(f"{model_dir}: no safetensors file holds {tensor_name}")


def base_model_ref(model_dir: str | os.PathLike) -> BaseModelRef:
    arch, shape = hf_config_identity(model_dir)
    return BaseModelRef(
        path=str(Path(model_dir).resolve()), architecture=arch, shape=shape, probe_sha256=probe_sha256(model_dir)
    )


def check_base_model(config: SponConfig, model_dir: str | os.PathLike, check_weights: bool = True) -> None:
    """Refuse a checkpoint made for another base model (architecture, shapes, a probe weight)."""
    arch, shape = hf_config_identity(model_dir)
    ref = config.base_model
    if arch != ref.architecture or shape != ref.shape:
        raise CheckpointError(
            f"{spon_dir(model_dir) / CONFIG_FILE} was calibrated for {ref.architecture} {ref.shape} "
            f"({ref.path}) but {model_dir}/config.json describes {arch} {shape}; calibrate this model instead"
        )
    if check_weights and probe_sha256(model_dir, ref.probe_tensor) != ref.probe_sha256:
        raise CheckpointError(
            f"{spon_dir(model_dir) / CONFIG_FILE}: the weights of {model_dir} are not those the checkpoint was "
            f"calibrated on (tensor {ref.probe_tensor} differs from {ref.path}); calibrate this model instead"
        )


def make_checkpoint(
    model_dir: str | Path,
    output: str | Path,
    thresholds: dict[str, float],
    biases: dict[str, torch.Tensor] | None = None,
    layout: Literal["full", "overlay"] = "full",
    target_sparsity: float = 0.5,
    projections: tuple[str, ...] = ALL_PROJECTIONS,
) -> Path:
    """Write a checkpoint with exactly the given per-module thresholds and fused biases, no calibration run:
    for thresholds chosen by hand (tests) or fitted elsewhere (the synthetic GPU benchmark)."""
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
            data="hand-made", num_tokens=1, window=1, threshold_stats="dense", allocation="uniform",
            steps=0, lr=0.0, tokens_per_step=0, seed=0, seconds=0.0,
        ),
        created_at=now_iso(),
        vllm_spon_version=__version__,
    )
    return write_checkpoint(output, model_dir, config, thresholds, biases, overwrite=True)
