"""The reference implementation of a TEAL/SPON-sparse model: one Hugging Face model, switchable modes.

Calibration, evaluation and the tests that compare vLLM against it all use this class, so "what the sparse
model computes" is defined once. Hooks on every sparsified `nn.Linear` implement

    dense: y = W x + b
    teal:  y = W S(x) + b                      S(x) = x * (|x| > t), per-module threshold t
    spon:  y = W S(x) + b + b_spon             b_spon the fused bias W a (or, while training, W (S(x) + a)
                                               for an input-space vector a, or + c for an output-space one)

Dense and sparse share the same weights, so a teacher/student pair costs one model in memory.
"""

import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from vllm_spon.calibration.fp8_weights import FP8_SCHEME, round_linears_to_fp8
from vllm_spon.format.architectures import Family, family_named
from vllm_spon.format.checkpoint import SponCheckpoint
from vllm_spon.format.schema import BiasSpace, Quantization
from vllm_spon.kernels.reference import sparsify

Mode = Literal["dense", "teal", "spon"]


def _model_dir(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} is not a Hugging Face model directory (no config.json); make the example model with "
            "`vllm-spon example-model DIR`"
        )
    return path


def load_hf_model(path: str | os.PathLike, device: str = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    """A causal LM from a Hugging Face directory (safetensors only: nothing is unpickled)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(_model_dir(path), dtype=dtype, use_safetensors=True).to(device)


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer of a Hugging Face model directory (cheap: check data with it before loading the model)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_model_dir(path))


def family_of_model(model: nn.Module) -> Family:
    """The family of a Hugging Face causal LM (its class is its architecture: `LlamaForCausalLM`)."""
    return family_named(type(model).__name__, f"model class {type(model).__name__}")


def sparsifiable_linears(model: nn.Module, projections: Iterable[str] | None = None) -> dict[str, nn.Linear]:
    """The decoder-block linears named in `projections` (default: all of the family's), keyed by Hugging Face
    module name, in model order."""
    family = family_of_model(model)
    wanted = family.check_projections(projections)
    layers = model.get_submodule(family.layers)
    return {family.module(i, p): layers[i].get_submodule(f"{family.projection(p).parent}.{p}")
            for i in range(len(layers)) for p in family.projections if p in wanted}


class SparsityCounter:
    """Counts zeros among the (thresholded) inputs of each module."""

    def __init__(self) -> None:
        self.zeros: dict[str, int] = {}
        self.total: dict[str, int] = {}

    def add(self, module: str, x_sparse: torch.Tensor) -> None:
        self.zeros[module] = self.zeros.get(module, 0) + int((x_sparse == 0).sum())
        self.total[module] = self.total.get(module, 0) + x_sparse.numel()

    def per_module(self) -> dict[str, float]:
        return {m: self.zeros[m] / self.total[m] for m in self.zeros}

    def weighted(self, linears: dict[str, nn.Linear]) -> float:
        """Sparsity weighted by each module's weight size: the fraction of weight reads skipped."""
        sizes = {m: linears[m].weight.numel() for m in self.zeros}
        return sum(self.zeros[m] / self.total[m] * sizes[m] for m in sizes) / sum(sizes.values())


class SparseModel:
    """A frozen causal LM plus per-module thresholds and SPON biases, in one of three modes."""

    def __init__(self, model: nn.Module, projections: Iterable[str] | None = None):
        self.model = model.eval().requires_grad_(False)
        self.family = family_of_model(model)
        self.linears = sparsifiable_linears(model, projections)
        self.projections = self.family.check_projections(projections)
        device = next(model.parameters()).device
        self.thresholds: dict[str, torch.Tensor] = {
            m: torch.zeros((), dtype=torch.float32, device=device) for m in self.linears
        }
        self.fused_biases: dict[str, torch.Tensor] = {}
        self.vectors: dict[str, nn.Parameter] = {}
        self.bias_space: BiasSpace | None = None
        self.mode: Mode = "dense"
        self.quantization: Quantization = "none"
        self._unquantized: list[tuple[nn.Linear, torch.Tensor]] = []  # (linear, its original weight)
        self.counter: SparsityCounter | None = None
        self.input_observer: Callable[[str, torch.Tensor], None] | None = None
        for name, linear in self.linears.items():
            linear.register_forward_pre_hook(self._pre_hook(name))
            linear.register_forward_hook(self._post_hook(name))

    # --- hooks -------------------------------------------------------------------------------------
    def _pre_hook(self, name: str):
        def hook(_module: nn.Module, args: tuple) -> tuple | None:
            x = args[0]
            if self.input_observer is not None:
                self.input_observer(name, x.detach())
            if self.mode == "dense":
                return None
            x = sparsify(x, self.thresholds[name])
            if self.counter is not None:
                self.counter.add(name, x)
            if self.mode == "spon" and self.bias_space == "input" and name in self.vectors:
                x = x + self.vectors[name].to(x.dtype)
            return (x, *args[1:])

        return hook

    def _post_hook(self, name: str):
        def hook(_module: nn.Module, _args: tuple, y: torch.Tensor) -> torch.Tensor | None:
            if self.mode != "spon":
                return None
            if self.bias_space == "output" and name in self.vectors:
                y = y + self.vectors[name].to(y.dtype)
            if name in self.fused_biases:
                y = y + self.fused_biases[name].to(y.dtype)
            return y

        return hook

    # --- modes ---------------------------------------------------------------------------------------
    @contextmanager
    def use(self, mode: Mode) -> Iterator["SparseModel"]:
        previous, self.mode = self.mode, mode
        try:
            yield self
        finally:
            self.mode = previous

    @contextmanager
    def count_sparsity(self) -> Iterator[SparsityCounter]:
        self.counter = SparsityCounter()
        try:
            yield self.counter
        finally:
            self.counter = None

    @contextmanager
    def observe_inputs(self, observer: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
        """Call `observer(module_name, x)` with every sparsifiable input, before thresholding."""
        self.input_observer = observer
        try:
            yield
        finally:
            self.input_observer = None

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits

    def logits_and_hidden(self, input_ids: torch.Tensor, hidden: bool = True
                          ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Logits and, if `hidden`, the residual stream after the embeddings and after every decoder layer
        (the last one after the final norm, as Hugging Face returns it); () otherwise."""
        out = self.model(input_ids=input_ids, use_cache=False, output_hidden_states=hidden)
        return out.logits, out.hidden_states if hidden else ()

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The final hidden states, skipping the LM head (for passes that only need activations)."""
        backbone = self.model.get_submodule(self.family.backbone)
        return backbone(input_ids=input_ids, use_cache=False).last_hidden_state

    def decoder_layers(self) -> nn.ModuleList:
        return self.model.get_submodule(self.family.layers)

    # --- weights as served ----------------------------------------------------------------------------------
    def quantize(self, quantization: Quantization, model_dtype: torch.dtype = torch.bfloat16) -> None:
        """Round every block linear as `vllm serve --quantization Q --dtype bfloat16` does (all three modes
        then compute with those weights); the originals are kept for `unquantized`."""
        if quantization == "none":
            return
        block = sparsifiable_linears(self.model)
        originals = round_linears_to_fp8(block, self.family, FP8_SCHEME[quantization], model_dtype)
        self._unquantized = [(block[name], weight) for name, weight in originals.items()]
        self.quantization = quantization

    @contextmanager
    def unquantized(self) -> Iterator["SparseModel"]:
        """The original weights in place of the rounded ones (the teacher of SPON training); a no-op when the
        model is not quantized. Swaps tensors by reference: no copy."""
        rounded = [linear.weight.data for linear, _ in self._unquantized]
        for linear, weight in self._unquantized:
            linear.weight.data = weight
        try:
            yield self
        finally:
            for (linear, _), weight in zip(self._unquantized, rounded, strict=True):
                linear.weight.data = weight

    def block_weight_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of one copy of every block linear's weight in `dtype` (twice that on a quantized model, whose
        unquantized originals are kept too): what `weights_in(dtype)` allocates."""
        numel = sum(linear.weight.numel() for linear in sparsifiable_linears(self.model).values())
        return numel * dtype.itemsize * (2 if self._unquantized else 1)

    @contextmanager
    def weights_in(self, dtype: torch.dtype) -> Iterator["SparseModel"]:
        """Every block linear computes with a copy of its weight cast to `dtype` (the unquantized originals too).
        Under autocast to `dtype` the results are the same bits: autocast casts a weight that needs no gradient
        on every call, which this pays once (about 8% of a bf16 SPON training step on 2 CPU cores). The
        embeddings and the LM head (often tied to them) keep their weights."""
        block = list(sparsifiable_linears(self.model).values())
        own = [linear.weight.data for linear in block]
        originals = self._unquantized
        for linear, weight in zip(block, own, strict=True):
            linear.weight.data = weight.to(dtype)
        self._unquantized = [(linear, weight.to(dtype)) for linear, weight in originals]
        try:
            yield self
        finally:
            for linear, weight in zip(block, own, strict=True):
                linear.weight.data = weight
            self._unquantized = originals

    # --- parameters ------------------------------------------------------------------------------------
    def apply_checkpoint(self, checkpoint: SponCheckpoint) -> None:
        """Take a checkpoint's thresholds and fused biases (modules it does not list stay dense)."""
        unknown = sorted(set(checkpoint.thresholds) - set(self.linears))
        if unknown:
            raise ValueError(f"checkpoint names modules this model does not have: {unknown[:3]}")
        for name in self.linears:
            self.thresholds[name].fill_(checkpoint.threshold(name) if name in checkpoint.thresholds else 0.0)
        self.fused_biases = {
            name: bias.to(self.linears[name].weight.device) for name, bias in checkpoint.biases.items()
        }
        for name, bias in self.fused_biases.items():
            if bias.shape != (self.linears[name].out_features,):
                raise ValueError(f"tensor {name}.spon_bias has shape {list(bias.shape)}, expected "
                                 f"[{self.linears[name].out_features}]")

    def set_thresholds(self, thresholds: dict[str, float]) -> None:
        for name, value in thresholds.items():
            self.thresholds[name].fill_(float(value))

    def init_vectors(self, space: BiasSpace) -> list[nn.Parameter]:
        """Zero-initialised trainable SPON vectors (input space: `a`; output space: `c = W a`)."""
        self.bias_space = space
        self.vectors = {}
        for name, linear in self.linears.items():
            size = linear.in_features if space == "input" else linear.out_features
            self.vectors[name] = nn.Parameter(torch.zeros(size, dtype=torch.float32, device=linear.weight.device))
        return list(self.vectors.values())

    @torch.no_grad()
    def fuse_vectors(self) -> dict[str, torch.Tensor]:
        """Fold the trained vectors into output biases (`b_spon += W a`) and drop them."""
        for name, vec in self.vectors.items():
            weight = self.linears[name].weight
            delta = weight.float() @ vec.float() if self.bias_space == "input" else vec.float()
            self.fused_biases[name] = self.fused_biases.get(name, torch.zeros_like(delta)) + delta.detach()
        self.vectors = {}
        return self.fused_biases
