"""The sparse kernels on float8 weights (W8A16) against the fp8 reference, under Triton's CPU interpreter
(small and odd shapes), and the fp8 dispatch. Triton 3.9's interpreter loads float8_e4m3fn tensors and
converts them exactly, so the kernels read real fp8 weights here. tests/test_kernels_gpu.py runs them
compiled at Llama shapes."""


import pytest
import torch

from tests.interpreter import INTERPRETER, interpreted, rerun_in_interpreter
from tests.test_kernels import SEGMENTS, TOL, _problem, _rel_err
from vllm_spon.kernels.fp8 import FP8_DTYPE, sparse_linear_fp8
from vllm_spon.kernels.reference import sparse_linear_fp8_reference, sparsify

if INTERPRETER:
    pytest.importorskip("triton")
    from vllm_spon.kernels import triton_sparse as ts
else:
    ts = None

FP8_MAX = 448.0
CONFIGS = {
    "rows": dict(kind="rows", bn=32, bm=16, groups=4, splits=1, num_warps=1),
    "rows-split": dict(kind="rows", bn=64, bm=8, groups=4, splits=2, num_warps=2),
    "compact": dict(kind="compact", bn=32, bm=8, groups=4, splits=1, num_warps=1, num_stages=3),
    "compact_mma": dict(kind="compact_mma", bn=64, bm=16, groups=2, splits=2, num_warps=4),
    "full_k": dict(kind="full_k", bn=32, bm=16, groups=2, num_stages=2, num_warps=1),
    "gemv": dict(kind="gemv", bn=32, bm=16),
    "compact-fanin": dict(kind="compact", bn=32, bm=8, groups=2, splits=2, num_warps=1, fanin=4),  # 10 slots
}


def test_in_interpreter():
    rerun_in_interpreter(__file__)


def quantize(w: torch.Tensor, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """W^T `[in, out]` to float8_e4m3fn with vLLM's symmetric amax scale, per output channel or per tensor."""
    amax = w.float().abs().amax(dim=0) if per_channel else w.float().abs().amax().reshape(1)
    scale = (amax / FP8_MAX).clamp_min(1e-12)
    return (w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def _fp8_problem(k, ends, dtype, per_channel, bias=True, **kw):
    x, w, thr, b = _problem(1, k, ends, dtype, bias=bias, **kw)
    w8, scale = quantize(w, per_channel)
    return x, w8, scale, thr, b


def _launch(x, w8, scale, thr, ends, b, config):
    out = torch.full((1, w8.shape[1]), float("nan"), dtype=x.dtype)
    return ts.launch(x, w8, thr, ends, b, ts.Config(**CONFIGS[config]), out=out, weight_scale=scale)


# (config, segments, per-channel, dtype, bias): every config with every segment layout, mixed so that each
# scale kind, activation dtype and bias setting appears with each config.
CASES = [
    (config, segments, (i + j) % 2 == 0, [torch.bfloat16, torch.float16][j % 2], (i + 2 * j) % 3 != 0)
    for i, config in enumerate(CONFIGS)
    for j, segments in enumerate(SEGMENTS)
]


@interpreted
@pytest.mark.parametrize(("config", "segments", "per_channel", "dtype", "bias"), CASES, ids=str)
def test_fp8_kernels_match_reference(config, segments, per_channel, dtype, bias):
    ends = SEGMENTS[segments]
    x, w8, scale, thr, b = _fp8_problem(77, ends, dtype, per_channel, bias=bias)  # 77: a partial last block
    y = _launch(x, w8, scale, thr, ends, b, config)
    assert y.dtype == dtype
    assert _rel_err(y, sparse_linear_fp8_reference(x, w8, scale, thr, ends, b)) < TOL[dtype]


@interpreted
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("per_channel", [False, True], ids=["tensor", "channel"])
def test_fp8_kernels_exact_on_whole_numbers(config, per_channel):
    """Whole-number x and fp8 weights, power-of-two scales: every fp32 sum is exact, so y equals the reference
    bit for bit (a dropped row read, a kept row missed, a scale applied twice or to the bias would show).
    float16 and scales of at most 1: |y| < 2048 is exact in float16 too (the interpreter's bfloat16 cast
    truncates where the reference rounds)."""
    ends = SEGMENTS["ragged"]
    x, w, thr, b = _problem(1, 100, ends, torch.float16, integers=True, quantiles=(0.2, 0.5, 0.9))
    w8 = w.to(FP8_DTYPE)
    scale = 2.0 ** torch.randint(-3, 1, (ends[-1],)).float() if per_channel else torch.tensor([0.25])
    y = _launch(x, w8, scale, thr, ends, b, config)
    assert torch.equal(y, sparse_linear_fp8_reference(x, w8, scale, thr, ends, b))


@interpreted
@pytest.mark.parametrize("config", ["rows", "compact", "compact_mma", "full_k", "gemv"])
def test_fp8_all_kept_all_dropped(config):
    ends = SEGMENTS["qkv"]
    x, w8, scale, _, b = _fp8_problem(64, ends, torch.bfloat16, per_channel=True)
    dense = x.float() @ (w8.float() * scale)
    y = _launch(x, w8, scale, torch.zeros(3), ends, b, config)
    assert _rel_err(y, dense + b.float()) < TOL[torch.bfloat16]
    y = _launch(x, w8, scale, torch.full((3,), 1e9), ends, b, config)
    assert torch.equal(y, b.expand_as(y))
    y = _launch(x, w8, scale, torch.tensor([0.0, 1e9, 0.0]), ends, None, config)  # one segment all dropped
    assert torch.equal(y[:, 64:96], torch.zeros_like(y[:, 64:96]))
    assert _rel_err(y[:, :64], dense[:, :64]) < TOL[torch.bfloat16]


@interpreted
@pytest.mark.parametrize("magnitude", [1e-30, 1e-4, 3e5, 1e30])
def test_fp8_tensor_core_form_takes_bf16_inputs_of_any_magnitude(magnitude):
    """The tensor-core form multiplies fp8 weights in float16: bf16 inputs are brought into float16's range
    by a power of two per block (undone on the sums), so magnitudes far outside it still match."""
    ends = SEGMENTS["qkv"]
    x, w8, scale, thr, _ = _fp8_problem(100, ends, torch.bfloat16, per_channel=True)
    x, thr = (x.float() * magnitude).bfloat16(), thr * magnitude
    y = _launch(x, w8, scale, thr, ends, None, "compact_mma")
    ref = sparse_linear_fp8_reference(x, w8, scale, thr, ends).double()
    assert not y.isinf().any() and float((y.double() - ref).norm() / ref.norm()) < TOL[torch.bfloat16]


@interpreted
def test_fp8_launches_leave_counters_zero():
    ends = SEGMENTS["qkv"]
    for config in CONFIGS:
        for per_channel in (False, True):
            x, w8, scale, thr, b = _fp8_problem(80, ends, torch.float16, per_channel)
            y = _launch(x, w8, scale, thr, ends, b, config)
            assert _rel_err(y, sparse_linear_fp8_reference(x, w8, scale, thr, ends, b)) < TOL[torch.float16]
            assert not ts._arrival_counters(x.device).any()


@interpreted
def test_scaled_weights_refuse_the_multi_token_kernel():
    x, w8, scale, thr, b = _fp8_problem(32, [32], torch.bfloat16, per_channel=False)
    with pytest.raises(ValueError, match="one-token"):
        ts.launch(x.expand(2, -1), w8, thr[:1], [32], b, ts.Config("dot", bn=32, bm=16), weight_scale=scale)
    with pytest.raises(ValueError, match="one-token"):
        ts.launch(x, w8, thr[:1], [32], b, ts.Config("dot", bn=32, bm=16), weight_scale=scale)


@interpreted
def test_fp8_dispatch_is_dense_without_a_measured_entry(monkeypatch):
    """No fp8 entry: every bucket is dense (never a bf16 config borrowed); with entries: the table's own, the
    nearest measured shape for unseen ones, and the bf16 table untouched."""
    from vllm_spon.kernels import configs

    rows = ts.Config("rows", bn=2048, bm=16, num_warps=4, groups=16, splits=2)
    monkeypatch.setattr(configs, "table_for", lambda name, fp8=False: {(4096, 14336, 1): rows} if fp8 else {})
    assert configs.select(4096, 14336, 1, torch.bfloat16, fp8=True) == rows
    assert configs.select(4096, 28672, 1, torch.bfloat16, fp8=True) == rows  # nearest measured shape
    assert configs.select(4096, 14336, 2, torch.bfloat16, fp8=True) is None  # no 2-token entry: dense
    assert configs.select(4096, 14336, 1, torch.bfloat16) == configs._default(4096, 14336, 1)


@interpreted
def test_committed_fp8_tables():
    """An fp8 table holds one-token kernels only; a GPU without one keeps every fp8 layer dense."""
    from vllm_spon.kernels import configs

    for name in ("NVIDIA H200", "NVIDIA H100 80GB HBM3"):
        table = configs.table_for(name, fp8=True)
        assert all(c is None or (b == 1 and c.kind in ("rows", "compact", "compact_mma", "full_k", "gemv"))
                   for (_, _, b), c in table.items())


def test_a_gpu_without_an_fp8_table_keeps_every_fp8_layer_dense(monkeypatch):
    from vllm_spon.kernels import configs

    monkeypatch.setattr(configs, "table_for", lambda name, fp8=False: {})
    for tokens in (1, 2, 16):
        assert configs.select(4096, 14336, tokens, torch.bfloat16, fp8=True) is None


def test_cpu_entry_takes_dense_or_reference():
    x, w8, scale, thr, b = _fp8_problem(48, SEGMENTS["qkv"], torch.bfloat16, per_channel=True)
    ends = SEGMENTS["qkv"]
    ref = sparse_linear_fp8_reference(x, w8, scale, thr, ends, b)
    assert torch.equal(sparse_linear_fp8(x, w8, scale, thr, ends, b), ref)
    assert torch.equal(sparse_linear_fp8(x, w8, scale, thr, ends, b, dense=lambda xx: xx[:, :1]), x[:, :1])


def test_fp8_reference_dequantizes_per_channel_and_per_tensor():
    x = torch.randn(2, 16).bfloat16()
    w = torch.randn(16, 8)
    thr = torch.tensor([0.5])
    for per_channel in (False, True):
        w8, scale = quantize(w, per_channel)
        y = sparse_linear_fp8_reference(x, w8, scale, thr, [8])
        want = ((x.float() * (x.float().abs() > 0.5)) @ (w8.float() * scale)).bfloat16()
        assert torch.equal(y, want)
        assert _rel_err(y, (x.float() * (x.float().abs() > 0.5)) @ w) < 0.1  # fp8 rounding only
    with pytest.raises(ValueError, match="per output channel"):
        sparse_linear_fp8_reference(x, w8, torch.ones(3), thr, [8])


class _Fp8Layer(torch.nn.Module):
    """What vLLM's fp8 method leaves on a fused layer: `weight` the `[in, out]` transposed view of its
    `[out, in]` float8 tensor, `weight_scale` `[out, 1]` (per channel) or `[1]`; plus the SPON parameters."""

    def __init__(self, sizes, thresholds, per_channel, k=48):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        w8, scale = quantize(torch.randn(k, sum(sizes), generator=gen), per_channel)
        self.weight = torch.nn.Parameter(w8.t().contiguous().t(), requires_grad=False)
        self.weight_scale = torch.nn.Parameter(scale.reshape(-1, 1) if per_channel else scale, requires_grad=False)
        self.spon_threshold = torch.nn.Parameter(torch.tensor(thresholds), requires_grad=False)
        self.spon_bias = torch.nn.Parameter(torch.randn(sum(sizes), generator=gen), requires_grad=False)
        self.input_size_per_partition, self.output_partition_sizes = k, sizes
        self.params_dtype, self.prefix = torch.float32, f"model.layers.0.fake{id(self)}"


def _vllm_kernel(dense_product=False):
    """vLLM's own generic fp8 kernel class (its `apply_weights`: `quant_fp8`, then `apply_scaled_mm`), with the
    scaled product, the part a GPU build runs in cutlass, in PyTorch; `dense_product`: a subclass that
    overrides `apply_weights`, as vLLM's CPU and Marlin kernels do."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.kernels.linear.scaled_mm.ScaledMMLinearKernel import (
        FP8ScaledMMLinearKernel,
        FP8ScaledMMLinearLayerConfig,
    )
    from vllm.model_executor.layers.quantization.utils.quant_utils import kFp8DynamicTokenSym, kFp8StaticTensorSym

    class TorchScaledMM(FP8ScaledMMLinearKernel):
        @classmethod
        def is_supported(cls, compute_capability=None):
            return True, None

        @classmethod
        def can_implement(cls, c):
            return True, None

        def apply_scaled_mm(self, *, A, B, out_dtype, As, Bs, bias, output_shape):
            y = (A.float() * As) @ (B.float() * Bs.reshape(1, -1))
            return (y if bias is None else y + bias).to(out_dtype).view(output_shape)

    class OwnProduct(TorchScaledMM):
        def apply_weights(self, layer, x, bias=None):
            return x @ layer.weight.float()

    config = FP8ScaledMMLinearLayerConfig(weight_quant_key=kFp8StaticTensorSym,
                                          activation_quant_key=kFp8DynamicTokenSym, weight_shape=(0, 0),
                                          input_dtype=torch.float32, out_dtype=None)  # fmt: skip
    with set_current_vllm_config(VllmConfig()):
        kind = OwnProduct if dense_product else TorchScaledMM
        return kind(config, ["weight", "weight_scale", "input_scale", "input_scale_ub"])


class Fp8FakeLinearMethod:
    """Stands for vLLM's fp8 method: `apply` is its kernel's `apply_weights`."""

    block_quant = use_marlin = False

    def __init__(self, dense_product=False):
        self.fp8_linear = _vllm_kernel(dense_product)

    def apply(self, layer, x, bias=None):
        return self.fp8_linear.apply_weights(layer, x, bias)


@pytest.mark.parametrize("per_channel", [False, True], ids=["tensor", "channel"])
def test_plugin_reads_vllm_fp8_layout(per_channel):
    from vllm_spon.linear_method import fp8_weight_rows

    layer = _Fp8Layer([24, 8], [0.5, 0.5], per_channel)
    weight_t, scale = fp8_weight_rows(layer)
    assert weight_t.is_contiguous() and torch.equal(weight_t.float(), layer.weight.float())
    assert scale.shape == ((32,) if per_channel else (1,)) and scale.dtype == torch.float32
    layer.weight_scale = torch.nn.Parameter(torch.ones(2, 3), requires_grad=False)  # block scales
    assert fp8_weight_rows(layer) is None
    layer.weight = torch.nn.Parameter(torch.zeros(48, 32, dtype=torch.int32), requires_grad=False)  # packed
    assert fp8_weight_rows(layer) is None


def test_plugin_picks_fp8_method_only_where_the_table_has_a_kernel(monkeypatch):
    from vllm_spon import linear_method as lm

    layer = _Fp8Layer([24, 8], [0.5, 0.5], True)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert lm._method_class(Fp8FakeLinearMethod(), layer, cpu) is lm.SponQuantizedLinearMethod
    monkeypatch.setattr(lm.kernels, "has_triton_cuda", lambda: True)
    monkeypatch.setattr(lm.configs, "select", lambda k, n, tokens, *a, fp8=False: None)  # no fp8 entry
    assert lm._method_class(Fp8FakeLinearMethod(), layer, cuda) is lm.SponQuantizedLinearMethod
    rows = lm.configs.Config("rows", bn=32, bm=16)
    monkeypatch.setattr(lm.configs, "select", lambda k, n, tokens, *a, fp8=False: rows if tokens == 1 else None)
    assert lm._method_class(Fp8FakeLinearMethod(), layer, cuda) is lm.SponFp8LinearMethod
    block = Fp8FakeLinearMethod()
    block.block_quant = True
    assert lm._method_class(block, layer, cuda) is lm.SponQuantizedLinearMethod
    awq = type("AWQLinearMethod", (), {})()
    assert lm._method_class(awq, layer, cuda) is lm.SponQuantizedLinearMethod
    own_product = Fp8FakeLinearMethod(dense_product=True)  # `apply_weights` is not the two halves: not split
    assert lm._method_class(own_product, layer, cuda) is lm.SponQuantizedLinearMethod
    no_kernel = Fp8FakeLinearMethod()
    no_kernel.fp8_linear = object()
    assert lm._method_class(no_kernel, layer, cuda) is lm.SponQuantizedLinearMethod


def test_fp8_method_kernel_and_inner_paths(monkeypatch):
    """Through `torch.ops.spon.fp8_linear`: on the CPU every token count takes vLLM's kernel (its second half,
    on the input thresholded and quantized by its first half in traced code) and gives what vLLM's method
    gives on the thresholded input; with the sparse kernel standing in, it receives the method's row-major
    fp8 copy, the scale, the thresholds, the segments and the fused bias (layer bias + SPON bias)."""
    from vllm_spon import linear_method as lm

    layer = _Fp8Layer([24, 8, 16], [0.5, 0.5, 0.5], per_channel=True)
    dense = lm.SponQuantizedLinearMethod(Fp8FakeLinearMethod(), layer, has_bias=True)
    method = lm.SponFp8LinearMethod(Fp8FakeLinearMethod(), layer, has_bias=True)
    dense.finalize(layer)
    method.finalize(layer)
    x = torch.randn(3, 48, generator=torch.Generator().manual_seed(1))
    layer_bias = torch.randn(48)
    torch.testing.assert_close(method.apply(layer, x, layer_bias), dense.apply(layer, x, layer_bias))

    def kernel(x, weight_t, scale, thresholds, ends, bias, dense):
        assert weight_t.is_contiguous() and weight_t.dtype == FP8_DTYPE
        return sparse_linear_fp8_reference(x, weight_t, scale, thresholds, list(ends), bias)

    monkeypatch.setattr(lm, "sparse_linear_fp8", kernel)
    scale = layer.weight_scale.reshape(-1)
    want = sparse_linear_fp8_reference(x, layer.weight, scale, layer.spon_threshold, [24, 32, 48],
                                       layer_bias + layer.spon_bias)  # fmt: skip
    torch.testing.assert_close(method.apply(layer, x, layer_bias), want, atol=1e-5, rtol=1e-5)
    y = torch.compile(lambda x: method.apply(layer, x, layer_bias), fullgraph=True, backend="eager")(x)
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)  # the op traces through its fake


def test_fp8_layer_with_segment_thresholds_keeps_vllm_matmul():
    """Distinct thresholds per segment would need one quantized input each: such a layer stays on vLLM's fp8
    matmul per threshold, as `SponQuantizedLinearMethod` computes it."""
    from vllm_spon import linear_method as lm

    layer = _Fp8Layer([24, 8, 16], [0.5, 0.2, 0.9], per_channel=True)
    dense = lm.SponQuantizedLinearMethod(Fp8FakeLinearMethod(), layer, has_bias=True)
    method = lm.SponFp8LinearMethod(Fp8FakeLinearMethod(), layer, has_bias=True)
    dense.finalize(layer)
    method.finalize(layer)
    assert method.rows is None
    x = torch.randn(1, 48, generator=torch.Generator().manual_seed(1))
    inner = Fp8FakeLinearMethod()  # vLLM's fp8 product, once per segment on that segment's thresholded x
    want = torch.cat([inner.apply(layer, sparsify(x, t), layer.spon_bias)[:, start:end]
                      for t, start, end in ((0.5, 0, 24), (0.2, 24, 32), (0.9, 32, 48))], dim=-1)
    assert torch.equal(method.apply(layer, x), want)
    assert not torch.equal(want, inner.apply(layer, sparsify(x, 0.5), layer.spon_bias))  # the thresholds matter
