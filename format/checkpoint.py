"""Reading, validating and writing SPON checkpoints: `spon/config.json` (format/schema.py) and
`spon/spon.safetensors`.

A checkpoint is a Hugging Face model directory with a `spon/` sub-folder. The *full* form holds the base
model's files; the *overlay* form holds `spon/`, symbolic links to the base model's weights and copies of
its small top-level files (config, tokenizer), so a large base model is referenced, never copied, and every
tool that expects a model directory still works.

Tensors are named after the Hugging Face module they belong to (format/architectures.py names them):
  `<module>.threshold`  0-d float32, the magnitude below which the module's inputs are zeroed;
  `<module>.spon_bias`  float32 `[out_features]`, the fused SPON bias `W a`, added to the module's output
                        (on top of the module's own bias, if it has one).
Writes are atomic (format/atomic.py) and replace only a previous checkpoint; reads never unpickle.
`load_checkpoint` is the one validator: `inspect`, `eval` and the vLLM loader call it, and `write_checkpoint`
applies its checks to what it is about to write.
"""

import math
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import safe_open
from safetensors.torch import save_file

from .architectures import Family, ModelShape, family_of
from .atomic import OutputError, atomic_directory, check_target, unfinished, writable_folder
from .errors import CheckpointError
from .identity import check_base_model, model_family, read_hf_config
from .schema import Layout, SponConfig

SPON_DIR = "spon"
CONFIG_FILE = "config.json"
TENSORS_FILE = "spon.safetensors"
THRESHOLD_SUFFIX = ".threshold"
BIAS_SUFFIX = ".spon_bias"
# What `--overwrite` may replace at a checkpoint's output (and nothing else).
PREVIOUS_CHECKPOINT = "a previous vllm-spon checkpoint"
# An overlay copies the base model's files below this size that are not weights, and links the rest.
OVERLAY_COPY_MAX_BYTES = 64 * 2**20


class SponCheckpoint:
    """A validated checkpoint in memory: config plus tensors keyed by Hugging Face module name, and the
    family of the model it belongs to."""

    def __init__(self, config: SponConfig, family: Family, thresholds: dict[str, torch.Tensor],
                 biases: dict[str, torch.Tensor]):
        self.config = config
        self.family = family
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
        achieved = ("hand-made, not calibrated" if c.achieved_sparsity is None
                    else f"achieved {c.achieved_sparsity:.3f} on calibration tokens")
        return (
            f"{c.method.upper()} checkpoint of a {self.family.name} model: {len(self.modules)} linears "
            f"({', '.join(c.projections)}), target sparsity {c.target_sparsity:.2f}, {achieved}, "
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
    check_links(checkpoint, config)
    check_base_model(config.base_model, checkpoint, spon_dir(checkpoint) / CONFIG_FILE, check_weights=check_weights)
    thresholds, biases = _read_tensors(spon_dir(checkpoint) / TENSORS_FILE)
    validate_contents(spon_dir(checkpoint), config, read_hf_config(checkpoint), thresholds, biases)
    return SponCheckpoint(config, model_family(checkpoint), thresholds, biases)


def check_links(checkpoint: str | os.PathLike, config: SponConfig) -> None:
    """Every link in the checkpoint's folder resolves; else name the link and the base model's recorded path."""
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
    """Every sparsified module of the model, in model order, with its output size (its family's table)."""
    return family_of(hf_config, source).modules(ModelShape.from_hf_config(hf_config, source), projections)


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
    source = f"{directory.parent}/config.json"
    family = family_of(hf_config, source)
    foreign = sorted(set(config.projections) - set(family.projections))
    if foreign:
        raise CheckpointError(f"{config_file}: projections {foreign} are not linears of a {family.name} block "
                              f"({', '.join(family.projections)}); the checkpoint was made for another model")
    out_features = module_out_features(hf_config, config.projections, source)
    expected = set(out_features)
    claims = (("thresholds", config.thresholds), ("module_sparsity", config.module_sparsity or {}))
    for claim, names in claims[:1] if config.handmade else claims:
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
    low = min((config.module_sparsity or {}).values(), default=0.0)
    high = max((config.module_sparsity or {}).values(), default=1.0)
    achieved = config.achieved_sparsity
    if achieved is not None and not (low >= 0 and high <= 1 and low - 1e-6 <= achieved <= high + 1e-6):
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


def check_output(output: Path, model_dir: Path, layout: Layout, overwrite: bool) -> None:
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


def _checkpoint_bytes(model_dir: Path, layout: Layout) -> int:
    """About what `write_checkpoint` will write: the SPON tensors, plus the base model's files it copies."""
    hf_config = read_hf_config(model_dir)
    family = family_of(hf_config, str(model_dir))
    sizes = module_out_features(hf_config, family.projections, str(model_dir))
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
