"""The sparse linear kernels against the PyTorch reference, on the CPU: the Triton kernels under Triton's
interpreter (small shapes), the dispatch and config table. tests/test_kernels_cpu.py tests the CPU path;
tests/test_kernels_gpu.py runs the same kernels compiled, at Llama shapes, on a GPU."""

import re
import subprocess
import sys

import pytest
import torch

from tests.conftest import load_benchmark
from tests.interpreter import INTERPRETER, interpreted, rerun_in_interpreter
from vllm_spon.kernels import sparse_linear_reference, sparsify

if INTERPRETER:
    pytest.importorskip("triton")
    from vllm_spon.kernels import triton_sparse as ts
else:
    ts = None


def test_in_interpreter():
    rerun_in_interpreter(__file__)


DTYPES = [torch.bfloat16, torch.float16, torch.float32]
TOL = {torch.bfloat16: 1.5e-2, torch.float16: 2e-3, torch.float32: 1e-5}
CONFIGS = {  # the kept-rows kernel (looping, and several programs per block), the compacting kernel (FMA and
    # tensor-core forms), the GEMV, the tensor-core union kernel
    "rows": dict(kind="rows", bn=32, bm=16, groups=4, splits=1, num_warps=1),
    "rows-split": dict(kind="rows", bn=64, bm=8, groups=4, splits=2, num_warps=2),
    "compact": dict(kind="compact", bn=32, bm=8, groups=4, splits=1, num_warps=1),
    "compact-split": dict(kind="compact", bn=64, bm=16, groups=4, splits=2, num_warps=2, num_stages=3),
    "compact_mma": dict(kind="compact_mma", bn=32, bm=16, groups=2, splits=2, num_warps=4),
    # the two-level finish: 77 inputs in 5 blocks x 2 splits = 10 slots in groups of 4, 4 and 2; 5 in 2, 2, 1
    "compact-fanin": dict(kind="compact", bn=32, bm=8, groups=2, splits=2, num_warps=1, fanin=4),
    "gemv-fanin": dict(kind="gemv", bn=32, bm=16, fanin=2),
    "full_k": dict(kind="full_k", bn=32, bm=8, groups=4, num_stages=3, num_warps=2),
    "gemv": dict(kind="gemv", bn=32, bm=16),
    "dot": dict(kind="dot", bn=32, bm=16),
    "dot-split": dict(kind="dot", bn=32, bm=32, split_k=2),
}
ONE_TOKEN = ["rows", "rows-split", "compact", "compact-split", "compact_mma", "compact-fanin", "full_k", "gemv",
             "gemv-fanin"]
SEGMENTS = {"one": [48], "qkv": [64, 96, 128], "ragged": [40, 72, 100]}  # ragged: tiles cannot align


def _problem(tokens, k, ends, dtype, bias=True, quantiles=(0.3, 0.6, 0.8), integers=False):
    """Random x, W^T, bias and per-segment thresholds at the given quantiles of |x|. integers: small whole
    numbers, whose fp32 sums are exact in any order, so that outputs can be compared bit for bit."""
    if integers:
        x = torch.randint(-4, 5, (tokens, k)).to(dtype)
        w = torch.randint(-3, 4, (k, ends[-1])).to(dtype)
    else:
        x = torch.randn(tokens, k).to(dtype)
        w = (torch.randn(k, ends[-1]) / k**0.5).to(dtype)
    q = torch.tensor(quantiles[: len(ends)])
    thresholds = torch.quantile(x.float().abs().flatten(), q).float()
    b = (torch.randint(-8, 9, (ends[-1],)) if integers else torch.randn(ends[-1])).to(dtype) if bias else None
    return x, w, thresholds, b


def _rel_err(y, ref):
    assert not y.isnan().any(), "output not fully written"
    return float((y.float() - ref.float()).norm() / ref.float().norm())


def _launch(x, w, thresholds, ends, b, config):
    """The kernel into a NaN-poisoned output; config a name of CONFIGS or a Config."""
    if isinstance(config, str):
        config = ts.Config(**CONFIGS[config])
    out = torch.full((x.shape[0], w.shape[1]), float("nan"), dtype=x.dtype)
    return ts.launch(x, w, thresholds, ends, b, config, out=out)


@interpreted
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("segments", SEGMENTS)
@pytest.mark.parametrize("config", ONE_TOKEN)
def test_one_token_kernels_match_reference(dtype, segments, config):
    ends = SEGMENTS[segments]
    x, w, thr, b = _problem(1, 77, ends, dtype, bias=segments != "one")  # 77 inputs: a partial last block
    y = _launch(x, w, thr, ends, b, config)
    assert y.dtype == dtype
    assert _rel_err(y, sparse_linear_reference(x, w, thr, ends, b)) < TOL[dtype]


# (tokens, dtype, segments, bias, config): every token count, dtype and segment layout, mixed so that each
# appears with and without bias and with and without a K split, without taking the full product; the
# compacting kernels (the rows any token keeps) at 2-4 tokens, padded (3) and not.
MULTI_TOKEN_CASES = [
    (tokens, dtype, segments, (i + j) % 2 == 0, "dot" if (i + j) % 3 else "dot-split")
    for i, tokens in enumerate([2, 3, 5, 8])
    for j, (dtype, segments) in enumerate(zip(DTYPES, ["qkv", "ragged", "one"], strict=True))
] + [
    (tokens, dtype, segments, (i + j) % 2 == 1, config)
    for i, tokens in enumerate([2, 3, 4])
    for j, (dtype, segments, config) in enumerate(
        zip(DTYPES, ["qkv", "ragged", "one"], ["compact", "compact-split", "compact_mma"], strict=True)
    )
] + [(tokens, torch.float32, "qkv", True, "compact-fanin") for tokens in (2, 3)]


@interpreted
@pytest.mark.parametrize(("tokens", "dtype", "segments", "bias", "config"), MULTI_TOKEN_CASES, ids=str)
def test_multi_token_kernel_matches_reference(tokens, dtype, segments, bias, config):
    ends = SEGMENTS[segments]
    x, w, thr, b = _problem(tokens, 77, ends, dtype, bias=bias)
    y = _launch(x, w, thr, ends, b, config)
    assert y.dtype == dtype
    assert _rel_err(y, sparse_linear_reference(x, w, thr, ends, b)) < TOL[dtype]


@interpreted
@pytest.mark.parametrize(("config", "tokens"), [*((c, 1) for c in ONE_TOKEN), ("dot", 3), ("dot-split", 6),
                                               ("compact-split", 2), ("compact_mma", 3),
                                               ("compact-fanin", 3)])  # fmt: skip
def test_kernels_are_exact_on_whole_numbers(config, tokens):
    """Whole-number data: the fp32 sums are exact whatever the order of the atomics, so y must equal the
    reference bit for bit (a dropped row read, a kept row missed or counted twice would show)."""
    for dtype in DTYPES:
        ends = SEGMENTS["qkv"]
        x, w, thr, b = _problem(tokens, 100, ends, dtype, integers=True, quantiles=(0.2, 0.5, 0.9))
        assert torch.equal(_launch(x, w, thr, ends, b, config), sparse_linear_reference(x, w, thr, ends, b))


@interpreted
@pytest.mark.parametrize("config", ["rows", "compact", "compact_mma", "full_k", "gemv", "dot-split"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_threshold_zero_is_dense_and_all_dropped_is_bias(dtype, config):
    ends = SEGMENTS["qkv"]
    tokens = 1 if config in ONE_TOKEN else 3
    x, w, _, b = _problem(tokens, 64, ends, dtype)
    y = _launch(x, w, torch.zeros(3), ends, b, config)
    assert _rel_err(y, x.float() @ w.float() + b.float()) < TOL[dtype]
    y = _launch(x, w, torch.full((3,), 1e9), ends, b, config)
    assert torch.equal(y, b.expand_as(y))
    y = _launch(x, w, torch.tensor([0.0, 1e9, 0.0]), ends, None, config)  # one segment all dropped
    assert torch.equal(y[:, 64:96], torch.zeros_like(y[:, 64:96]))
    assert _rel_err(y[:, :64], x.float() @ w[:, :64].float()) < TOL[dtype]


@interpreted
@pytest.mark.parametrize(("config", "tokens"), [("rows", 1), ("compact", 1), ("compact_mma", 1), ("dot", 5)])
def test_presparsified_input_drops_exact_zeros(config, tokens):
    """Thresholds zero on a thresholded x (what `sparse_linear` does for thresholds=None): zeros dropped."""
    ends = SEGMENTS["qkv"]
    x, w, thr, b = _problem(tokens, 80, ends, torch.bfloat16, integers=True)
    xs = sparsify(x, thr[0])
    y = _launch(xs, w, torch.zeros(3), ends, b, config)
    assert torch.equal(y, sparse_linear_reference(x, w, thr[:1].expand(3), ends, b))


@interpreted
def test_launches_leave_counters_zero():
    """The arrival counters must be back to zero after every launch, or the next one finishes early."""
    ends = SEGMENTS["qkv"]
    for config, tokens in (("rows", 1), ("rows-split", 1), ("compact-split", 1), ("compact_mma", 1), ("full_k", 1),
                           ("gemv", 1), ("dot-split", 3), ("compact-split", 3), ("compact-fanin", 1),
                           ("compact-fanin", 3), ("gemv-fanin", 1)):
        for _ in range(2):  # fresh inputs each time: a stale partial sum would show
            x, w, thr, b = _problem(tokens, 80, ends, torch.float32)
            y = _launch(x, w, thr, ends, b, config)
            assert _rel_err(y, sparse_linear_reference(x, w, thr, ends, b)) < TOL[torch.float32]
            assert not ts._arrival_counters(x.device).any()


@interpreted
@pytest.mark.parametrize("config", ["dot", "dot-split", "compact-split", "compact_mma"])
def test_union_mask_reads_rows_any_token_keeps(config):
    """Tokens with disjoint surviving inputs: each token must see only its own, the rows read are the union."""
    k, ends = 64, [32]
    x = torch.zeros(4, k)
    for t in range(4):
        x[t, t * 16 : (t + 1) * 16] = torch.randn(16).abs() + 1.0
    x += torch.randn(4, k) * 0.01  # below the threshold, never zero
    w = torch.randn(k, 32)
    thr = torch.tensor([0.5])
    y = _launch(x, w, thr, ends, None, config)
    assert _rel_err(y, sparse_linear_reference(x, w, thr, ends)) < TOL[torch.float32]


@interpreted
def test_sparsify_segments_matches_sparsify():
    x = torch.randn(3, 50).bfloat16()
    thr = torch.tensor([0.2, 0.9])
    out = ts.sparsify_segments(x, thr)
    for i in range(2):
        assert torch.equal(out[i], sparsify(x, thr[i]))


@interpreted
def test_config_selection():
    from vllm_spon.kernels import configs

    assert configs.gpu_slug("NVIDIA H100 80GB HBM3") == "h100" and configs.gpu_slug("NVIDIA H200") == "h200"
    assert configs.table_for("NVIDIA H100 80GB HBM3") is not configs.table_for("NVIDIA H200")
    assert configs.table_for("NVIDIA B200") is configs.table_for("NVIDIA H200")  # no table: the default
    assert configs.select(4096, 4096, configs.TOKEN_BUCKETS[-1] + 1, torch.bfloat16) is None  # prefill: dense
    for tokens in (1, 3, 16):
        for k, n in ((4096, 14336), (576, 1536), (100000, 64)):  # tuned and unseen shapes
            config = configs.select(k, n, tokens, torch.bfloat16)
            if config is not None:
                assert config.bn >= 16 and config.bm >= 8 and 1 <= config.split_k <= max(1, k // config.bm)
                compacting = config.kind.startswith("compact") and tokens <= ts.MAX_COMPACT_TOKENS
                assert tokens == 1 or config.kind == "dot" or compacting
    bf16, fp32 = (configs.select(576, 1536, 1, d) for d in (torch.bfloat16, torch.float32))
    if bf16 is not None:
        assert fp32.bn == max(16, bf16.bn // 2)
        x, w, thr, b = _problem(1, 576, [1536], torch.float32)  # a borrowed config runs correctly
        y = _launch(x, w, thr, [1536], b, fp32)
        assert _rel_err(y, sparse_linear_reference(x, w, thr, [1536], b)) < TOL[torch.float32]


@interpreted
def test_a_table_written_by_the_tuning_script_replaces_the_packaged_one(tmp_path, monkeypatch):
    """`VLLM_SPON_KERNEL_TABLE` serves what `bench_kernels.py --tune` wrote, bf16 and fp8, on any GPU name;
    a file that is not such a table is refused naming the variable and the path."""
    from vllm_spon.kernels import configs

    bench = load_benchmark("bench_kernels")
    rows = ts.Config("rows", bn=256, bm=16, num_warps=2, groups=8)
    gemv = ts.Config("gemv", bn=1024, bm=32, num_warps=4)
    path = tmp_path / "tuned_b200.py"
    bench.write_table({(4096, 14336, 1): rows, (4096, 14336, 2): None}, path, "NVIDIA B200", {(4096, 14336, 1): gemv})
    monkeypatch.setenv(configs.TABLE_ENV, str(path))
    configs.table_for.cache_clear()
    try:
        assert configs.table_for("NVIDIA H200") == {(4096, 14336, 1): rows, (4096, 14336, 2): None}
        assert configs.select(4096, 14336, 1, torch.bfloat16) == rows
        assert configs.select(4096, 14336, 2, torch.bfloat16) is None
        assert configs.select(4096, 14336, 1, torch.bfloat16, fp8=True) == gemv
        no_table = tmp_path / "no_table.py"
        no_table.write_text("TUNED_FP8 = {}\n")
        for bad, why in ((tmp_path / "missing.py", "cannot be read"), (no_table, "defines no TUNED")):
            monkeypatch.setenv(configs.TABLE_ENV, str(bad))
            configs.table_for.cache_clear()
            with pytest.raises(RuntimeError, match=re.escape(f"{configs.TABLE_ENV}={bad}: ") + why):
                configs.select(4096, 14336, 1, torch.bfloat16)
    finally:
        monkeypatch.undo()
        configs.table_for.cache_clear()
    assert configs.select(4096, 14336, 1, torch.bfloat16) == configs.table_for("NVIDIA H200")[(4096, 14336, 1)]


@interpreted
def test_a_table_with_an_impossible_config_is_refused(tmp_path, monkeypatch):
    """A hand-edited table is refused when read, naming the file and the field, not at a kernel launch."""
    from vllm_spon.kernels import configs

    path = tmp_path / "tuned_h200.py"
    path.write_text("from vllm_spon.kernels.triton_sparse import Config\n"
                    "TUNED = {(4096, 14336, 1): Config('compact', bn=1000, bm=8, fanin=-2)}\n")  # fmt: skip
    monkeypatch.setenv(configs.TABLE_ENV, str(path))
    configs.table_for.cache_clear()
    try:
        with pytest.raises(RuntimeError, match=re.escape(f"{configs.TABLE_ENV}={path}: ") + r".*"
                           r"kernel config compact: bn=1000 \(a power of two\), fanin=-2"):  # fmt: skip
            configs.select(4096, 14336, 1, torch.bfloat16)
    finally:
        monkeypatch.undo()
        configs.table_for.cache_clear()


@interpreted
def test_vllm_batch_invariant_mode_sends_every_token_count_to_the_dense_path(monkeypatch):
    """Under VLLM_BATCH_INVARIANT=1 vLLM's matmuls give a row the same bits in any batch; a sparse kernel at
    decode sizes would round differently from them, so no token count may take one."""
    from vllm_spon import kernels
    from vllm_spon.kernels import configs

    assert configs.select(4096, 14336, 1, torch.bfloat16) is not None  # the table's one-token kernel
    monkeypatch.setenv("VLLM_BATCH_INVARIANT", "1")
    kernels.vllm_batch_invariant.cache_clear()
    try:
        assert all(configs.select(4096, 14336, t, torch.bfloat16) is None for t in (1, 2, 16, 512))
        assert configs.select(14336, 4096, 1, torch.bfloat16, fp8=True) is None
    finally:
        monkeypatch.undo()
        kernels.vllm_batch_invariant.cache_clear()
    assert configs.select(4096, 14336, 1, torch.bfloat16) is not None


def test_import_without_triton_or_cuda_init():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, vllm_spon.kernels as k\n"
        "assert not k.HAS_TRITON and not k.has_triton_cuda()\n"
        "x = torch.randn(1, 8); w = torch.randn(8, 4)\n"
        "y = k.sparse_linear(x, w, torch.tensor([0.5]), [4])\n"
        "assert torch.allclose(y, k.sparse_linear_reference(x, w, torch.tensor([0.5]), [4]), atol=1e-6)\n"
        "assert not torch.cuda.is_initialized()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
