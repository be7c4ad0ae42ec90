"""SPON linear methods: threshold the input of a vLLM linear layer and add its fused SPON bias.

Each method wraps the layer's own vLLM method (`UnquantizedLinearMethod`, an fp8 method, ...), so weight
creation, loading and quantization stay vLLM's. The start-up summary names the path by the method's class:
`SponDenseLinearMethod` (sparse kernels), `SponFp8LinearMethod` (sparse fp8 kernel for decode, vLLM's fp8
matmul otherwise), `SponQuantizedLinearMethod` (vLLM's quantized matmul on the thresholded input).
A fused layer (`qkv_proj`, `gate_up_proj`) has one output segment per Hugging Face module it fuses, each with
its own threshold.

The per-layer SPON tensors are parameters of the layer, loaded by vLLM's weight loading with the layer's own
`weight_loader`, so name mapping (`q_proj` -> `qkv_proj` shard `q`) and tensor-parallel sharding are vLLM's:
  `spon_threshold`  float32 `[segments]`, one scalar per fused module (vLLM's per-tensor-scale layout);
  `spon_bias`       `[output_size_per_partition]` (the layer's dtype), sharded like the layer's bias.
"""

import itertools
import logging
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
from vllm.utils.torch_utils import direct_register_custom_op

from vllm_spon import kernels, ops  # noqa: F401  (ops registers torch.ops.spon.sparse_linear)
from vllm_spon.kernels import configs, cpu
from vllm_spon.kernels.fp8 import FP8_DTYPE, sparse_linear_fp8
from vllm_spon.kernels.reference import sparsify

logger = logging.getLogger(__name__)

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

    def with_spon_bias(self, layer: torch.nn.Module, bias: torch.Tensor | None) -> torch.Tensor | None:
        """The layer's own bias plus the fused SPON bias where this rank adds it: one bias for the product."""
        if not self.adds_bias:
            return bias
        return layer.spon_bias if bias is None else bias + layer.spon_bias

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
        # One threshold for the whole layer (always, unless `calibrate --allocation greedy` or `--projections`
        # naming part of a fused layer), on a GPU: threshold in traced code, where torch.compile fuses S(x) into
        # the op that produced x (RMSNorm, SiLU-and-mul) instead of a separate pass over x, and the op then sees
        # an already-sparse input. On the CPU the kernel compares each input with its threshold as it packs the
        # kept ones, so a pass before it only adds work (five small ops a layer when eager) and the same bits come
        # out either way.
        self.presparsify = len(set(layer.spon_threshold.tolist())) == 1 and layer.weight.device.type != "cpu"
        kernels.prepare(layer.weight.device, layer.input_size_per_partition)
        # On the CPU the C++ op itself (one kernel for every token count, nothing to choose in Python), built or
        # loaded now so that a failure stops start-up; elsewhere the custom op that picks a kernel per call.
        self.op = cpu.load_extension() if layer.weight.device.type == "cpu" else torch.ops.spon.sparse_linear

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        bias = self.with_spon_bias(layer, bias)
        x2 = x.reshape(-1, x.shape[-1])
        thresholds = layer.spon_threshold
        if self.presparsify:
            x2, thresholds = sparsify(x2, thresholds[0]), None
        y = self.op(x2, layer.weight.t(), thresholds, self.segment_ends, bias)
        return y.reshape(*x.shape[:-1], y.shape[-1])


class SponQuantizedLinearMethod(SponLinearMethod):
    """Quantized weights: threshold the input in PyTorch, then vLLM's quantized matmul on it.

    Segments whose thresholds differ need differently thresholded inputs: one inner matmul per distinct
    threshold (known once loaded), its output columns stitched by segment. Calibration's default allocation
    gives one threshold per input site, hence one matmul (unless `--projections` leaves part of a fused layer
    dense: its threshold 0 is a second one).
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
        return self.apply_inner(layer, x, bias)

    def apply_inner(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """vLLM's quantized matmul, once per distinct threshold, on the thresholded x, the fused bias (layer's
        + SPON's) passed to it as the layer's bias: in its epilogue it costs less than an add in traced code."""
        bias = self.with_spon_bias(layer, bias)
        outputs = [
            self.inner.apply(layer, sparsify(x, layer.spon_threshold[row]), bias)
            for row in self.threshold_rows
        ]
        if len(outputs) == 1:
            return outputs[0]
        return torch.cat([outputs[g][..., start:end] for g, start, end in self.pieces], dim=-1)


class SponFp8LinearMethod(SponQuantizedLinearMethod):
    """vLLM's fp8 weights (per-tensor or per-channel scale) on a GPU whose fp8 table (kernels/configs.py) sends
    this layer's shape to the sparse kernel at some decode token count.

    Those token counts take `sparse_linear_fp8` (only the kept fp8 rows read, 16-bit x, fp32 sums, the scale
    after accumulation); the others vLLM's own fp8 kernel. The choice is made inside
    `torch.ops.spon.fp8_linear` from the token count, like `spon.sparse_linear`. The thresholding and vLLM's
    activation quantization stay in traced code, where torch.compile fuses them into the op that produced x,
    and the op receives x both thresholded and quantized. (With both inside the opaque op, as separate eager
    kernels, SPON-fp8 measured 0.86x of vLLM's fp8 at batch 2-64 and 0.68x of its time to first token, H200.)
    Memory: the kernel reads rows of W^T (`[in, out]` row-major) while vLLM's cutlass / `_scaled_mm` need the
    other order (K contiguous for both operands of an fp8 tensor-core product), so such a layer keeps a
    second fp8 copy, one byte per weight: for Llama-3-8B with every linear on this path, about 7.0 GB.
    """

    def finalize(self, layer: torch.nn.Module) -> None:
        super().finalize(layer)
        self.rows: tuple[torch.Tensor, torch.Tensor] | None = fp8_weight_rows(layer)
        self.vllm_kernel = VllmFp8Kernel.of(self.inner)
        if self.rows is None or self.vllm_kernel is None or len(self.threshold_rows) > 1:
            scale = getattr(layer, "weight_scale", None)
            logger.warning("%s: not on the sparse fp8 kernel (fp8 layout %s %s, scale %s; %d distinct "
                           "thresholds; vLLM fp8 kernel %s): vLLM's fp8 matmul for every batch",
                           getattr(layer, "prefix", ""), layer.weight.dtype, list(layer.weight.shape),
                           None if scale is None else list(scale.shape), len(self.threshold_rows),
                           type(getattr(self.inner, "fp8_linear", None)).__name__)  # fmt: skip
            self.rows = None
            return
        self.name = getattr(layer, "prefix", "") or f"layer{id(layer)}"
        _FP8_LAYERS[self.name] = (self, layer)
        kernels.prepare(layer.weight.device, layer.input_size_per_partition)

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.rows is None:
            return self.apply_inner(layer, x, bias)
        x2 = sparsify(x.reshape(-1, x.shape[-1]), layer.spon_threshold[self.threshold_rows[0]])
        x_q, x_scale = self.vllm_kernel.quantize(layer, x2)
        y = torch.ops.spon.fp8_linear(x2, x_q, x_scale, self.with_spon_bias(layer, bias), self.name)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def decode_or_inner(self, layer: torch.nn.Module, x: torch.Tensor, x_q: torch.Tensor, x_scale: torch.Tensor,
                        bias: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
        """The body of `torch.ops.spon.fp8_linear` for the thresholded x `[T, in]` and its quantization."""
        weight_t, scale = self.rows

        def dense(x: torch.Tensor) -> torch.Tensor:  # vLLM's product of the same x, quantized in traced code
            return self.vllm_kernel.matmul(layer, x_q, x_scale, bias, x.dtype)

        return sparse_linear_fp8(x, weight_t, scale, layer.spon_threshold, self.segment_ends, bias, dense=dense)


class VllmFp8Kernel:
    """vLLM's fp8 linear kernel (`inner.fp8_linear`, a `ScaledMMLinearKernel` in vLLM 0.26) in its two halves,
    activation quantization (`quant_fp8`) and the scaled matmul (`apply_scaled_mm`), which its `apply_weights`
    runs back to back: the plugin traces the first and runs the second inside its op."""

    def __init__(self, kernel):
        self.kernel = kernel

    @classmethod
    def of(cls, inner: LinearMethodBase) -> "VllmFp8Kernel | None":
        """The kernel of vLLM's fp8 method `inner`, or None unless its `apply_weights` is the generic one that
        runs exactly these two halves (vLLM's CPU, Marlin and some other kernels replace it)."""
        kernel = getattr(inner, "fp8_linear", None)
        owner = next((c for c in type(kernel).__mro__ if "apply_weights" in vars(c)), None)
        generic = owner is not None and owner.__name__ == "FP8ScaledMMLinearKernel"
        halves = all(callable(getattr(kernel, half, None)) for half in ("quant_fp8", "apply_scaled_mm"))
        return cls(kernel) if generic and halves and len(getattr(kernel, "layer_param_names", ())) == 4 else None

    def _params(self, layer: torch.nn.Module) -> list[torch.Tensor | None]:
        return [getattr(layer, name, None) for name in self.kernel.layer_param_names]  # w, w_s, x_s, x_s_ub

    def quantize(self, layer: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, _, x_s, x_s_ub = self._params(layer)
        return self.kernel.quant_fp8(x, x_s, x_s_ub)

    def matmul(self, layer: torch.nn.Module, x_q: torch.Tensor, x_scale: torch.Tensor, bias: torch.Tensor | None,
               out_dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
        w, w_s, _, _ = self._params(layer)
        out_dtype = getattr(getattr(self.kernel, "config", None), "out_dtype", None) or out_dtype
        return self.kernel.apply_scaled_mm(A=x_q, B=w, out_dtype=out_dtype, As=x_scale, Bs=w_s, bias=bias,
                                           output_shape=[x_q.shape[0], w.shape[1]])  # fmt: skip


def fp8_weight_rows(layer: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(W^T `[in, out]` row-major float8, float32 scale `[1]` or `[out]`) from a layer vLLM's fp8 method has
    processed, or None where the layout is not one the kernel reads (block scales, Marlin packing, ...).

    vLLM keeps `layer.weight` as the `[in, out]` operand of `x @ weight` (a transposed view of its `[out, in]`
    tensor for cutlass) and `weight_scale` per tensor (`[1]`) or per output channel (`[out, 1]`)."""
    k, n = layer.input_size_per_partition, sum(layer.output_partition_sizes)
    weight, scale = layer.weight, getattr(layer, "weight_scale", None)
    if weight.dtype != FP8_DTYPE or tuple(weight.shape) != (k, n) or scale is None or scale.numel() not in (1, n):
        return None
    return weight.contiguous(), scale.detach().float().reshape(-1).contiguous()


_FP8_LAYERS: dict[str, tuple[SponFp8LinearMethod, torch.nn.Module]] = {}


def _fp8_linear(x: torch.Tensor, x_q: torch.Tensor, x_scale: torch.Tensor, bias: torch.Tensor | None,
                layer_name: str) -> torch.Tensor:  # fmt: skip
    method, layer = _FP8_LAYERS[layer_name]
    return method.decode_or_inner(layer, x, x_q, x_scale, bias)


def _fp8_linear_fake(x: torch.Tensor, x_q: torch.Tensor, x_scale: torch.Tensor, bias: torch.Tensor | None,
                     layer_name: str) -> torch.Tensor:  # fmt: skip
    method, _ = _FP8_LAYERS[layer_name]
    return x.new_empty((x.shape[0], method.segment_ends[-1]))


_LIBRARY = torch.library.Library("spon", "FRAGMENT")  # kept alive for as long as the op is used
if not hasattr(torch.ops.spon, "fp8_linear"):
    direct_register_custom_op("fp8_linear", _fp8_linear, fake_impl=_fp8_linear_fake, target_lib=_LIBRARY)


def _method_class(inner: LinearMethodBase, layer: LinearBase, device: torch.device) -> type[SponLinearMethod]:
    if isinstance(inner, UnquantizedLinearMethod):
        return SponDenseLinearMethod
    if fp8_kernel_selected(inner, layer, device):
        return SponFp8LinearMethod
    return SponQuantizedLinearMethod


def fp8_kernel_selected(inner: LinearMethodBase, layer: LinearBase, device: torch.device) -> bool:
    """Whether `layer` takes the sparse fp8 kernel at some decode token count: vLLM's fp8 method (neither
    block-quantized nor Marlin-packed, its kernel in the two halves `VllmFp8Kernel` calls) on a CUDA GPU whose
    measured fp8 table has a kernel for its shape."""
    if device.type != "cuda" or not kernels.has_triton_cuda() or not type(inner).__name__.startswith("Fp8"):
        return False
    if getattr(inner, "block_quant", False) or getattr(inner, "use_marlin", False) or VllmFp8Kernel.of(inner) is None:
        return False
    k, n = layer.input_size_per_partition, sum(layer.output_partition_sizes)
    return any(configs.select(k, n, b, layer.params_dtype, device, fp8=True) for b in configs.TOKEN_BUCKETS)


def _threshold_loader(layer: LinearBase):
    """The layer's weight loader for `spon_threshold`, except for one threshold of a module the checkpoint
    stores fused (Phi-3's `qkv_proj`): vLLM loads such a tensor without a shard id, and its own loader would
    fill only the first segment; the threshold covers every segment."""
    def load(param: Parameter, loaded_weight: torch.Tensor, shard_id: str | int | None = None) -> None:
        if shard_id is None and loaded_weight.dim() == 0 and param.numel() > 1:
            param.data.fill_(loaded_weight.item())
            return
        if shard_id is None:
            layer.weight_loader(param, loaded_weight)
        else:
            layer.weight_loader(param, loaded_weight, shard_id)

    return load


def install_spon_method(layer: LinearBase, has_bias: bool, device: torch.device) -> SponLinearMethod:
    """Wrap `layer.quant_method` and register the layer's SPON parameters (NaN until loaded)."""
    inner = layer.quant_method
    method = _method_class(inner, layer, device)(inner, layer, has_bias)
    threshold = Parameter(
        torch.full((len(method.segment_ends),), math.nan, dtype=torch.float32, device=device),
        requires_grad=False,
    )
    set_weight_attrs(threshold, {"needs_scalar_to_array": True, "weight_loader": _threshold_loader(layer)})
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
