"""The compiled Triton path of `sparse_linear` on a CUDA GPU, at Llama-3-8B shapes (skipped without one):
correctness against the float32 reference for every dispatch branch and every kernel, bit-exact results on
whole-number data, no host synchronisation, CUDA-graph capture and torch.compile through a custom op; the
one-token kernels on float8 weights (per-tensor and per-channel scales) the same way."""

import pytest
import torch

from vllm_spon.kernels import has_triton_cuda, sparse_linear, sparse_linear_reference, sparsify

pytestmark = pytest.mark.skipif(not has_triton_cuda(), reason="needs a CUDA GPU and Triton")

TOL = {torch.bfloat16: 1.5e-2, torch.float16: 2e-3, torch.float32: 1e-4}
SHAPES = {"qkv": (4096, [4096, 5120, 6144]), "down": (14336, [4096]), "gate_up": (4096, [14336, 28672])}
KERNELS = {  # one config of each kernel, whatever the table picks
    "rows": dict(kind="rows", bn=512, bm=16, groups=8, splits=1, num_warps=2),
    "rows-split": dict(kind="rows", bn=1024, bm=16, groups=16, splits=2, num_warps=4),
    "compact": dict(kind="compact", bn=1024, bm=16, groups=16, splits=2, num_warps=4, num_stages=3),
    # two-level finishes: 32 / 112 slots (K 4096 / 14336) in groups of 8; 128 / 448 in groups of 16
    "compact-fanin": dict(kind="compact", bn=1024, bm=8, groups=32, splits=2, num_warps=4, num_stages=3, fanin=8),
    "gemv-fanin": dict(kind="gemv", bn=1024, bm=32, num_warps=4, fanin=16),
    "compact_mma": dict(kind="compact_mma", bn=256, bm=64, groups=8, splits=2, num_warps=4),
    "full_k": dict(kind="full_k", bn=64, bm=64, groups=16, num_stages=3, num_warps=4),
    "gemv": dict(kind="gemv", bn=1024, bm=32, num_warps=4),
    "dot": dict(kind="dot", bn=256, bm=32, split_k=4, num_warps=4, num_stages=3),
}


def _problem(tokens, k, ends, dtype, bias=True, integers=False):
    if integers:  # whole numbers: fp32 sums exact in any order, so outputs compare bit for bit
        x = torch.randint(-4, 5, (tokens, k), device="cuda").to(dtype)
        w = torch.randint(-3, 4, (k, ends[-1]), device="cuda").to(dtype)
    else:
        x = torch.randn(tokens, k, device="cuda").to(dtype)
        w = (torch.randn(k, ends[-1], device="cuda") / k**0.5).to(dtype)
    q = torch.tensor([0.55, 0.35, 0.7][: len(ends)], device="cuda")
    thresholds = torch.quantile(x.float().abs().flatten(), q).float()
    b = (torch.randn(ends[-1], device="cuda") * 0.1).to(dtype) if bias else None
    if bias and integers:
        b = b.mul(80).round()
    return x, w, thresholds, b


def _rel_err(y, ref):
    return float((y.float() - ref.float()).norm() / ref.float().norm())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tokens", [1, 2, 3, 8, 16, 17, 64])
def test_matches_reference(dtype, shape, tokens):
    k, ends = SHAPES[shape]
    x, w, thr, b = _problem(tokens, k, ends, dtype, bias=tokens % 2 == 1)
    ref = sparse_linear_reference(x.float(), w.float(), thr, ends, b)
    y = sparse_linear(x, w, thr, ends, b)
    assert y.dtype == dtype and y.shape == (tokens, ends[-1]) and not y.isnan().any()
    assert _rel_err(y, ref) < TOL[dtype]
    t = thr[:1].expand(len(ends)).contiguous()  # presparsified input (thresholds None): one threshold
    y = sparse_linear(sparsify(x, t[0]), w, None, ends, b)
    assert _rel_err(y, sparse_linear_reference(x.float(), w.float(), t, ends, b)) < TOL[dtype]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tokens", [1, 2, 5, 8])
def test_every_kernel_exact_on_whole_numbers(kernel, shape, tokens):
    from vllm_spon.kernels import triton_sparse as ts

    several = ts.MAX_COMPACT_TOKENS if KERNELS[kernel]["kind"].startswith("compact") else 1
    if KERNELS[kernel]["kind"] != "dot" and tokens > several:
        pytest.skip(f"a kernel for at most {several} tokens")
    k, ends = SHAPES[shape]
    x, w, thr, b = _problem(tokens, k, ends, torch.bfloat16, integers=True)
    out = torch.full((tokens, ends[-1]), float("nan"), dtype=x.dtype, device="cuda")
    y = ts.launch(x, w, thr, ends, b, ts.Config(**KERNELS[kernel]), out=out)
    assert torch.equal(y, sparse_linear_reference(x, w, thr, ends, b))


@pytest.mark.parametrize("tokens", [1, 4])
def test_edge_thresholds(tokens):
    k, ends = SHAPES["qkv"]
    x, w, _, b = _problem(tokens, k, ends, torch.bfloat16)
    y = sparse_linear(x, w, torch.zeros(3, device="cuda"), ends, b)
    assert _rel_err(y, x.float() @ w.float() + b.float()) < TOL[torch.bfloat16]
    y = sparse_linear(x, w, torch.full((3,), 1e9, device="cuda"), ends, b)
    assert torch.equal(y, b.expand_as(y))


@pytest.mark.parametrize("tokens", [1, 2, 4, 64])
def test_no_host_sync_and_cuda_graph(tokens):
    k, ends = SHAPES["qkv"]
    x, w, thr, b = _problem(tokens, k, ends, torch.bfloat16)
    sparse_linear(x, w, thr, ends, b)  # compile and allocate outside the checks
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sparse_linear(x, w, thr, ends, b)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = sparse_linear(x, w, thr, ends, b)
    for _ in range(3):  # fresh inputs and thresholds through the captured buffers
        x2, _, thr2, _ = _problem(tokens, k, ends, torch.bfloat16)
        x.copy_(x2)
        thr.copy_(thr2)
        y.fill_(float("nan"))
        graph.replay()
        ref = sparse_linear_reference(x.float(), w.float(), thr, ends, b)
        assert _rel_err(y, ref) < TOL[torch.bfloat16]


def test_torch_compile_custom_op():
    @torch.library.custom_op("spon_kernels_test::sparse_linear", mutates_args=())
    def op(x: torch.Tensor, w: torch.Tensor, thr: torch.Tensor, ends: list[int], b: torch.Tensor) -> torch.Tensor:
        return sparse_linear(x, w, thr, ends, b)

    @op.register_fake
    def _(x, w, thr, ends, b):
        return x.new_empty((x.shape[0], w.shape[1]))

    k, ends = SHAPES["qkv"]
    fn = torch.compile(lambda x, w, thr, b: torch.relu(op(x, w, thr, ends, b)), fullgraph=True, dynamic=True)
    for tokens in (1, 2, 4, 64):
        x, w, thr, b = _problem(tokens, k, ends, torch.bfloat16)
        ref = torch.relu(sparse_linear_reference(x.float(), w.float(), thr, ends, b))
        assert _rel_err(fn(x, w, thr, b), ref) < TOL[torch.bfloat16]


FP8_KERNELS = ["rows", "rows-split", "compact", "compact-fanin", "compact_mma", "full_k", "gemv", "gemv-fanin"]


def _fp8_problem(k, ends, per_channel, bias=True, integers=False):
    from tests.test_kernels_fp8 import quantize

    x, w, thr, b = _problem(1, k, ends, torch.bfloat16, bias=bias, integers=integers)
    if integers:  # whole-number fp8 weights and power-of-two scales: exact sums
        n = ends[-1]
        scale = 2.0 ** torch.randint(-3, 1, (n,), device="cuda").float() if per_channel else torch.tensor(
            [0.5], device="cuda"
        )
        return x.half(), w.to(torch.float8_e4m3fn), scale, thr, None if b is None else b.half()
    w8, scale = quantize(w, per_channel)
    return x, w8, scale, thr, b


@pytest.mark.parametrize("per_channel", [False, True], ids=["tensor", "channel"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kernel", FP8_KERNELS)
def test_fp8_kernels_match_reference_and_are_exact(kernel, shape, per_channel):
    from vllm_spon.kernels import triton_sparse as ts
    from vllm_spon.kernels.reference import sparse_linear_fp8_reference

    k, ends = SHAPES[shape]
    config = ts.Config(**KERNELS[kernel])
    for integers in (False, True):
        x, w8, scale, thr, b = _fp8_problem(k, ends, per_channel, bias=shape != "down", integers=integers)
        out = torch.full((1, ends[-1]), float("nan"), dtype=x.dtype, device="cuda")
        y = ts.launch(x, w8, thr, ends, b, config, out=out, weight_scale=scale)
        ref = sparse_linear_fp8_reference(x, w8, scale, thr, ends, b)
        if integers:
            assert torch.equal(y, ref)
        else:
            assert _rel_err(y, sparse_linear_fp8_reference(x.float(), w8, scale, thr, ends, b)) < TOL[x.dtype]


def test_fp8_kernel_no_host_sync_and_cuda_graph():
    from vllm_spon.kernels import triton_sparse as ts
    from vllm_spon.kernels.reference import sparse_linear_fp8_reference

    k, ends = SHAPES["qkv"]
    x, w8, scale, thr, b = _fp8_problem(k, ends, per_channel=True)
    config = ts.Config(**KERNELS["compact_mma"])
    ts.launch(x, w8, thr, ends, b, config, weight_scale=scale)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ts.launch(x, w8, thr, ends, b, config, weight_scale=scale)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = ts.launch(x, w8, thr, ends, b, config, weight_scale=scale)
    for _ in range(3):
        x2, _, _, thr2, _ = _fp8_problem(k, ends, per_channel=True)
        x.copy_(x2)
        thr.copy_(thr2)
        y.fill_(float("nan"))
        graph.replay()
        assert _rel_err(y, sparse_linear_fp8_reference(x.float(), w8, scale, thr, ends, b)) < TOL[torch.bfloat16]


def test_fp8_entry_without_table_entry_takes_dense():
    from vllm_spon.kernels import configs
    from vllm_spon.kernels.fp8 import sparse_linear_fp8

    k, ends = SHAPES["gate_up"]
    x, w8, scale, thr, b = _fp8_problem(k, ends, per_channel=True)
    x = x.expand(2, -1).contiguous()  # fp8 tables hold one-token entries only: two tokens have none
    assert configs.select(k, ends[-1], 2, x.dtype, x.device, fp8=True) is None
    marker = torch.zeros(2, ends[-1], dtype=x.dtype, device="cuda")
    assert sparse_linear_fp8(x, w8, scale, thr, ends, b, dense=lambda _: marker) is marker


@pytest.mark.parametrize("kernel", [k for k in KERNELS if k != "dot"])
def test_one_token_kernels_exact_on_repeated_launches(kernel):
    """Race check: 25 launches per weight dtype and shape on fresh whole-number data (exact sums, so any
    difference from the reference is a wrong value, not rounding); every launch must match bit for bit."""
    from vllm_spon.kernels import triton_sparse as ts
    from vllm_spon.kernels.reference import sparse_linear_fp8_reference

    config = ts.Config(**KERNELS[kernel])
    wrong = {}
    for shape in ("gate_up", "qkv"):
        k, ends = SHAPES[shape]
        for fp8 in (False, True):
            bad = 0
            for _ in range(25):
                if fp8:
                    x, w, scale, thr, b = _fp8_problem(k, ends, per_channel=True, integers=True)
                    ref = sparse_linear_fp8_reference(x, w, scale, thr, ends, b)
                else:
                    x, w, thr, b = _problem(1, k, ends, torch.bfloat16, integers=True)
                    scale, ref = None, sparse_linear_reference(x, w, thr, ends, b)
                out = torch.full((1, ends[-1]), float("nan"), dtype=x.dtype, device="cuda")
                y = ts.launch(x, w, thr, ends, b, config, out=out, weight_scale=scale)
                bad += not torch.equal(y, ref)
            if bad:
                wrong[shape, "fp8" if fp8 else "bf16"] = bad
    assert not wrong, f"launches differing from the reference (of 25): {wrong}"


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_one_token_kernels_give_the_same_bits_on_every_run(fp8):
    """Random data, where the order of the fp32 additions shows in the last bit: 20 launches of every
    one-token kernel and of the dispatch must agree bit for bit (float atomics, adding in arrival order,
    did not: a prompt sent alone twice could get different greedy answers)."""
    from tests.test_kernels_fp8 import quantize
    from vllm_spon.kernels import triton_sparse as ts

    differing = {}
    for shape in ("gate_up", "qkv", "down"):
        k, ends = SHAPES[shape]
        x, w, thr, b = _problem(1, k, ends, torch.bfloat16)
        w, scale = quantize(w, per_channel=True) if fp8 else (w, None)
        for name in [n for n, cfg in KERNELS.items() if cfg["kind"] != "dot"] + ([] if fp8 else ["dispatch"]):
            config = ts.Config(**KERNELS[name]) if name in KERNELS else None
            outs = [sparse_linear(x, w, thr, ends, b) if config is None else
                    ts.launch(x, w, thr, ends, b, config, weight_scale=scale) for _ in range(21)]  # fmt: skip
            bad = sum(not torch.equal(y, outs[0]) for y in outs[1:])
            if bad:
                differing[shape, name] = bad
    assert not differing, f"launches differing from the first (of 20): {differing}"
