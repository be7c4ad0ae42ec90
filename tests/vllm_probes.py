"""Talking to a vLLM engine in the tests: generation and log-probabilities as token ids, and probes run inside
its workers (`LLM.apply_model` / `collective_rpc` pickle them by reference: they must live in an importable
module, this one) with what each rank should hold, worked out from the checkpoint and the family's table."""

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from tests.reference_cases import MAX_TOKENS
from vllm_spon import server
from vllm_spon.format.checkpoint import load_checkpoint, module_out_features
from vllm_spon.format.identity import read_hf_config

# The tests' engine settings: eager (fast start), a short context, seeded.
ENGINE_KWARGS = {"enforce_eager": True, "max_model_len": 512, "seed": 0}


@contextmanager
def engine(model: str, **kwargs) -> Iterator:
    """`server.engine` with the tests' settings."""
    with server.engine(model, **{**ENGINE_KWARGS, **kwargs}) as llm:
        yield llm

def generate_tokens(llm, prompts: list[list[int]], max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def prompt_logprobs(llm, sequences: list[list[int]]) -> list[list[float]]:
    """vLLM's log p of each token of each sequence after the first (teacher forcing, one prefill each)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=s) for s in sequences], params, use_tqdm=False)
    return [
        [o.prompt_logprobs[j][s[j]].logprob for j in range(1, len(s))] for s, o in zip(sequences, outputs, strict=True)
    ]


def spon_state(model) -> dict[str, dict]:
    """In a worker (`LLM.apply_model`): each SPON layer's method, thresholds and fused bias on this rank."""
    from vllm_spon.linear_method import SponLinearMethod

    state = {}
    for name, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        if isinstance(method, SponLinearMethod):
            bias = getattr(module, "spon_bias", None)
            state[name] = {
                "method": f"{type(method).__name__}({type(method.inner).__name__})",
                "thresholds": module.spon_threshold.tolist(),
                "bias": None if bias is None else bias.float().tolist(),
                "adds_bias": method.adds_bias,
            }
    return state


def worker_additional_config(worker) -> dict:
    """In a worker (`LLM.collective_rpc`): the config that vLLM's compile-cache key hashes."""
    return dict(worker.vllm_config.additional_config)


def expected_state(checkpoint_dir: str, tp_rank: int, tp_size: int) -> dict[str, dict]:
    """What each vLLM layer of rank `tp_rank` should hold, computed from the checkpoint by hand: per
    segment the module's threshold (0 for a member the checkpoint does not sparsify, `--projections q_proj`);
    the bias rows of this rank (column parallel: its slice of each fused module, zeros for an unsparsified
    member; row parallel: all of it, added on rank 0 only), None where no member has a bias (TEAL)."""
    checkpoint = load_checkpoint(checkpoint_dir)
    family = checkpoint.family
    every_module = module_out_features(read_hf_config(checkpoint_dir), family.projections, checkpoint_dir)
    state = {}
    for module in checkpoint.modules:
        index, projection = family.parse(module)
        layer = f"{module.rsplit('.', 1)[0]}.{projection.vllm_layer}"
        if layer in state:
            continue  # one entry per vLLM layer, made at its first sparsified member
        modules = [family.module(index, p) for p in family.vllm_layers()[projection.vllm_layer]]
        column = projection.parallel == "column"
        has_bias = any(m in checkpoint.biases for m in modules)
        biases = [checkpoint.biases.get(m, torch.zeros(every_module[m])) for m in modules]
        if column:
            # A module stored fused is split by vLLM into segments before sharding: not worked out here.
            assert projection.segments == 1 or tp_size == 1, "fused-on-disk modules: TP 1 only"
            biases = [b.chunk(tp_size)[tp_rank] for b in biases]
        state[layer] = {
            "thresholds": [float(checkpoint.config.thresholds.get(m, 0.0)) for m in modules
                           for _ in range(projection.segments)],
            "bias": torch.cat(biases).tolist() if has_bias else None,
            "adds_bias": has_bias and (column or tp_rank == 0),
        }
    return dict(sorted(state.items()))
