"""Probe (issue 9): what does the fused SPON bias cost vLLM's fp8 matmul from 2 tokens on, and would cuBLASLt's
fp8 product (`torch._scaled_mm`, bias in its epilogue) carry it for less than cutlass?

At 2-64 tokens SPON on fp8 weights runs vLLM's fp8 matmul on the thresholded, quantized x with the fused bias
(layer's + SPON's) in cutlass's epilogue; fp8 alone has no bias on Llama. Per shape vLLM runs (qkv, o, fused
gate/up, down) and token count, a per-tensor weight scale as vLLM's online `--quantization fp8` gives, x
quantized beforehand (per token, as vLLM 0.26 does where cutlass runs, or per tensor: `--activation-scales`),
four products on the same fp8 weights: cutlass without and with the bias, `_scaled_mm` without and with it
(per-token scales: its row-wise form, the weight scale broadcast to `[1, out]`). Timed as bench_kernels.py
times (CUDA graph, weight copies rotated past L2). Needs vLLM (the gpu-kit) for cutlass.

    python benchmarks/probe_fp8_bias.py --out DIR [--activation-scales token|tensor]
"""

import argparse
import json
import math
from pathlib import Path

import torch
from bench_kernels import FP8, SHAPES, Case, bench_us  # run as benchmarks/probe_fp8_bias.py: its folder is on sys.path

SHAPES_VLLM_RUNS = ("qkv 4096->6144", "o 4096->4096", "gate_up fused 4096->2x14336", "down 14336->4096")
TOKENS = (1, 2, 4, 8, 16, 64)
DTYPE = torch.bfloat16


def products(case: Case, per_token: bool) -> dict[str, object]:
    """name -> fn(inputs, (fp8 weight column-major [in, out], its scale [1], the same as a row [1, out])) for the
    four products (the row: `_scaled_mm`'s row-wise form)."""
    from vllm import _custom_ops as ops

    x8: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def quantized(i) -> tuple[torch.Tensor, torch.Tensor]:  # outside the timed graph
        if id(i) not in x8:
            amax = i.x.float().abs().amax(dim=-1, keepdim=True) if per_token else i.x.float().abs().amax()
            scale = (amax / 448.0).reshape(-1, 1) if per_token else (amax / 448.0).reshape(1)
            x8[id(i)] = ((i.x.float() / scale).to(FP8), scale)
        return x8[id(i)]

    def cutlass(i, w, bias=None):
        x_q, x_scale = quantized(i)
        return ops.cutlass_scaled_mm(x_q, w[0], x_scale, w[1], DTYPE, bias)

    def scaled_mm(i, w, bias=None):
        x_q, x_scale = quantized(i)
        return torch._scaled_mm(x_q, w[0], x_scale, w[2] if per_token else w[1], bias=bias, out_dtype=DTYPE)

    return {"cutlass": cutlass, "cutlass+bias": lambda i, w: cutlass(i, w, case.bias),
            "scaled_mm": scaled_mm, "scaled_mm+bias": lambda i, w: scaled_mm(i, w, case.bias)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--activation-scales", choices=("token", "tensor"), default="token")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in SHAPES_VLLM_RUNS:
        case = Case(*SHAPES[name])
        weights = []
        for w in case.w:  # per-tensor scale, column-major: the layout vLLM hands cutlass
            scale = (w.float().abs().amax() / 448.0).reshape(1)
            weights.append(((w.float() / scale).to(FP8).t().contiguous().t(), scale,
                            scale.reshape(1, 1).expand(1, w.shape[1]).contiguous()))  # fmt: skip
        fns = products(case, args.activation_scales == "token")
        for tokens in TOKENS:
            i0 = case.inputs(tokens, 0.0)[0]
            ref = fns["cutlass+bias"](i0, weights[0]).float()
            err, us = {}, {}
            for k, f in fns.items():
                try:
                    err[k] = float((f(i0, weights[0]).float() - ref).norm() / ref.norm())
                    us[k] = bench_us(case.calls(f, tokens, 0.0, weights))
                except RuntimeError as e:  # a form this torch build refuses (row-wise with a bias, say)
                    err[k], us[k] = f"{type(e).__name__}: {str(e)[:200]}", math.nan
            row = {"shape": name, "tokens": tokens, "us": us, "rel_err_vs_cutlass_bias": err}
            rows.append(row)
            print(json.dumps(row), flush=True)
        del case, weights
        torch.cuda.empty_cache()
    stem = f"probe_fp8_bias_{args.activation_scales}_scales"
    summary = {"device": torch.cuda.get_device_name(), "activation_scales": args.activation_scales, "rows": rows}
    (args.out / f"{stem}.json").write_text(json.dumps(summary, indent=1))
    lines = ["| shape | tokens | cutlass us | +bias | scaled_mm | +bias | scaled_mm+bias / cutlass+bias |",
             "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in rows:
        u = r["us"]
        lines.append(f"| {r['shape']} | {r['tokens']} | {u['cutlass']:.1f} | {u['cutlass+bias']:.1f} | "
                     f"{u['scaled_mm']:.1f} | {u['scaled_mm+bias']:.1f} | "
                     f"{u['cutlass+bias'] / u['scaled_mm+bias']:.3f}x |")  # fmt: skip
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
