"""The reference sparse model: modes, threshold fitting, SPON fusion (tiny random Llama, float32)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from vllm_spon.calibration.evaluate import measure_sparsity
from vllm_spon.calibration.sparse_model import SparseModel
from vllm_spon.calibration.thresholds import (
    MAX_MODULE_SPARSITY,
    SiteSamples,
    block_inputs,
    block_tail_output,
    dense_thresholds,
    fit_thresholds,
    greedy_allocation,
)
from vllm_spon.format.architectures import FAMILIES
from vllm_spon.kernels.reference import sparse_linear_reference, sparsify


@pytest.fixture()
def tiny(tiny_llama_dir):
    return SparseModel(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32))


@pytest.fixture()
def windows():
    return torch.randint(0, 128, (16, 64), generator=torch.Generator().manual_seed(1))


def test_sparsify_zeroes_exactly_the_small_entries():
    x = torch.tensor([[-0.375, 0.125, 0.25, -0.0625, 0.3125]])  # exact in every float dtype
    expected = torch.tensor([[-0.375, 0.0, 0.0, 0.0, 0.3125]])
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert torch.equal(sparsify(x.to(dtype), 0.25), expected.to(dtype))  # |x| == t is dropped too


def test_reference_linear_uses_one_threshold_per_segment():
    torch.manual_seed(0)
    x, w_t, bias = torch.randn(3, 8), torch.randn(8, 6), torch.randn(6)
    t = torch.tensor([0.0, 0.5, 10.0])
    y = sparse_linear_reference(x, w_t, t, [2, 4, 6], bias)
    torch.testing.assert_close(y[:, :2], x @ w_t[:, :2] + bias[:2])
    torch.testing.assert_close(y[:, 2:4], sparsify(x, 0.5) @ w_t[:, 2:4] + bias[2:4])
    torch.testing.assert_close(y[:, 4:], bias[4:].expand(3, 2))  # every input dropped


def test_zero_thresholds_are_dense(tiny, windows):
    with tiny.use("dense"):
        dense = tiny.logits(windows)
    with tiny.use("teal"):
        teal = tiny.logits(windows)
    torch.testing.assert_close(teal, dense, rtol=0, atol=0)


def test_site_samples_quantile_is_exact_on_known_values():
    samples = SiteSamples(FAMILIES[0], per_site=10_000, num_tokens=1)  # one token of 1000 features
    x = torch.arange(1, 1001, dtype=torch.float32)  # |x| = 1..1000
    samples.observe("model.layers.0.mlp.down_proj", x)
    t = samples.threshold("model.layers.0.mlp.down_proj", 0.5)
    kept = (x.abs() > t).float().mean().item()
    assert abs(kept - 0.5) < 0.03  # sampled with replacement: within a few percent


def test_site_samples_selection_equals_sorted_lookup():
    # Thresholds are selected (kthvalue) unless sort() ran; both must return the same k-th smallest sample.
    module = "model.layers.0.mlp.down_proj"
    samples = SiteSamples(FAMILIES[0], per_site=50_000, num_tokens=2, seed=3)
    for batch in torch.randn(2, 40_000, generator=torch.Generator().manual_seed(2)):
        samples.observe(module, batch)
        samples.end_batch()
    levels = [0.0, 1e-6, 0.1, 0.37, 0.5, 0.9, 0.99, 1.0]
    selected = [samples.threshold(module, s) for s in levels]
    samples.sort()
    assert [samples.threshold(module, s) for s in levels] == selected
    assert selected == sorted(selected) and selected[0] == 0.0 and selected[-1] > selected[-2]


def test_site_samples_draw_from_each_batch_in_proportion_to_its_tokens():
    # 9 windows in batches of 8 and 1: the short last batch must not weigh 8x per token in the quantiles.
    module = "model.layers.0.mlp.down_proj"
    samples = SiteSamples(FAMILIES[0], per_site=9_000, num_tokens=9 * 16)
    for windows in (8, 1):
        samples.observe(module, torch.randn(windows, 16, 64))
        samples.end_batch()
    assert [len(s) for s in samples.samples[FAMILIES[0].site(module)]] == [8_000, 1_000]


def test_refit_from_cached_dense_thresholds_is_identical(tiny, windows):
    # The pipeline computes the dense pass once and passes it to every refit: same bits as recomputing it.
    sparsity = dict.fromkeys(tiny.linears, 0.5)
    recomputed = fit_thresholds(tiny, windows, sparsity, refine_passes=1, mode_for_refine="spon", seed=4)
    cached = fit_thresholds(tiny, windows, sparsity, refine_passes=1, mode_for_refine="spon", seed=4,
                            dense=dense_thresholds(tiny, windows, sparsity, seed=4))
    assert cached == recomputed
    assert cached != dense_thresholds(tiny, windows, sparsity, seed=4)  # the refine pass did change them


@pytest.mark.parametrize("target", [0.25, 0.5, 0.7])
def test_sequential_thresholds_hit_target_sparsity(tiny, windows, target):
    fit_thresholds(tiny, windows, dict.fromkeys(tiny.linears, target), stats="sequential", refine_passes=2)
    weighted, per_module = measure_sparsity(tiny, windows, "teal")
    assert weighted == pytest.approx(target, abs=0.01)
    for module, sparsity in per_module.items():
        assert sparsity == pytest.approx(target, abs=0.02), module


def test_dense_statistics_hit_target_on_the_dense_inputs(tiny, windows):
    fit_thresholds(tiny, windows, dict.fromkeys(tiny.linears, 0.5), stats="dense")
    # Measured on dense activations, the first block's attention input is exactly on target.
    first = "model.layers.0.self_attn.q_proj"
    x = []
    with tiny.use("dense"), tiny.observe_inputs(lambda m, t: x.append(t) if m == first else None):
        tiny.hidden_states(windows)
    dropped = (torch.cat(x).abs() <= tiny.thresholds[first]).float().mean().item()
    assert dropped == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("per_input", [False, True])
def test_greedy_allocation_meets_block_budget(tiny, windows, per_input):
    allocation = greedy_allocation(tiny, windows, 0.5, step=0.1, per_input=per_input)
    for layer in range(2):
        modules = [m for m in allocation if f".layers.{layer}." in m]
        sizes = {m: tiny.linears[m].weight.numel() for m in modules}
        weighted = sum(allocation[m] * sizes[m] for m in modules) / sum(sizes.values())
        assert weighted == pytest.approx(0.5, abs=1e-6)
    assert len(set(round(s, 3) for s in allocation.values())) > 1  # not uniform
    by_input: dict[str, set[float]] = {}
    for m, s in allocation.items():
        by_input.setdefault(tiny.family.site(m), set()).add(s)
    # per input: q/k/v and gate/up share one sparsity (one threshold per fused vLLM layer); per projection not
    assert all(len(v) == 1 for v in by_input.values()) == per_input


@pytest.mark.parametrize("per_input", [False, True])
def test_greedy_allocation_searches_targets_above_nine_tenths(tiny, windows, per_input):
    """Raises stop at MAX_MODULE_SPARSITY, not at 0.9: a 0.95 target is searched like any other (it used to
    leave every module at 0.9, scaled up to a uniform 0.95), and a target beyond reach is refused."""
    allocation = greedy_allocation(tiny, windows, 0.95, per_input=per_input)
    sizes = {m: tiny.linears[m].weight.numel() for m in allocation}
    for layer in range(2):
        modules = [m for m in allocation if f".layers.{layer}." in m]
        weighted = sum(allocation[m] * sizes[m] for m in modules) / sum(sizes[m] for m in modules)
        assert weighted == pytest.approx(0.95, abs=1e-6)
    assert max(allocation.values()) <= MAX_MODULE_SPARSITY + 1e-12
    assert max(allocation.values()) > 0.951 and min(allocation.values()) < 0.949
    with pytest.raises(ValueError, match="uniform allocation above it"):
        greedy_allocation(tiny, windows, 0.995, per_input=per_input)


def test_greedy_shortcuts_put_back_what_the_module_had(tiny, windows):
    """The shortcuts patch a module's forward for the search only: one already set on the instance (an
    accelerate hook, say) is back afterwards, also with two searches on one block, one inside the other."""
    mlp = tiny.model.model.layers[0].mlp
    hooked = mlp.forward  # a bound method set on the instance, as a hook would be
    mlp.forward = hooked
    args, kwargs = block_inputs(tiny, windows[:2])[0]
    with block_tail_output(tiny, 0, args, kwargs, tail=4) as outer:
        with block_tail_output(tiny, 0, args, kwargs, tail=4) as inner:
            torch.testing.assert_close(inner(), outer())
        outer()
    assert mlp.__dict__["forward"] is hooked
    del mlp.forward
    with block_tail_output(tiny, 0, args, kwargs, tail=4):
        pass
    assert "forward" not in mlp.__dict__


@pytest.mark.parametrize("space", ["input", "output"])
def test_fused_bias_gives_the_unfused_logits(tiny, windows, space):
    fit_thresholds(tiny, windows, dict.fromkeys(tiny.linears, 0.5), stats="dense")
    torch.manual_seed(2)
    for vec in tiny.init_vectors(space):
        vec.data.normal_(0, 0.05)
    with torch.no_grad(), tiny.use("spon"):
        unfused = tiny.logits(windows)
    with torch.no_grad(), tiny.use("teal"):
        teal = tiny.logits(windows)
    tiny.fuse_vectors()
    assert not tiny.vectors and len(tiny.fused_biases) == len(tiny.linears)
    with torch.no_grad(), tiny.use("spon"):
        fused = tiny.logits(windows)
    torch.testing.assert_close(fused, unfused, rtol=1e-4, atol=1e-4)
    assert (fused - teal).abs().max() > 1e-2  # the biases do change the output
