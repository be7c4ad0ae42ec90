"""SPON linear methods: threshold the input of a vLLM linear layer and add its fused SPON bias.

Each method wraps the layer's own vLLM method (`UnquantizedLinearMethod`, an fp8 method, ...), so weight
creation, loading and quantization stay vLLM's. A fused layer (`qkv_proj`, `gate_up_proj`) has one output
segment per Hugging Face module it fuses, each with its own threshold.

The per-layer SPON tensors are parameters of the layer, loaded by vLLM's weight loading with the layer's own
`weight_loader`, so name mapping (`q_proj` -> `qkv_proj` shard `q`) and tensor-parallel sharding are vLLM's:
  `spon_threshold`  float32 `[segments]`, one scalar per fused module (vLLM's per-tensor-scale layout);
  `spon_bias`       `[output_size_per_partition]` (the layer's dtype), sharded like the layer's bias.
"""

import itertools
import math

import torch
from torch.nn import Parameter
from vllm.model_executor.layers.linear import (
    LinearBase,
    LinearMethodBase,
    RowParallelLinear,
    UnquantizedLinearMethod,
)
from vllm.model_executor.utils import set_weight_attrs

from vllm_spon import kernels, ops  # noqa: F401  (ops registers torch.ops.spon.sparse_linear)
from vllm_spon.kernels import cpu
from vllm_spon.kernels.reference import sparsify

THRESHOLD_PARAM = "spon_threshold"
BIAS_PARAM = "spon_bias"


class SponLinearMethod(LinearMethodBase):
    """Common part: the wrapped method, the output segments, and where the fused SPON bias goes."""

    def __init__(self, inner: LinearMethodBase, layer: LinearBase, has_bias: bool):
        self.inner = inner
        self.segment_ends: list[int] = list(itertools.accumulate(layer.output_partition_sizes))
        # A row-parallel layer's partial outputs are summed across ranks: its bias is added on rank 0 only.
        self.adds_bias = has_bias and not (isinstance(layer, RowParallelLinear) and layer.tp_rank > 0)

    # vLLM's loader asks the layer's method how its weights are loaded; the answers are the inner method's.
    @property
    def uses_meta_device(self) -> bool:
        return getattr(self.inner, "uses_meta_device", False)

    @property
    def requires_device_loading(self) -> bool:
        return getattr(self.inner, "requires_device_loading", True)

    def __getattr__(self, name: str):
        """Other attributes vLLM reads off a layer's method (kernel handles, flags) are the inner method's."""
        if name == "inner":  # not set yet (copy/unpickle): do not recurse
            raise AttributeError(name)
        return getattr(self.inner, name)

    def create_weights(self, layer: torch.nn.Module, *args, **kwargs) -> None:
        self.inner.create_weights(layer, *args, **kwargs)

    def finalize(self, layer: torch.nn.Module) -> None:
        """Called once all weights and SPON tensors are loaded and processed."""


class SponDenseLinearMethod(SponLinearMethod):
    """Unquantized weights: `torch.ops.spon.sparse_linear` on one transposed copy of the weight.

    vLLM's own CPU path would repack the weight for oneDNN and empty `layer.weight`; instead the weight is
    stored once, column-major, so that `layer.weight.t()` is the contiguous `[in, out]` layout of the
    decode kernel and `layer.weight` keeps its `[out, in]` shape for everything else.
    """

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        layer.weight.data = layer.weight.data.t().contiguous().t()

    def finalize(self, layer: torch.nn.Module) -> None:
        # One threshold for the whole layer (always so with uniform allocation): threshold in traced code,
        # where torch.compile fuses S(x) into the op that produced x (RMSNorm, SiLU-and-mul) instead of a
        # separate pass over x, and the op then sees an already-sparse input.
        self.one_threshold = len(set(layer.spon_threshold.tolist())) == 1
        kernels.prepare(layer.weight.device, self.segment_ends[-1])
        if layer.weight.device.type == "cpu":  # build/load the C++ kernel now: a failure stops start-up
            cpu.load_extension()

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.adds_bias:
            bias = layer.spon_bias if bias is None else bias + layer.spon_bias
        x2 = x.reshape(-1, x.shape[-1])
        thresholds = layer.spon_threshold
        if self.one_threshold:
            x2, thresholds = sparsify(x2, thresholds[0]), None
        y = torch.ops.spon.sparse_linear(x2, layer.weight.t(), thresholds, self.segment_ends, bias)
        return y.reshape(*x.shape[:-1], y.shape[-1])


class SponQuantizedLinearMethod(SponLinearMethod):
    """Quantized weights: threshold the input in PyTorch, then vLLM's quantized matmul on it.

    Segments whose thresholds differ need differently thresholded inputs: one inner matmul per distinct
    threshold (known once loaded), its output columns stitched by segment. Calibration's uniform allocation
    gives one threshold per input site, hence one matmul.
    """

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        self.inner.process_weights_after_loading(layer)

    def finalize(self, layer: torch.nn.Module) -> None:
        values = layer.spon_threshold.tolist()
        distinct = sorted(set(values), key=values.index)
        group = [distinct.index(v) for v in values]
        self.threshold_rows = [values.index(v) for v in distinct]  # the first segment of each distinct value
        starts = [0, *self.segment_ends[:-1]]
        # (group, start, end) column pieces, adjacent segments of one group merged
        self.pieces: list[tuple[int, int, int]] = []
        for g, start, end in zip(group, starts, self.segment_ends, strict=True):
            if self.pieces and self.pieces[-1][0] == g:
                self.pieces[-1] = (g, self.pieces[-1][1], end)
            else:
                self.pieces.append((g, start, end))

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        outputs = [
            self.inner.apply(layer, sparsify(x, layer.spon_threshold[row]), bias)
            for row in self.threshold_rows
        ]
        if len(outputs) == 1:
            y = outputs[0]
        else:
            y = torch.cat([outputs[g][..., start:end] for g, start, end in self.pieces], dim=-1)
        if self.adds_bias:
            y = y + layer.spon_bias
        return y


def install_spon_method(layer: LinearBase, has_bias: bool, device: torch.device) -> SponLinearMethod:
    """Wrap `layer.quant_method` and register the layer's SPON parameters (NaN until loaded)."""
    inner = layer.quant_method
    method_cls = (
        SponDenseLinearMethod if isinstance(inner, UnquantizedLinearMethod) else SponQuantizedLinearMethod
    )
    method = method_cls(inner, layer, has_bias)
    threshold = Parameter(
        torch.full((len(method.segment_ends),), math.nan, dtype=torch.float32, device=device),
        requires_grad=False,
    )
    set_weight_attrs(threshold, {"needs_scalar_to_array": True, "weight_loader": layer.weight_loader})
    layer.register_parameter(THRESHOLD_PARAM, threshold)
    if has_bias:
        bias = Parameter(
            torch.full((method.segment_ends[-1],), math.nan, dtype=layer.params_dtype, device=device),
            requires_grad=False,
        )
        set_weight_attrs(bias, {"output_dim": 0, "weight_loader": layer.weight_loader})
        layer.register_parameter(BIAS_PARAM, bias)
    layer.quant_method = method
    if method.uses_meta_device:
        # Online quantization processes a layer once all of its parameters are loaded: count ours too.
        from vllm.model_executor.model_loader.reload.layerwise import initialize_online_processing

        initialize_online_processing(layer)
    return method
