"""`--load-format spon`: a SPON checkpoint's base weights through vLLM's own loader, plus SPON on every
sparsified linear layer.

Order of work (the same on vLLM 0.26 and 0.32, which differ in how `load_model` builds the model, so this
loader hooks only `load_model` and `load_weights`, which both have with the same signatures):
1. `load_model`: read and validate the checkpoint (`load_checkpoint`, as `inspect` does), put its identity
   into the compile-cache key, then let vLLM's `BaseModelLoader.load_model` build the model and call
   `load_weights`.
2. `load_weights`: wrap each sparsified layer's linear method and register its SPON parameters (before any
   weight arrives, so online quantization counts them), load the SPON tensors and the base weights.
3. back in `load_model`, after vLLM processed the weights: check every SPON parameter was loaded, finalize
   the methods, log what was loaded.
"""

import dataclasses
import hashlib
import logging
import os
from collections import Counter

import torch
from torch import nn
from vllm.config import ModelConfig, VllmConfig
from vllm.config.load import LoadConfig
from vllm.model_executor.model_loader import DummyModelLoader, get_model_loader
from vllm.model_executor.model_loader.base_loader import BaseModelLoader
from vllm.platforms import current_platform

from vllm_spon.format.checkpoint import (
    CONFIG_FILE,
    TENSORS_FILE,
    SponCheckpoint,
    check_links,
    load_checkpoint,
    read_config,
    spon_dir,
)
from vllm_spon.format.errors import CheckpointError
from vllm_spon.kernels import configs, vllm_batch_invariant
from vllm_spon.linear_method import BIAS_PARAM, THRESHOLD_PARAM, SponLinearMethod, install_spon_method
from vllm_spon.sites import SponSite, check_fits, find_sites, on_other_ranks, site_has_bias, spon_tensors

logger = logging.getLogger("vllm.spon")

LOAD_FORMAT = "spon"
# model_loader_extra_config key: how the base weights are loaded ("auto", "safetensors", "dummy", ...).
BASE_LOAD_FORMAT_KEY = "base_load_format"
# vllm_config.additional_config keys holding the checkpoint's identity and the kernel dispatch's (both hashed
# into the compile cache key).
COMPILE_KEY = "spon_checkpoint"
DISPATCH_KEY = "spon_kernel_dispatch"


def check_spon_model_first(engine_args_class: type) -> None:
    """Make `engine_args_class.create_model_config` (vLLM's `EngineArgs`) check a `--load-format spon` model's
    `spon/config.json` and links first.

    vLLM reads the model's config.json to build its `ModelConfig` before any loader runs, so an old overlay
    whose linked config.json lost its base model, or a folder that is no SPON checkpoint, failed there with
    vLLM's "Invalid repository ID or local directory" error; the validator's own line names the file and the
    fix. Installed once per process by `register()`.
    """
    create_model_config = engine_args_class.create_model_config
    if getattr(create_model_config, "_spon_checks_first", False):
        return

    def checked(self):
        if str(self.load_format) == LOAD_FORMAT:
            check_links(self.model, read_config(self.model))
        return create_model_config(self)

    checked._spon_checks_first = True
    engine_args_class.create_model_config = checked


def checkpoint_identity(model_dir: str | os.PathLike) -> str:
    """A digest of `spon/` (config and tensors): differs for any two checkpoints that compute differently."""
    digest = hashlib.sha256()
    for name in (CONFIG_FILE, TENSORS_FILE):
        digest.update((spon_dir(model_dir) / name).read_bytes())
    return digest.hexdigest()[:16]


def record_compile_identity(vllm_config: VllmConfig, model_dir: str | os.PathLike, device: torch.device) -> None:
    """Put the checkpoint's identity and the kernel dispatch's on `device` (`configs.dispatch_identity`) into
    `additional_config`, which `VllmConfig.compute_hash` hashes.

    `--load-format` is not part of vLLM's compile-cache key: without this, a dense and a SPON run of the
    same directory would share compiled graphs, and so would two runs under different kernel tables (the
    second then failed at its first forward, on a layer the first had put on the fp8 kernel).
    """
    if not isinstance(vllm_config.additional_config, dict):
        raise ValueError(
            f"--load-format spon records the checkpoint in additional_config, which must be a dict here, "
            f"not {type(vllm_config.additional_config).__name__}"
        )
    vllm_config.additional_config[COMPILE_KEY] = checkpoint_identity(model_dir)
    vllm_config.additional_config[DISPATCH_KEY] = configs.dispatch_identity(device)


def _layer_device(layer: nn.Module) -> torch.device:
    """Where the layer's weights live (online quantization keeps them on `meta` until loaded)."""
    for param in layer.parameters():
        if not param.is_meta:
            return param.device
    return torch.device(current_platform.device_type)


class SponModelLoader(BaseModelLoader):
    """Loads the base model with vLLM's loader for `base_load_format`, and SPON on top of it."""

    def __init__(self, load_config: LoadConfig):
        super().__init__(load_config)
        extra = dict(load_config.model_loader_extra_config or {})
        base_format = extra.pop(BASE_LOAD_FORMAT_KEY, "auto")
        if base_format == LOAD_FORMAT:
            raise ValueError(f"model_loader_extra_config {BASE_LOAD_FORMAT_KEY} cannot be {LOAD_FORMAT!r}")
        self.base_loader = get_model_loader(
            dataclasses.replace(load_config, load_format=base_format, model_loader_extra_config=extra)
        )
        self.base_weights_are_dummy = isinstance(self.base_loader, DummyModelLoader)
        self._checkpoint: SponCheckpoint | None = None
        self._sites: list[SponSite] = []

    def checkpoint(self, model_config: ModelConfig) -> SponCheckpoint:
        if self._checkpoint is None:
            # The validator `inspect` and `eval` use; dummy base weights are not read, so not compared.
            self._checkpoint = load_checkpoint(model_config.model, check_weights=not self.base_weights_are_dummy)
        return self._checkpoint

    def download_model(self, model_config: ModelConfig) -> None:
        self.base_loader.download_model(model_config)

    def load_model(self, vllm_config: VllmConfig, model_config: ModelConfig, prefix: str = "") -> nn.Module:
        checkpoint = self.checkpoint(model_config)
        record_compile_identity(vllm_config, model_config.model, torch.device(current_platform.device_type))
        model = super().load_model(vllm_config, model_config, prefix)  # calls self.load_weights
        for site in self._sites:
            _check_loaded(site, model_config.model)
            site.layer.quant_method.finalize(site.layer)
        logger.info("%s", _summary(model_config.model, checkpoint, self._sites, self.base_loader.load_config))
        return model

    def load_weights(self, model: nn.Module, model_config: ModelConfig) -> None:
        checkpoint = self.checkpoint(model_config)
        self._sites = _install(model, checkpoint, model_config.model)
        if self.base_weights_are_dummy:
            # Dummy loading overwrites every parameter, ours included: SPON tensors go in afterwards.
            self.base_loader.load_weights(model, model_config)
            model.load_weights(spon_tensors(self._sites, checkpoint))
        else:
            # SPON tensors first: an online-quantized layer is then processed as soon as its weights arrive.
            model.load_weights(spon_tensors(self._sites, checkpoint))
            self.base_loader.load_weights(model, model_config)


def _install(model: nn.Module, checkpoint: SponCheckpoint, model_dir: str) -> list[SponSite]:
    """The model's SPON sites, checked against the checkpoint, each with the SPON method installed once."""
    tensors_file = spon_dir(model_dir) / TENSORS_FILE
    sites = find_sites(model, checkpoint, tensors_file)
    check_fits(checkpoint, sites, tensors_file, on_other_ranks(model))
    for site in sites:
        if not isinstance(site.layer.quant_method, SponLinearMethod):
            install_spon_method(site.layer, site_has_bias(site, checkpoint), _layer_device(site.layer))
    return sites


def _check_loaded(site: SponSite, model_dir: str) -> None:
    """A SPON parameter still NaN was never loaded: refuse rather than run with a partly dense model."""
    for param_name in (THRESHOLD_PARAM, BIAS_PARAM):
        param = getattr(site.layer, param_name, None)
        if param is not None and not torch.isfinite(param).all():
            raise CheckpointError(
                f"{spon_dir(model_dir) / TENSORS_FILE}: vLLM layer {site.name}.{param_name} was not (fully) "
                f"loaded from tensors of {', '.join(site.members)}; this model's weight loading does not map "
                "SPON tensors onto it"
            )


def _summary(model_dir: str, checkpoint: SponCheckpoint, sites: list[SponSite], base: LoadConfig) -> str:
    kinds = Counter(site.kind for site in sites)
    methods = Counter(
        f"{type(m).__name__}({type(m.inner).__name__})" for m in (site.layer.quant_method for site in sites)
    )
    thresholds = [t for site in sites for t in site.layer.spon_threshold.tolist()]
    invariant = vllm_batch_invariant() and current_platform.is_cuda()
    return (
        f"SPON: {model_dir} ({checkpoint.config.layout}, base weights: {base.load_format}): "
        f"{checkpoint.summary()}. Installed on {len(sites)} vLLM linears "
        f"({', '.join(f'{k} x{n}' for k, n in kinds.items())}) via "
        f"{', '.join(f'{k} x{n}' for k, n in methods.items())}; "
        f"{sum(t > 0 for t in thresholds)}/{len(thresholds)} segments thresholded on this rank"
        + ("; VLLM_BATCH_INVARIANT=1: every batch size takes the dense matmul on the thresholded input (the same "
           "answer at any batch, no sparse-kernel speed-up)" if invariant else "")
    )
