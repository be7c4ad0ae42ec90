"""The CPU sparse linear (kernels/cpu.py, the C++ kernel) against `sparse_linear_reference`, and the property
that makes vLLM's greedy answers independent of the batch: a token's output row is bitwise the same alone and
inside any batch, whatever the other tokens are (tests/test_batch_invariance.py checks it through `vllm serve`).
"""

import pytest
import torch

from vllm_spon.kernels import cpu, sparse_linear, sparse_linear_reference, sparsify

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}
SEGMENTS = {"one": [100], "qkv": [64, 96, 160], "ragged": [17, 58, 131]}  # ragged: no 16-column alignment


def _problem(tokens: int, k: int, ends: list[int], dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=g).to(dtype)
    w = (torch.randn(k, ends[-1], generator=g) / k**0.5).to(dtype)
    thresholds = torch.quantile(x.float().abs().flatten(), torch.tensor([0.3, 0.6, 0.8][: len(ends)])).float()
    b = torch.randn(ends[-1], generator=g).to(dtype)
    return x, w, thresholds, b


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens", [1, 2, 5, 7, 13, 40])
@pytest.mark.parametrize("segments", SEGMENTS)
def test_matches_reference(dtype, tokens, segments):
    ends = SEGMENTS[segments]
    x, w, thr, b = _problem(tokens, 77, ends, dtype)
    for bias in (b, None):
        y = sparse_linear(x, w, thr, ends, bias)
        assert y.dtype == dtype and y.shape == (tokens, ends[-1])
        assert _rel_err(y, sparse_linear_reference(x, w, thr, ends, bias)) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens", [1, 9])
def test_presparsified_input(dtype, tokens):
    """thresholds=None: the caller thresholded x already; zeros are the dropped inputs."""
    ends = SEGMENTS["qkv"]
    x, w, thr, b = _problem(tokens, 96, ends, dtype)
    t = thr[:1].expand(len(ends)).contiguous()
    y = sparse_linear(sparsify(x, t[0]), w, None, ends, b)
    assert torch.equal(y, sparse_linear(x, w, t, ends, b))  # same kept inputs, same sums
    assert _rel_err(y, sparse_linear_reference(x, w, t, ends, b)) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens", [1, 8])
def test_all_dropped_is_the_bias_and_all_kept_is_dense(dtype, tokens):
    ends = SEGMENTS["ragged"]
    x, w, _, b = _problem(tokens, 50, ends, dtype)
    never = torch.full((3,), 1e9)
    assert torch.equal(sparse_linear(x, w, never, ends, b), b.float().expand(tokens, -1).to(dtype))
    assert torch.equal(sparse_linear(x, w, never, ends, None), torch.zeros(tokens, ends[-1], dtype=dtype))
    kept = sparse_linear(x, w, torch.zeros(3), ends, b)
    assert _rel_err(kept, x.float() @ w.float() + b.float()) < TOL[dtype]


def test_nan_input_poisons_its_token_like_the_reference():
    x, w, thr, b = _problem(3, 40, [48], torch.float32)
    x[1, 7] = float("nan")
    y = sparse_linear(x, w, thr, [48], b)
    assert y[1].isnan().all() and not y[[0, 2]].isnan().any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("presparsified", [False, True])
def test_a_token_gets_the_same_bits_alone_and_in_any_batch(dtype, presparsified):
    """Row for row bitwise equality between each token alone and the same token among 2..64 other tokens
    (decode and prefill batches take different loops through the kernel; the sums must not change)."""
    ends = SEGMENTS["qkv"] if not presparsified else SEGMENTS["ragged"]
    x, w, thr, b = _problem(64, 576, ends, dtype, seed=1)
    if presparsified:
        x, thr = sparsify(x, thr[0]), None
    others = _problem(64, 576, ends, dtype, seed=2)[0]
    alone = torch.cat([sparse_linear(x[i : i + 1], w, thr, ends, b) for i in range(len(x))])
    g = torch.Generator().manual_seed(3)
    for size in (2, 3, 4, 5, 6, 7, 8, 13, 16, 31, 64):
        for i in torch.randint(0, len(x), (4,), generator=g).tolist():
            batch = others[torch.randperm(64, generator=g)[:size]].clone()
            at = int(torch.randint(0, size, (1,), generator=g))
            batch[at] = x[i]
            assert torch.equal(sparse_linear(batch, w, thr, ends, b)[at], alone[i]), (size, i, at)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens", [1, 11])
def test_portable_loop_gives_the_same_bits(dtype, tokens):
    """The loop CPUs without AVX-512 run computes the same FMA chains as the vectorised kernel (which the op
    refuses to run without AVX-512: there this test has nothing to compare)."""
    ends = SEGMENTS["ragged"]
    x, w, thr, b = _problem(tokens, 70, ends, dtype)
    try:
        vectorized = cpu.sparse_linear(x, w, thr, ends, b, vectorized=True)
    except RuntimeError as e:
        if "needs AVX-512" not in str(e):
            raise
        pytest.skip("no AVX-512 (F, BW) here: only the portable loop runs")
    assert torch.equal(cpu.sparse_linear(x, w, thr, ends, b, vectorized=False), vectorized)
