"""Which vLLM linear layers a SPON checkpoint sparsifies, and whether its tensors fit them.

A checkpoint names Hugging Face modules (`model.layers.0.self_attn.k_proj`); vLLM fuses some of them into
one layer (`qkv_proj` = q, k, v; `gate_up_proj` = gate, up), as the family's table says (and the model
class's `packed_modules_mapping` agrees). A *site* is one vLLM layer with the Hugging Face modules it
holds, in output order.
"""

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from vllm.model_executor.layers.linear import LinearBase, MergedColumnParallelLinear, QKVParallelLinear
from vllm.model_executor.models.utils import PPMissingLayer

from vllm_spon.format.checkpoint import THRESHOLD_SUFFIX, SponCheckpoint
from vllm_spon.format.errors import CheckpointError
from vllm_spon.linear_method import BIAS_PARAM, THRESHOLD_PARAM


@dataclass(frozen=True)
class SponSite:
    """A vLLM linear layer and the Hugging Face modules it fuses, with their full output sizes."""

    name: str
    layer: LinearBase
    members: tuple[str, ...]
    out_features: tuple[int, ...]

    @property
    def kind(self) -> str:
        return self.name.rsplit(".", 1)[-1]


def _member_out_features(layer: LinearBase, count: int) -> tuple[int, ...]:
    """The unsharded output size of each of the `count` checkpoint modules the layer holds (what their bias
    vectors hold): one per segment, or all segments for one module stored fused (Phi-3's `qkv_proj`)."""
    if isinstance(layer, QKVParallelLinear):
        sizes = (
            layer.total_num_heads * layer.head_size,
            layer.total_num_kv_heads * layer.head_size,
            layer.total_num_kv_heads * layer.v_head_size,
        )
    elif isinstance(layer, MergedColumnParallelLinear):
        sizes = tuple(layer.output_sizes)
    else:
        sizes = (layer.output_size,)
    return sizes if count == len(sizes) else (sum(sizes),)


def find_sites(model: nn.Module, checkpoint: SponCheckpoint, tensors_file: Path) -> list[SponSite]:
    """The vLLM layers of this rank that hold at least one sparsified projection, found from the family's
    table (format/architectures.py); a vLLM model that does not match the table is refused in one line."""
    family, projections = checkpoint.family, set(checkpoint.config.projections)
    packed: dict[str, list[str]] = getattr(model, "packed_modules_mapping", {})
    for leaf, parts in family.vllm_layers().items():
        if len(parts) > 1 and tuple(packed.get(leaf, parts)) != parts:
            raise CheckpointError(
                f"{tensors_file}: vLLM's {type(model).__name__} fuses {leaf} from {packed[leaf]}, the {family.name} "
                f"table (format/architectures.py) from {list(parts)}; the table does not describe this vLLM model"
            )
    sites = []
    for index, decoder_layer in enumerate(model.get_submodule(family.layers)):
        if isinstance(decoder_layer, PPMissingLayer):  # on another pipeline stage
            continue
        for leaf, parts in family.vllm_layers().items():
            if not set(parts) & projections:
                continue
            name = f"{family.layers}.{index}.{family.projection(parts[0]).parent}.{leaf}"
            try:
                layer = model.get_submodule(name)
            except AttributeError:
                layer = None
            if not isinstance(layer, LinearBase):
                raise CheckpointError(
                    f"{tensors_file}: vLLM's {type(model).__name__} has no linear layer {name}, where the "
                    f"{family.name} table (format/architectures.py) puts {', '.join(parts)}"
                )
            members = tuple(family.module(index, p) for p in parts)
            sites.append(SponSite(name, layer, members, _member_out_features(layer, len(members))))
    return sites


def on_other_ranks(model: nn.Module) -> tuple[str, ...]:
    """Name prefixes of the decoder layers that pipeline parallelism placed on other ranks (vLLM keeps a
    `PPMissingLayer` in their place): their modules are loaded there, not here."""
    return tuple(f"{name}." for name, module in model.named_modules() if isinstance(module, PPMissingLayer))


def check_fits(
    checkpoint: SponCheckpoint, sites: list[SponSite], tensors_file: Path, elsewhere: tuple[str, ...] = ()
) -> None:
    """The vLLM layers of this rank hold exactly the checkpoint's modules, less those of the layers
    `elsewhere` (names, shapes and dtypes were validated against the model's config by `load_checkpoint`;
    this checks vLLM's fusing of them)."""
    if not sites:
        raise CheckpointError(
            f"{tensors_file}: this rank holds no linear layer of {checkpoint.config.projections}; "
            "the checkpoint sparsifies none of this model's layers"
        )
    projections = set(checkpoint.config.projections)
    members = {m: site for site in sites for m in site.members}
    for module, site in members.items():
        if module.rsplit(".", 1)[-1] in projections and module not in checkpoint.thresholds:
            raise CheckpointError(
                f"{tensors_file}: tensor {module}{THRESHOLD_SUFFIX} is missing (config.json sparsifies "
                f"{sorted(projections)}, vLLM layer {site.name}); the checkpoint is incomplete, re-run calibration"
            )
    unused = sorted(m for m in set(checkpoint.thresholds) - set(members) if not m.startswith(elsewhere))
    if unused:
        raise CheckpointError(
            f"{tensors_file}: tensor {unused[0]}{THRESHOLD_SUFFIX} ({len(unused)} in all) belongs to no "
            "linear layer of this model; the checkpoint was made for another model"
        )


def site_has_bias(site: SponSite, checkpoint: SponCheckpoint) -> bool:
    return any(m in checkpoint.biases for m in site.members)


def spon_tensors(sites: list[SponSite], checkpoint: SponCheckpoint) -> Iterator[tuple[str, torch.Tensor]]:
    """The SPON tensors under the names vLLM's weight loading maps onto the layers' SPON parameters.

    A fused module that is not sparsified gets threshold 0 (keeps every non-zero input) and, if its
    siblings have a fused bias, a zero bias.
    """
    for site in sites:
        has_bias = site_has_bias(site, checkpoint)
        for module, out_features in zip(site.members, site.out_features, strict=True):
            yield f"{module}.{THRESHOLD_PARAM}", checkpoint.thresholds.get(module, torch.zeros(()))
            if has_bias:
                yield f"{module}.{BIAS_PARAM}", checkpoint.biases.get(module, torch.zeros(out_features))
