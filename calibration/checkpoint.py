"""The SPON checkpoint format: `spon/config.json` (validated) and `spon/spon.safetensors`.

A checkpoint is a Hugging Face model directory with a `spon/` sub-folder. The *full* form holds the base
model's files; the *overlay* form holds `spon/`, symbolic links to the base model's weights and copies of
its small top-level files (config, tokenizer), so a large base model is referenced, never copied, and every
tool that expects a model directory still works.

Tensors are named after the Hugging Face module they belong to:
  `<module>.threshold`  0-d float32, the magnitude below which the module's inputs are zeroed;
  `<module>.spon_bias`  float32 `[out_features]`, the fused SPON bias `W a`, added to the module's output
                        (on top of the module's own bias, if it has one).
Writes are atomic (calibration/atomic.py) and replace only a previous checkpoint; reads never unpickle.
`load_checkpoint` is the one validator: `inspect`, `eval` and the vLLM loader call it, and `write_checkpoint`
applies its checks to what it is about to write.
"""

import hashlib
import json
import math
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from safetensors import safe_open
from safetensors.torch import save_file

from vllm_spon import __version__
from vllm_spon.calibration.atomic import OutputError, atomic_directory, check_target, unfinished, writable_folder

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
# The sub-module of a decoder block that holds each projection (`model.layers.N.<parent>.<projection>`).
PROJECTION_PARENT = {p: "self_attn" if site.startswith("attn") else "mlp" for p, site in PROJECTION_SITE.items()}
# What `--overwrite` may replace at a checkpoint's output (and nothing else).
PREVIOUS_CHECKPOINT = "a previous vllm-spon checkpoint"
# An overlay copies the base model's files below this size that are not weights, and links the rest.
OVERLAY_COPY_MAX_BYTES = 64 * 2**20
# Architectures whose module names and shapes the format (and the vLLM plugin) know; one place to extend.
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)


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


# Sparsities (achieved on the same windows) within which TEAL and SPON are compared: beyond it a method's
# perplexity differs by how much it drops, not by how well it recovers.
MATCHED_SPARSITY = 0.01


class PerplexityReport(_Strict):
    """Dense, TEAL and SPON perplexity on the same held-out windows: TEAL with its own thresholds and no
    biases, SPON with the checkpoint's thresholds and biases (`evaluate.compare_methods` measures it, for
    calibration's check, `eval`, its plot and the benchmarks alike)."""

    data: str
    num_windows: int = Field(gt=0)
    window: int = Field(gt=0)
    dense: float = Field(gt=0)
    teal: float = Field(gt=0)
    spon: float = Field(gt=0)
    teal_sparsity: float = Field(ge=0, le=1)
    spon_sparsity: float = Field(ge=0, le=1)

    @property
    def matched(self) -> bool:
        return abs(self.teal_sparsity - self.spon_sparsity) <= MATCHED_SPARSITY

    @property
    def gap_recovered(self) -> float | None:
        """(TEAL - SPON) / (TEAL - dense), only at matched sparsity and with a gap to recover."""
        gap = self.teal - self.dense
        return (self.teal - self.spon) / gap if self.matched and gap > 0 else None

    def gap_note(self) -> str:
        """Why `gap_recovered` is what it is, in words for the user."""
        if not self.matched:
            return (f"not reported: TEAL ran at sparsity {self.teal_sparsity:.3f} and SPON at "
                    f"{self.spon_sparsity:.3f} on these windows, more than {MATCHED_SPARSITY} apart")
        if self.teal <= self.dense:
            return "not reported: TEAL is no worse than dense here, there is no gap to recover"
        return (f"at matched sparsity (TEAL {self.teal_sparsity:.3f}, SPON {self.spon_sparsity:.3f}): "
                "(TEAL - SPON) / (TEAL - dense)")


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
    teal_thresholds: dict[str, float] | None = Field(
        default=None,
        description="module name -> TEAL's own threshold, fitted for TEAL before SPON training: the baseline "
        "`eval` compares SPON against at matched sparsity (None in hand-made checkpoints)",
    )
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

    @field_validator("thresholds", "teal_thresholds")
    @classmethod
    def _finite_non_negative(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        bad = {k: t for k, t in (v or {}).items() if not (math.isfinite(t) and t >= 0)}
        if bad:
            raise ValueError(f"thresholds must be finite and >= 0: {bad}")
        return v

    @model_validator(mode="after")
    def _bias_space_matches_method(self) -> "SponConfig":
        if (self.method == "spon") != (self.bias_space is not None):
            raise ValueError("bias_space is required for method 'spon' and must be null for method 'teal'")
        return self

    @model_validator(mode="after")
    def _teal_thresholds_cover_the_modules(self) -> "SponConfig":
        if self.teal_thresholds is not None and set(self.teal_thresholds) != set(self.thresholds):
            odd = sorted(set(self.teal_thresholds) ^ set(self.thresholds))
            raise ValueError(f"teal_thresholds and thresholds name different modules (e.g. {odd[0]})")
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
            f"target sparsity {c.target_sparsity:.2f}, achieved {c.achieved_sparsity:.3f} on calibration tokens, "
            f"thresholds min {values.min():.4g} / median {values.median():.4g} / max {values.max():.4g}, "
            f"{len(self.biases)} fused biases"
        )


def spon_dir(checkpoint: str | os.PathLike) -> Path:
    return Path(checkpoint) / SPON_DIR


def is_spon_checkpoint(path: str | os.PathLike) -> bool:
    """A finished checkpoint directory (possibly invalid): what `--overwrite` may replace."""
    return (spon_dir(path) / CONFIG_FILE).is_file() and not unfinished(Path(path))


def _one_line(error: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in error.errors())


def read_config(checkpoint: str | os.PathLike) -> SponConfig:
    """Read and validate `spon/config.json`; errors name the file and the fix."""
    path = spon_dir(checkpoint) / CONFIG_FILE
    if unfinished(Path(checkpoint)):
        raise CheckpointError(
            f"{checkpoint} is an unfinished write of vllm-spon (interrupted, or still running), not a "
            "checkpoint; delete it, or wait for the run writing it"
        )
    if not path.is_file():
        raise CheckpointError(
            f"{checkpoint} is not a SPON checkpoint: {path} does not exist. "
            "Create one with `vllm-spon calibrate MODEL --output DIR`, or drop `--load-format spon` to serve "
            "the dense model."
        )
    try:
        return SponConfig.model_validate_json(path.read_bytes())
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read ({e.strerror}); check its permissions") from None
    except ValidationError as e:
        raise CheckpointError(f"{path} is not a valid SPON config: {_one_line(e)}") from None


def load_checkpoint(checkpoint: str | os.PathLike, check_weights: bool = True) -> SponCheckpoint:
    """The one validator (inspect, eval, the vLLM loader): the checkpoint and the model files beside it.

    Checks the config, the overlay's links, the base model's identity (`check_weights=False` skips the
    probe weight, for base weights not read from disk) and every tensor against the config and the model's
    shapes. Every refusal is one line naming the file, the tensor and the fix.
    """
    config = read_config(checkpoint)
    _check_links(checkpoint, config)
    check_base_model(config, checkpoint, check_weights=check_weights)
    thresholds, biases = _read_tensors(spon_dir(checkpoint) / TENSORS_FILE)
    validate_contents(spon_dir(checkpoint), config, read_hf_config(checkpoint), thresholds, biases)
    return SponCheckpoint(config, thresholds, biases)


def _check_links(checkpoint: str | os.PathLike, config: SponConfig) -> None:
    for link in sorted(Path(checkpoint).iterdir()):
        if link.is_symlink() and not link.exists():
            raise CheckpointError(
                f"{link} points to {os.readlink(link)}, which does not exist: the base model "
                f"{config.base_model.path} recorded in {spon_dir(checkpoint) / CONFIG_FILE} moved or was deleted; "
                f"restore it there, or re-create the {config.layout} checkpoint from where it is now"
            )


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(thresholds, biases) keyed by module; nothing is unpickled, and an unreadable file is named."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete; re-run calibration")
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (not a mapping)
    except Exception as e:  # safetensors' own error types (header, size, dtype), OSError
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"{path} cannot be read as safetensors ({reason}): it is truncated, corrupt or not a safetensors file "
            "(vllm-spon never unpickles); re-run calibration"
        ) from None
    thresholds: dict[str, torch.Tensor] = {}
    biases: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if name.endswith(THRESHOLD_SUFFIX):
            thresholds[name.removesuffix(THRESHOLD_SUFFIX)] = tensor
        elif name.endswith(BIAS_SUFFIX):
            biases[name.removesuffix(BIAS_SUFFIX)] = tensor
        else:
            raise CheckpointError(
                f"{path}: unexpected tensor {name!r}; names end in {THRESHOLD_SUFFIX} or {BIAS_SUFFIX}"
            )
    return thresholds, biases


def module_out_features(hf_config: dict, projections: tuple[str, ...], source: str) -> dict[str, int]:
    """Every sparsified module of a Llama-style model, in model order, with its output size."""
    try:
        layers, hidden = int(hf_config["num_hidden_layers"]), int(hf_config["hidden_size"])
        heads, intermediate = int(hf_config["num_attention_heads"]), int(hf_config["intermediate_size"])
        kv_heads = int(hf_config.get("num_key_value_heads") or heads)
        head_dim = int(hf_config.get("head_dim") or hidden // heads)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: a Llama-style config needs {e} (an integer)") from None
    sizes = {"q_proj": heads * head_dim, "k_proj": kv_heads * head_dim, "v_proj": kv_heads * head_dim,
             "o_proj": hidden, "gate_proj": intermediate, "up_proj": intermediate, "down_proj": hidden}
    return {f"model.layers.{i}.{PROJECTION_PARENT[p]}.{p}": sizes[p]
            for i in range(layers) for p in ALL_PROJECTIONS if p in projections}


def validate_contents(
    directory: Path,
    config: SponConfig,
    hf_config: dict,
    thresholds: dict[str, torch.Tensor],
    biases: dict[str, torch.Tensor],
) -> None:
    """The config's claims against the model's modules, and every tensor against the config and the model:
    run on what `load_checkpoint` read and on what calibration is about to write (`directory` = `spon/`)."""
    config_file, tensors_file = directory / CONFIG_FILE, directory / TENSORS_FILE
    out_features = module_out_features(hf_config, config.projections, f"{directory.parent}/config.json")
    expected = set(out_features)
    for claim, names in (("thresholds", config.thresholds), ("module_sparsity", config.module_sparsity)):
        if set(names) != expected:
            missing, extra = sorted(expected - set(names)), sorted(set(names) - expected)
            raise CheckpointError(
                f"{config_file}: {claim} "
                + (f"lacks module {missing[0]} ({len(missing)} missing)" if missing else
                   f"names {extra[0]} ({len(extra)} in all), not a {'/'.join(config.projections)} module of this "
                   f"{hf_config.get('num_hidden_layers')}-layer model")
                + f", though projections are {list(config.projections)}; the checkpoint was edited or made for "
                "another model, re-run calibration"
            )
    low = min(config.module_sparsity.values(), default=0.0)
    high = max(config.module_sparsity.values(), default=1.0)
    if not (low >= 0 and high <= 1 and low - 1e-6 <= config.achieved_sparsity <= high + 1e-6):
        raise CheckpointError(
            f"{config_file}: achieved_sparsity {config.achieved_sparsity} is not a weighted mean of "
            f"module_sparsity (range {low}..{high}, each in [0, 1]); the config was edited, re-run calibration"
        )
    if set(thresholds) != set(config.thresholds):
        missing = sorted(set(config.thresholds) - set(thresholds))
        extra = sorted(set(thresholds) - set(config.thresholds))
        raise CheckpointError(
            f"{tensors_file}: thresholds do not match {CONFIG_FILE} (missing tensors: {missing[:5]}, "
            f"not in config: {extra[:5]}); the checkpoint was edited or half-written, re-run calibration"
        )
    for module, t in thresholds.items():
        name = module + THRESHOLD_SUFFIX
        if t.dim() != 0 or t.dtype != torch.float32:
            raise CheckpointError(f"{tensors_file}: tensor {name} must be a 0-d float32 tensor (the format's), "
                                  f"got {str(t.dtype).removeprefix('torch.')} {list(t.shape)}; re-run calibration")
        value = float(t)
        if not math.isfinite(value) or value < 0:
            raise CheckpointError(f"{tensors_file}: tensor {name} is {value}; thresholds must be finite and >= 0")
        if not math.isclose(value, config.thresholds[module], rel_tol=1e-6, abs_tol=1e-12):
            raise CheckpointError(
                f"{tensors_file}: tensor {name} = {value} disagrees with {CONFIG_FILE} ({config.thresholds[module]})"
            )
    if config.method == "teal" and biases:
        raise CheckpointError(f"{tensors_file}: method 'teal' (in {CONFIG_FILE}) but the file holds {len(biases)} "
                              f"{BIAS_SUFFIX} tensors; re-run calibration")
    if config.method == "spon" and set(biases) != set(thresholds):
        missing = sorted(set(thresholds) - set(biases)) or sorted(set(biases) - set(thresholds))
        raise CheckpointError(
            f"{tensors_file}: tensor {missing[0]}{BIAS_SUFFIX} is "
            f"{'missing' if missing[0] in thresholds else 'there but belongs to no sparsified module'} (method "
            f"'spon' has one fused bias for every sparsified module); the checkpoint is incomplete, re-run calibration"
        )
    for module, b in biases.items():
        name = module + BIAS_SUFFIX
        if tuple(b.shape) != (out_features[module],):
            raise CheckpointError(
                f"{tensors_file}: tensor {name} has shape {list(b.shape)}, but the model's {module} has "
                f"{out_features[module]} outputs; the checkpoint was made for another model"
            )
        if b.dtype != torch.float32:
            raise CheckpointError(f"{tensors_file}: tensor {name} is {str(b.dtype).removeprefix('torch.')}; the "
                                  "format stores float32, re-run calibration")
        if not torch.isfinite(b).all():
            raise CheckpointError(f"{tensors_file}: tensor {name} holds NaN or Inf values")


def check_output(output: Path, model_dir: Path, layout: Literal["full", "overlay"], overwrite: bool) -> None:
    """Refuse, before any heavy work, an output that would lose the user's files or cannot be written.

    Only a previous checkpoint is ever replaced (with `overwrite`); an output equal to, inside, linked into or
    containing the model directory, or the folder its files link to, is refused; the nearest existing folder
    must take a new directory and have room for the checkpoint.
    """
    out, model = Path(output).absolute().resolve(), Path(model_dir).absolute().resolve()
    # The model directory and wherever its files really live (an overlay's base, a hub cache's blobs).
    homes = [model, *sorted({item.resolve().parent for item in _base_files(model) if item.is_file()} - {model})]
    for home in homes:
        if out == home or home in out.parents or out in home.parents:
            where = "the folder" if out == home else "inside" if home in out.parents else "a parent of"
            raise OutputError(
                f"--output {output} is {where} {home}, which holds the files of the model {model_dir} (resolved: "
                f"{out}); writing there could destroy the base model, choose a separate --output"
            )
    check_target(Path(output), overwrite, is_spon_checkpoint, PREVIOUS_CHECKPOINT)
    parent = writable_folder(out, "--output")
    need = _checkpoint_bytes(model, layout)
    free = shutil.disk_usage(parent).free
    if need > free:
        raise OutputError(f"--output {output}: the {layout} checkpoint needs about {need / 2**20:.0f} MiB but "
                          f"{parent} has {free / 2**20:.0f} MiB free; free space or choose another --output"
                          + (" (--layout overlay links the base weights instead of copying them)"
                             if layout == "full" else ""))


def _base_files(base: Path) -> list[Path]:
    """The base model's top-level entries a checkpoint carries (not its own `spon/`, not hidden ones)."""
    return [item for item in sorted(base.iterdir()) if item.name != SPON_DIR and not item.name.startswith(".")]


def _linked(item: Path) -> bool:
    """What an overlay links rather than copies: the weights. Small files (config, tokenizer, templates) are
    copied, so a tool that reads them first still opens an overlay whose base moved (vLLM parses config.json
    before any loader runs) and `load_checkpoint` can name the missing base path."""
    return item.suffix == ".safetensors" or item.stat().st_size >= OVERLAY_COPY_MAX_BYTES


def _checkpoint_bytes(model_dir: Path, layout: Literal["full", "overlay"]) -> int:
    """About what `write_checkpoint` will write: the SPON tensors, plus the base model's files it copies."""
    sizes = module_out_features(read_hf_config(model_dir), ALL_PROJECTIONS, str(model_dir))
    spon = 4 * (sum(sizes.values()) + len(sizes)) + 2**20  # float32 biases and thresholds, config, headers
    copied = [p for item in _base_files(model_dir) if layout == "full" or (item.is_file() and not _linked(item))
              for p in ([item] if item.is_file() else item.rglob("*")) if p.is_file()]
    return spon + sum(p.stat().st_size for p in copied)


def write_checkpoint(
    output: str | os.PathLike,
    base_model_dir: str | os.PathLike,
    config: SponConfig,
    thresholds: dict[str, float],
    biases: dict[str, torch.Tensor],
    overwrite: bool = False,
) -> Path:
    """Write a full or overlay checkpoint atomically: either all of it lands or nothing does.

    What is written passes the same validation `load_checkpoint` applies, so a checkpoint that loads is the
    only kind this writes.
    """
    base = Path(base_model_dir).absolute()
    check_output(Path(output), base, config.layout, overwrite)
    threshold_tensors = {m: torch.tensor(float(t), dtype=torch.float32) for m, t in thresholds.items()}
    bias_tensors = {m: b.detach().float().contiguous().cpu() for m, b in biases.items()}
    validate_contents(spon_dir(output), config, read_hf_config(base), threshold_tensors, bias_tensors)
    tensors = {**{m + THRESHOLD_SUFFIX: t for m, t in threshold_tensors.items()},
               **{m + BIAS_SUFFIX: b for m, b in bias_tensors.items()}}
    with atomic_directory(Path(output), overwrite, is_spon_checkpoint, PREVIOUS_CHECKPOINT) as tmp:
        for item in _base_files(base):
            if config.layout == "overlay" and item.is_file() and _linked(item):
                (tmp / item.name).symlink_to(item.resolve())
            elif item.is_file():
                shutil.copy2(item, tmp / item.name)
            elif config.layout == "full" and item.is_dir():
                shutil.copytree(item, tmp / item.name)
        (tmp / SPON_DIR).mkdir()
        save_file(tensors, str(tmp / SPON_DIR / TENSORS_FILE), metadata={"format": "spon"})
        (tmp / SPON_DIR / CONFIG_FILE).write_text(config.model_dump_json(indent=2) + "\n")
    return Path(output)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


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


def hf_config_identity(model_dir: str | os.PathLike) -> tuple[str, dict[str, int]]:
    """(architecture, shape fields) of a Hugging Face model directory; refuses unsupported architectures."""
    cfg = read_hf_config(model_dir)
    archs = cfg.get("architectures") or ["?"]
    if archs[0] not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"{Path(model_dir) / 'config.json'}: architecture {archs[0]} is not supported; vllm-spon supports "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    try:
        shape = {k: int(cfg[k]) for k in SHAPE_FIELDS if k in cfg}
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{Path(model_dir) / 'config.json'}: a shape field is not an integer ({e})") from None
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
