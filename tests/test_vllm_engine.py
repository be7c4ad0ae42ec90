"""vLLM's CPU build with `load_format="spon"` against the calibration module's reference sparse model
(fp32, the example model). One engine at a time: each is shut down before the next starts."""

import shutil

import numpy as np
import pytest
import torch

from tests.reference_cases import DENSE_PROMPTS, dense_greedy, random_biases, token_logprobs, tokenize
from tests.vllm_probes import (
    engine,
    expected_state,
    generate_tokens,
    prompt_logprobs,
    spon_state,
    worker_additional_config,
)
from vllm_spon.kernels import configs
from vllm_spon.loader import COMPILE_KEY, DISPATCH_KEY, checkpoint_identity

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def _probe_workers():
    """The probes passed to `apply_model` / `collective_rpc` are functions (in tests/vllm_probes.py, which vLLM's
    spawned processes import: they inherit sys.path): vLLM pickles functions only if allowed."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        yield


@pytest.fixture(scope="class")
def llm(spon_reference_case):
    with engine(spon_reference_case.checkpoint, load_format="spon") as llm:
        yield llm


class TestSponCheckpoint:
    def test_greedy_tokens_equal_reference(self, llm, spon_reference_case):
        assert generate_tokens(llm, spon_reference_case.prompts) == spon_reference_case.tokens

    def test_logprobs_equal_reference_and_differ_from_dense(self, llm, spon_reference_case):
        """Teacher-forced log-probabilities of every position: the reference's to rounding, not the dense model's."""
        got = prompt_logprobs(llm, spon_reference_case.sequences)
        for ours, spon, dense in zip(got, spon_reference_case.logprobs, spon_reference_case.dense_logprobs,
                                     strict=True):
            np.testing.assert_allclose(ours, spon, atol=1e-4)
            assert np.abs(np.subtract(dense, spon)).mean() > 0.05

    def test_every_layer_holds_the_checkpoint_tensors(self, llm, spon_reference_case):
        [state] = llm.apply_model(spon_state)
        assert {s["method"] for s in state.values()} == {"SponDenseLinearMethod(UnquantizedLinearMethod)"}
        expected = expected_state(spon_reference_case.checkpoint, tp_rank=0, tp_size=1)
        assert {name: {k: v for k, v in s.items() if k != "method"} for name, s in state.items()} == expected

    def test_checkpoint_identity_is_in_the_compile_cache_key(self, llm, spon_reference_case):
        [config] = llm.collective_rpc(worker_additional_config)
        assert config == {COMPILE_KEY: checkpoint_identity(spon_reference_case.checkpoint),
                          DISPATCH_KEY: configs.dispatch_identity(torch.device("cpu"))}  # fmt: skip


def test_zero_thresholds_without_biases_give_dense_tokens(zero_spon_overlay, example_model_dir):
    """An overlay checkpoint (spon/ plus links to the base files) whose thresholds are 0 and has no biases."""
    with engine(str(zero_spon_overlay), load_format="spon") as llm:
        tokens = generate_tokens(llm, tokenize(example_model_dir, DENSE_PROMPTS))
        [state] = llm.apply_model(spon_state)
    assert len(state) == 120 and all(max(s["thresholds"]) == 0 and s["bias"] is None for s in state.values())
    assert tokens == dense_greedy(example_model_dir, DENSE_PROMPTS)


def test_fp8_per_channel_serves_with_sparsity_in_effect(spon_reference_case, example_model_dir):
    """Online fp8 weights (bf16 activations) under the SPON method: the SPON checkpoint changes fp8's output,
    the way it changes the fp32 model's (the change correlates with the reference's SPON-minus-dense).

    Needs vLLM's CPU fp8 kernel (AMX-FP8). Without it vLLM falls back to `torch._scaled_mm`'s CPU loop: 45 ms
    for one token through one 576x1536 layer here, 0.8 s for 16, so this test ran past 25 minutes."""
    from vllm import _custom_ops as ops

    if not (torch.cpu._is_amx_tile_supported() and ops.cpu_has_amx_fp8()):
        pytest.skip("this CPU has no AMX-FP8: vLLM's CPU fp8 matmul falls back to a reference loop (minutes a token)")
    case = spon_reference_case
    fp8 = {"quantization": "fp8_per_channel", "dtype": "bfloat16"}
    with engine(case.checkpoint, load_format="spon", **fp8) as llm:
        [state] = llm.apply_model(spon_state)
        assert len(generate_tokens(llm, case.prompts)[0]) > 0
        spon = prompt_logprobs(llm, case.sequences)
    with engine(str(example_model_dir), **fp8) as llm:
        dense = prompt_logprobs(llm, case.sequences)
    assert {s["method"] for s in state.values()} == {"SponQuantizedLinearMethod(Fp8PtpcOnlineLinearMethod)"}
    fp8_change = np.concatenate([np.subtract(s, d) for s, d in zip(spon, dense, strict=True)])
    fp32_change = np.concatenate([np.subtract(s, d) for s, d in zip(case.logprobs, case.dense_logprobs,
                                                                    strict=True)])
    assert np.abs(fp8_change).mean() > 0.1
    assert np.corrcoef(fp8_change, fp32_change)[0, 1] > 0.5


def test_fp8_per_channel_on_a_tiny_model_serves_with_sparsity_in_effect(tiny_model, tmp_path):
    """The test above on a 2-layer model, where vLLM's CPU fp8 fallback loop is fast enough without AMX-FP8:
    every layer takes SPON's method around vLLM's fp8 one, with the checkpoint's thresholds, and thresholds and
    biases change fp8's output the way they change the fp32 reference's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from vllm_spon.calibration.handmade import write_handmade
    from vllm_spon.calibration.sparse_model import SparseModel, load_hf_model

    # `tiny_model`'s tokenizer on a model with heads of 64 (vLLM's CPU attention refuses the fixture's 16)
    model_dir = tmp_path / "model"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
                     ).save_pretrained(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model / name, model_dir / name)
    reference = SparseModel(load_hf_model(model_dir))
    thresholds = dict.fromkeys(reference.linears, 0.5)
    reference.set_thresholds(thresholds)
    reference.fused_biases = random_biases(reference, 0.3)
    checkpoint = write_handmade(model_dir, tmp_path / "ckpt", thresholds, reference.fused_biases)
    sequences = torch.randint(0, 256, (4, 48), generator=torch.Generator().manual_seed(0)).tolist()
    fp8 = {"quantization": "fp8_per_channel", "dtype": "bfloat16", "max_model_len": 256}
    with engine(str(checkpoint), load_format="spon", **fp8) as llm:
        [state] = llm.apply_model(spon_state)
        spon = prompt_logprobs(llm, sequences)
    with engine(str(model_dir), **fp8) as llm:
        dense = prompt_logprobs(llm, sequences)
    assert {s["method"] for s in state.values()} == {"SponQuantizedLinearMethod(Fp8PtpcOnlineLinearMethod)"}
    assert all(t == 0.5 for s in state.values() for t in s["thresholds"])
    fp32 = {}
    for mode in ("dense", "spon"):
        with reference.use(mode):
            fp32[mode] = np.concatenate([token_logprobs(reference, s) for s in sequences])
    fp8_change = np.concatenate([np.subtract(s, d) for s, d in zip(spon, dense, strict=True)])
    assert np.abs(fp8_change).mean() > 0.1  # measured 0.24
    assert np.corrcoef(fp8_change, fp32["spon"] - fp32["dense"])[0, 1] > 0.9  # measured 0.999
