"""End-to-end decode benchmark on a GPU: dense vLLM against `--load-format spon`, same engine settings.

The model has Llama-3-8B's shapes and random weights (seeded); its thresholds are fitted by the calibration
module on the activations those weights produce, so each checkpoint runs at its target sparsity. Every
engine uses vLLM's defaults (torch.compile and CUDA graphs on) and runs in its own process.

    python benchmarks/bench_gpu_e2e.py make --out /tmp/e2e [--sparsities 0.4,0.5,0.6]
    python benchmarks/bench_gpu_e2e.py engine /tmp/e2e/base --load-format auto --json /tmp/e2e/dense.json
    python benchmarks/bench_gpu_e2e.py engine /tmp/e2e/spon50 --load-format spon --json /tmp/e2e/spon50.json
    python benchmarks/bench_gpu_e2e.py engine /tmp/e2e/base --quantization fp8 --json /tmp/e2e/fp8.json
    python benchmarks/bench_gpu_e2e.py table /tmp/e2e/dense.json /tmp/e2e/spon*.json
    python benchmarks/bench_gpu_e2e.py profile /tmp/e2e/spon50 --load-format spon --quantization fp8 --json P.json
    python benchmarks/bench_gpu_e2e.py profile-diff A.json B.json   # where two profiles' steps differ (no GPU)
    python benchmarks/bench_gpu_e2e.py check-tokens --out /tmp/e2e-small [--tp 2]   # greedy tokens vs reference
    python benchmarks/bench_gpu_e2e.py check-fp8 --out /tmp/e2e-fp8 --json OUT.json  # the same under fp8
    python benchmarks/bench_gpu_e2e.py batch-divergence --out /tmp/e2e-div --json OUT.json  # answers vs batch

On the offline GPU host (no pip): `eval "$(bash scripts/gpu_host_env.sh)"` after the gpu-kit install makes
this checkout importable and registers the plugin. Measured results: benchmarks/results/.

Decode tokens/s at batch B: B requests of 32 prompt tokens, timed once with 1 and once with 1 + N new
tokens (ignore_eos); decode rate = B * N / (difference). Time to first token: 2048-token prompts, one at a
time, max_tokens=1. Medians of repeats. Ratios are SPON over dense, measured in the same run.
"""

import argparse
import gc
import json
import os
import re
import statistics
import time
from pathlib import Path

import torch

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)
BATCHES = (1, 2, 4, 8, 64)
DECODE_TOKENS = 128
PREFILL_TOKENS = 2048
SMALL_LLAMA = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024)  # fmt: skip
FP8_AGREEMENT_SLACK = 0.1  # check-fp8: agreement with the reference may fall this much with the kernel


def write_tokenizer(out: Path) -> None:
    """A small byte-level BPE tokenizer (vLLM needs one; its vocabulary fits inside the model's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 100, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(out)


def make_models(out: Path, shape: dict, sparsities: list[float], dtype: torch.dtype, seed: int,
                with_biases: bool = True, per_projection: dict[str, float] | None = None) -> None:
    """A random-weight Llama at `out/base` and overlay SPON checkpoints `out/spon{NN}` fitted to it; with
    `per_projection` ({"q_proj": 0.59, ...}) also `out/spon-perproj`, each projection at its own sparsity, as
    `calibrate --allocation greedy` leaves them (fused q/k/v and gate/up then carry one threshold per segment)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from vllm_spon.calibration.handmade import write_handmade
    from vllm_spon.calibration.sparse_model import SparseModel
    from vllm_spon.calibration.thresholds import fit_thresholds

    torch.manual_seed(seed)
    config = LlamaConfig(**shape, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    torch.set_default_dtype(dtype)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    base = out / "base"
    t0 = time.time()
    model.save_pretrained(base)
    write_tokenizer(base)
    print(f"wrote {base} in {time.time() - t0:.0f} s", flush=True)
    sparse = SparseModel(model)
    windows = torch.randint(2, 512, (16, 256), generator=torch.Generator().manual_seed(seed))
    allocations = {f"spon{round(s * 100)}": dict.fromkeys(sparse.linears, s) for s in sparsities}
    if per_projection:
        allocations["spon-perproj"] = {m: per_projection[m.rsplit(".", 1)[-1]] for m in sparse.linears}
    sizes = {m: lin.weight.numel() for m, lin in sparse.linears.items()}
    for name, allocation in allocations.items():
        thresholds = fit_thresholds(sparse, windows, allocation, refine_passes=1, batch_size=4)
        biases = ({m: torch.randn(lin.out_features) * 1e-3 for m, lin in sparse.linears.items()}
                  if with_biases else None)
        target = sum(allocation[m] * sizes[m] for m in sizes) / sum(sizes.values())
        write_handmade(base, out / name, thresholds, biases, layout="overlay", target_sparsity=round(target, 3))
        print(f"checkpoint {name}: fitted to {target:.3f} (weight-weighted)", flush=True)


def timed_generate(llm, prompts: list[list[int]], max_tokens: int) -> float:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    if torch.cuda.is_available():  # also timed on the CPU build (bench_cpu_decode.py)
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return time.perf_counter() - t0


def decode_rate(llm, prompts: list[list[int]], new_tokens: int, repeats: int) -> float:
    """Decode tokens/s of one batch: the time of 1 + N new tokens minus that of 1 (prefill and first token
    cancel), median of `repeats`, after a warm-up at this batch size."""
    timed_generate(llm, prompts, 8)
    rates = []
    for _ in range(repeats):
        prefill = timed_generate(llm, prompts, 1)
        full = timed_generate(llm, prompts, 1 + new_tokens)
        rates.append(len(prompts) * new_tokens / (full - prefill))
    return statistics.median(rates)


def run_engine(model: str, load_format: str, tensor_parallel_size: int = 1, quantization: str | None = None,
               repeats: int = 3, engine_args: dict | None = None, batches: tuple[int, ...] = BATCHES,
               decode_tokens: int = DECODE_TOKENS, prefill_tokens: int = PREFILL_TOKENS) -> dict:
    """Decode tokens/s per batch size and time to first token of one engine; `engine_args` override the GPU
    settings (the CPU build's test runs this with its own dtype and memory fraction)."""
    from vllm import LLM

    t0 = time.perf_counter()
    settings = dict(dtype="bfloat16", max_model_len=4096, max_num_seqs=64, gpu_memory_utilization=0.85, seed=0)
    llm = LLM(model, load_format=load_format, tensor_parallel_size=tensor_parallel_size, quantization=quantization,
              **{**settings, **(engine_args or {})})
    result: dict = {"model": model, "load_format": load_format, "tensor_parallel_size": tensor_parallel_size,
                    "quantization": quantization, "startup_s": time.perf_counter() - t0, "decode_tok_s": {},
                    "ttft_ms": None}
    gen = torch.Generator().manual_seed(0)
    for batch in batches:
        prompts = [torch.randint(2, 512, (32,), generator=gen).tolist() for _ in range(batch)]
        result["decode_tok_s"][batch] = decode_rate(llm, prompts, decode_tokens, repeats)
        print(f"{load_format} batch {batch}: {result['decode_tok_s'][batch]:.1f} tok/s", flush=True)

    def long_prompt() -> list[list[int]]:  # a fresh prompt every time: no prefix-cache hits
        return [torch.randint(2, 512, (prefill_tokens,), generator=gen).tolist()]

    timed_generate(llm, long_prompt(), 1)
    result["ttft_ms"] = statistics.median(timed_generate(llm, long_prompt(), 1) * 1e3 for _ in range(5))
    print(f"{load_format} TTFT ({prefill_tokens} tokens): {result['ttft_ms']:.1f} ms", flush=True)
    return result


def profile_decode(model: str, load_format: str, quantization: str | None, batch: int = 8, new_tokens: int = 64,
                   top: int = 25) -> dict:  # fmt: skip
    """GPU time per kernel name over `new_tokens` decode steps of `batch` requests, the engine in this process
    (CUDA graphs replayed as vLLM runs them; CUPTI sees the kernels inside): where one engine's step goes, to
    set beside another's. Decode only: the profile of a 1-token generate is subtracted."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the model runs in this process, under the profiler
    from torch.profiler import ProfilerActivity, profile
    from vllm import LLM

    llm = LLM(model, load_format=load_format, quantization=quantization, dtype="bfloat16", max_model_len=4096,
              max_num_seqs=64, gpu_memory_utilization=0.85, seed=0)  # fmt: skip
    prompts = [torch.randint(2, 512, (32,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(batch)]
    timed_generate(llm, prompts, 8)
    totals = []
    for tokens in (1, 1 + new_tokens):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            timed_generate(llm, prompts, tokens)
        totals.append({e.key: (e.device_time_total, e.count) for e in prof.key_averages()})
    per_step = {k: ((us - totals[0].get(k, (0, 0))[0]) / new_tokens, (n - totals[0].get(k, (0, 0))[1]) / new_tokens)
                for k, (us, n) in totals[1].items()}  # fmt: skip
    rows = sorted(per_step.items(), key=lambda kv: -kv[1][0])
    kernels = [{"name": k[:160], "us_per_step": us, "launches_per_step": n} for k, (us, n) in rows]
    result = {"model": model, "load_format": load_format, "quantization": quantization, "batch": batch,
              "step_us": sum(us for us, _ in per_step.values()), "kernels": kernels}  # fmt: skip
    print(f"profile {load_format} {quantization}: {result['step_us']:.0f} us of GPU time a step at batch {batch}")
    for r in result["kernels"][:top]:
        print(f"  {r['us_per_step']:8.1f} us {r['launches_per_step']:6.1f}x  {r['name'][:110]}")
    return result


def kernel_family(name: str) -> str:
    """A kernel's name without what differs between two engines' builds of the same kernel: a CUDA kernel's
    template arguments past the first (`cutlass::device_kernel<vllm::cutlass_3x_gemm_sm90_fp8`, whatever its
    epilogue) and the fused ops in an Inductor kernel's name (its kind and index stay: `triton_red_..._3`)."""
    if name.startswith("triton_"):
        parts = name.split("_")
        return f"{parts[0]}_{parts[1]}_..._{parts[-1]}"
    head, _, rest = name.partition("<")
    return (head + "<" + re.split(r"[<,(>]", rest)[0] if rest else head.split("(")[0]).strip()


def profile_diff(a: dict, b: dict, top: int = 15) -> str:
    """Two `profile` results side by side, per kernel family, largest differences first."""
    def families(result: dict) -> dict[str, tuple[float, float]]:
        out: dict[str, tuple[float, float]] = {}
        for k in result["kernels"]:
            family = kernel_family(k["name"])
            us, n = out.get(family, (0.0, 0.0))
            out[family] = (us + k["us_per_step"], n + k["launches_per_step"])
        return out

    fa, fb = families(a), families(b)
    rows = sorted(set(fa) | set(fb), key=lambda f: -abs(fb.get(f, (0, 0))[0] - fa.get(f, (0, 0))[0]))
    lines = [f"step: {a['step_us']:.0f} -> {b['step_us']:.0f} us ({b['step_us'] - a['step_us']:+.0f}) at batch "
             f"{a['batch']} / {b['batch']}",
             "| kernel family | A us (launches) | B us (launches) | B - A us |", "| --- | --- | --- | --- |"]
    for f in rows[:top]:
        (ua, na), (ub, nb) = fa.get(f, (0.0, 0.0)), fb.get(f, (0.0, 0.0))
        lines.append(f"| {f[:80]} | {ua:.1f} ({na:g}) | {ub:.1f} ({nb:g}) | {ub - ua:+.1f} |")
    return "\n".join(lines)


def table(paths: list[Path]) -> str:
    runs = [json.loads(p.read_text()) for p in paths]
    dense = next(r for r in runs if r["load_format"] != "spon" and not r.get("quantization"))
    lines = ["| engine | " + " | ".join(f"batch {b} tok/s (ratio)" for b in BATCHES) + " | TTFT 2k ms (ratio) |",
             "| --- |" + " --- |" * (len(BATCHES) + 1)]
    for r in runs:
        cells = [f"{r['decode_tok_s'][str(b)]:.0f} ({r['decode_tok_s'][str(b)] / dense['decode_tok_s'][str(b)]:.2f}x)"
                 for b in BATCHES]
        ttft = f"{r['ttft_ms']:.1f} ({dense['ttft_ms'] / r['ttft_ms']:.2f}x)"
        quantized = f", {r['quantization']}" if r.get("quantization") else ""
        engine = f"{Path(r['model']).name} ({r['load_format']}{quantized})"
        lines.append(f"| {engine} | " + " | ".join(cells) + f" | {ttft} |")
    return "\n".join(lines)


def check_tokens(out: Path, tensor_parallel_size: int = 1, new_tokens: int = 24) -> None:
    """vLLM (compile + CUDA graphs, fp32) against the reference sparse model on a small random Llama.

    vLLM's default Triton attention multiplies float32 in TF32, whose rounding moves activations that sit
    next to a threshold across it; FlexAttention multiplies in IEEE float32, so both sides compute the same
    function to float32 rounding and the greedy tokens must be equal, batched (decode through the multi-token
    path) and each prompt alone (through the one-token sparse kernel). The dense model's tokens must differ
    (the sparsity is really in effect).
    """
    from vllm import LLM, SamplingParams

    if not (out / "spon50").exists():
        make_models(out, SMALL_LLAMA, [0.5], torch.float32, seed=1)
    prompts = _check_prompts()
    llm = LLM(str(out / "spon50"), load_format="spon", dtype="float32", max_model_len=512,
              gpu_memory_utilization=0.3, tensor_parallel_size=tensor_parallel_size,
              attention_backend="FLEX_ATTENTION")
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    got = _answers(llm, prompts, params, len(prompts))  # decode at batch 3: the multi-token path
    alone = _answers(llm, prompts, params, 1)  # decode at batch 1: the one-token sparse kernel
    del llm
    sparse = _reference(out / "spon50")
    equal = differs_from_dense = 0
    for prompt, tokens in zip(prompts, got, strict=True):
        want = _reference_greedy(sparse, "spon", prompt, new_tokens)
        dense = _reference_greedy(sparse, "dense", prompt, new_tokens)
        _, gap, spread = _teacher_forced(sparse, "spon", prompt, tokens)
        equal += tokens == want
        differs_from_dense += tokens != dense
        print(f"vllm      {tokens}\nreference {want}\ndense     {dense}\n(teacher-forced: largest gap of a "
              f"vLLM token to the reference argmax {gap:.2e}, logit spread {spread:.2e})", flush=True)
    alone_equal = sum(a == g for a, g in zip(alone, got, strict=True))
    print(f"check-tokens (tp={tensor_parallel_size}): {equal}/{len(prompts)} greedy sequences equal the reference, "
          f"{differs_from_dense}/{len(prompts)} differ from the dense model's, {alone_equal}/{len(prompts)} sent "
          "alone (the one-token kernel) equal them", flush=True)
    assert equal == len(prompts), "vLLM's greedy tokens differ from the reference sparse model's"
    assert alone_equal == len(prompts), "vLLM's tokens at batch 1 (the sparse kernel) differ from the reference's"
    assert differs_from_dense == len(prompts), "the SPON outputs equal the dense model's: sparsity not in effect?"


def check_fp8(out: Path, new_tokens: int = 24) -> dict:
    """vLLM `quantization="fp8"` (bf16 activations, compile + CUDA graphs) against the reference with the
    weights rounded as vLLM rounds them, each prompt sent alone: SPON with every layer of the small model on
    the sparse fp8 kernel at one token (a kernel table for its shapes, `VLLM_SPON_KERNEL_TABLE`, holding the
    H200 table's fused gate/up config), SPON with none on it (vLLM's fp8 matmul on the thresholded input), and
    the dense model.

    Exact equality is not expected: vLLM's fp8 prefill (and its matmul at decode) also quantizes activations to
    fp8, which neither the reference nor the sparse kernel does, and it computes in bf16. The kernel's
    tolerance is the engine without it: its teacher-forced agreement with the reference (vLLM's token is the
    reference's argmax) may fall short of that one's by at most FP8_AGREEMENT_SLACK. Engines run in this
    process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so that the layers on the kernel can be counted.
    """
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from bench_kernels import write_table
    from vllm import LLM, SamplingParams

    from vllm_spon import linear_method
    from vllm_spon.kernels import configs

    os.environ.pop(configs.TABLE_ENV, None)  # the packaged H200 table's config below
    configs.table_for.cache_clear()
    if not (out / "spon50").exists():
        make_models(out, SMALL_LLAMA, [0.5], torch.bfloat16, seed=1)
    h, i, kv = SMALL_LLAMA["hidden_size"], SMALL_LLAMA["intermediate_size"], SMALL_LLAMA["num_key_value_heads"]
    shapes = [(h, h + 2 * kv * h // SMALL_LLAMA["num_attention_heads"]), (h, h), (h, 2 * i), (i, h)]
    gate_up = configs.table_for("NVIDIA H200", fp8=True)[(4096, 28672, 1)]
    for name, fp8_config in (("spon_kernel", gate_up), ("spon_vllm_matmul", None)):
        write_table({}, out / f"{name}_table.py", "check-fp8", {(k, n, 1): fp8_config for k, n in shapes})
    prompts = _check_prompts()
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    answers, on_kernel = {}, {}
    for engine, model, load_format in (("dense", "base", "auto"), ("spon_kernel", "spon50", "spon"),
                                       ("spon_vllm_matmul", "spon50", "spon")):  # fmt: skip
        os.environ[configs.TABLE_ENV] = str(out / f"{engine}_table.py") if load_format == "spon" else ""
        configs.table_for.cache_clear()
        linear_method._FP8_LAYERS.clear()
        llm = LLM(str(out / model), load_format=load_format, dtype="bfloat16", quantization="fp8",
                  max_model_len=512, gpu_memory_utilization=0.3)  # fmt: skip
        answers[engine] = _answers(llm, prompts, params, 1)
        on_kernel[engine] = len(linear_method._FP8_LAYERS)
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    sparse = _reference(out / "spon50", quantization="fp8")
    want = {method: [_reference_greedy(sparse, method, p, new_tokens) for p in prompts] for method in ("dense", "spon")}
    result: dict = {"prompts": len(prompts), "new_tokens": new_tokens, "layers_on_the_fp8_kernel": on_kernel}
    for engine, got in answers.items():
        method = "dense" if engine == "dense" else "spon"
        agree = [_teacher_forced(sparse, method, p, t)[0] for p, t in zip(prompts, got, strict=True)]
        result[engine] = {"teacher_forced_agreement": sum(agree) / len(agree),
                          "greedy_sequences_equal": len(prompts) - _differing(got, want[method])}  # fmt: skip
    result["spon_differs_from_dense"] = _differing(answers["spon_kernel"], answers["dense"])
    print(f"check-fp8: {result}", flush=True)
    assert on_kernel["spon_kernel"] == 4 * SMALL_LLAMA["num_hidden_layers"], "not every layer on the fp8 kernel"
    assert on_kernel["spon_vllm_matmul"] == 0
    assert result["spon_differs_from_dense"] == len(prompts), "SPON-fp8 answers equal dense-fp8's: sparsity off?"
    shortfall = (result["spon_vllm_matmul"]["teacher_forced_agreement"]
                 - result["spon_kernel"]["teacher_forced_agreement"])  # fmt: skip
    assert shortfall <= FP8_AGREEMENT_SLACK, f"with the fp8 kernel, {shortfall:.2f} less agreement than without"
    return result


def _check_prompts() -> list[list[int]]:
    return [torch.randint(2, 512, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 17, 40)]


def _reference(checkpoint: Path, quantization: str = "none"):
    """The reference sparse model (float32) of a checkpoint on the GPU, its weights rounded for `quantization`."""
    from vllm_spon.calibration.sparse_model import SparseModel, load_hf_model
    from vllm_spon.format.checkpoint import load_checkpoint

    sparse = SparseModel(load_hf_model(checkpoint, device="cuda"))
    sparse.apply_checkpoint(load_checkpoint(checkpoint))
    sparse.quantize(quantization)
    return sparse


@torch.no_grad()
def _reference_greedy(sparse, method: str, prompt: list[int], new_tokens: int) -> list[int]:
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    with sparse.use(method):
        return sparse.model.generate(torch.tensor([prompt], device="cuda"), **kwargs)[0, len(prompt) :].tolist()


@torch.no_grad()
def _teacher_forced(sparse, method: str, prompt: list[int], tokens: list[int]) -> tuple[float, float, float]:
    """Fed vLLM's tokens, the reference's (fraction of them that are its argmax, largest logit gap of one to
    the argmax, mean logit spread)."""
    with sparse.use(method):
        logits = sparse.logits(torch.tensor([prompt + tokens], device="cuda"))[0, len(prompt) - 1 : -1]
    chosen = logits.gather(1, torch.tensor(tokens, device="cuda")[:, None])[:, 0]
    best = logits.max(1).values
    return float((chosen == best).float().mean()), float((best - chosen).max()), float(logits.std(1).mean())


def _answers(llm, prompts: list[list[int]], params, group: int) -> list[list[int]]:
    """Greedy answers of `prompts` sent `group` at a time."""
    got = []
    for i in range(0, len(prompts), group):
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts[i:i + group]], params, use_tqdm=False)
        got += [list(o.outputs[0].token_ids) for o in outs]
    return got


def _differing(answers: list[list[int]], others: list[list[int]]) -> int:
    """How many of two equally long lists of answers differ."""
    return sum(a != b for a, b in zip(answers, others, strict=True))


def batch_divergence(out: Path, dtype: str = "bfloat16", num_prompts: int = 64, new_tokens: int = 32) -> dict:
    """How many greedy answers change with the batch they are served in, dense against SPON, in bf16 with
    compile and CUDA graphs (what a user runs): `num_prompts` random prompts sent one at a time, a second time
    one at a time (run-to-run determinism), 8 at a time and all at once. Neither is batch-invariant on a GPU
    by default (cuBLAS picks kernels by batch size; SPON's one-token kernel serves batch 1 only), so the figure
    is SPON's count beside dense vLLM's; with VLLM_BATCH_INVARIANT=1 in the environment both should be 0.
    `dtype` float32 runs FlexAttention (IEEE float32, as check-tokens does): what is left there is the
    linears' summation order."""
    from vllm import LLM, SamplingParams

    shape = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=8,
                 num_key_value_heads=4, vocab_size=512, max_position_embeddings=1024)
    if not (out / "spon50").exists():
        make_models(out, shape, [0.5], getattr(torch, dtype), seed=2)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 512, (int(n),), generator=generator).tolist()
               for n in torch.randint(4, 64, (num_prompts,), generator=generator)]
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    result: dict = {"prompts": num_prompts, "new_tokens": new_tokens, "dtype": dtype,
                    "gpu": torch.cuda.get_device_name(),
                    "vllm_batch_invariant": os.environ.get("VLLM_BATCH_INVARIANT", "0")}
    attention = {"attention_backend": "FLEX_ATTENTION"} if dtype == "float32" else {}
    for name, model, load_format in (("dense", out / "base", "auto"), ("spon50", out / "spon50", "spon")):
        llm = LLM(str(model), load_format=load_format, dtype=dtype, max_model_len=512,
                  gpu_memory_utilization=0.3, seed=0, **attention)

        alone = _answers(llm, prompts, params, 1)
        result[name] = {"changed_when_sent_alone_again": _differing(alone, _answers(llm, prompts, params, 1)),
                        **{f"changed_at_batch_{b}": _differing(alone, _answers(llm, prompts, params, b))
                           for b in (8, num_prompts)}}
        if name == "dense":
            dense_alone = alone
        else:  # sparsity in effect: SPON's answers are not the dense model's
            result[name]["differ_from_dense_alone"] = _differing(alone, dense_alone)
        print(f"batch-divergence {name}: answers that differ from the same prompt sent alone: {result[name]} "
              f"(of {num_prompts}, {new_tokens} greedy tokens each)", flush=True)
        del llm
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("make")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--sparsities", default="0.4,0.5,0.6")
    p.add_argument("--layers", type=int, default=LLAMA3_8B["num_hidden_layers"])
    p.add_argument("--per-projection", type=lambda v: {k: float(s) for k, s in (i.split("=") for i in v.split(","))},
                   help="also spon-perproj with these sparsities, e.g. q_proj=0.59,k_proj=0.44,...")
    p = sub.add_parser("engine")
    p.add_argument("model")
    p.add_argument("--load-format", default="auto")
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--quantization", help="vLLM weight quantization, e.g. fp8 (default: none, bf16 weights)")
    p.add_argument("--engine-args", type=json.loads, default={}, help="JSON of LLM(...) settings to override")
    p.add_argument("--batches", default=",".join(map(str, BATCHES)), help="decode batch sizes")
    p.add_argument("--decode-tokens", type=int, default=DECODE_TOKENS)
    p.add_argument("--prefill-tokens", type=int, default=PREFILL_TOKENS, help="prompt length of the TTFT run")
    p = sub.add_parser("profile")
    p.add_argument("model")
    p.add_argument("--load-format", default="auto")
    p.add_argument("--quantization")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--json", type=Path, required=True)
    p = sub.add_parser("profile-diff")
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p = sub.add_parser("table")
    p.add_argument("json", type=Path, nargs="+")
    p = sub.add_parser("check-tokens")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tp", type=int, default=1)
    p = sub.add_parser("check-fp8")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--json", type=Path, required=True)
    p = sub.add_parser("batch-divergence")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ns = parser.parse_args()
    if ns.cmd == "make":
        shape = {**LLAMA3_8B, "num_hidden_layers": ns.layers}
        make_models(ns.out, shape, [float(s) for s in ns.sparsities.split(",")], torch.bfloat16, seed=0,
                    per_projection=ns.per_projection)
    elif ns.cmd == "engine":
        result = run_engine(ns.model, ns.load_format, ns.tp, ns.quantization, engine_args=ns.engine_args,
                            batches=tuple(int(b) for b in ns.batches.split(",")), decode_tokens=ns.decode_tokens,
                            prefill_tokens=ns.prefill_tokens)
        ns.json.write_text(json.dumps(result, indent=1))
    elif ns.cmd == "profile":
        ns.json.write_text(json.dumps(profile_decode(ns.model, ns.load_format, ns.quantization, ns.batch), indent=1))
    elif ns.cmd == "profile-diff":
        print(profile_diff(json.loads(ns.a.read_text()), json.loads(ns.b.read_text())))
    elif ns.cmd == "table":
        print(table(ns.json))
    elif ns.cmd == "check-fp8":
        ns.json.write_text(json.dumps(check_fp8(ns.out), indent=1))
    elif ns.cmd == "batch-divergence":
        ns.json.write_text(json.dumps(batch_divergence(ns.out, ns.dtype), indent=1))
    else:
        check_tokens(ns.out, ns.tp)


if __name__ == "__main__":
    main()
