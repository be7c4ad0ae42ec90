#!/usr/bin/env bash
# Kernel work on the GPU host, each stage one device call (torch and Triton only, no vLLM needed):
#   bash scripts/gpu_kernels.sh retune OUT   # the one-token re-tune of today's kernels, fp8 then bf16, each config
#                                            # of the committed sweeps' finalists also with two-level finishes
#                                            # (Config.fanin; never tuned on the H200): OUT/bf16/tuned_<gpu>.py
#                                            # holds both tables, the committed ones where nothing won
#   bash scripts/gpu_kernels.sh tests OUT    # tests/test_kernels_gpu.py (bf16 and fp8, real shapes)
# A written table serves vLLM with VLLM_SPON_KERNEL_TABLE=OUT/bf16/tuned_<gpu>.py before it is committed over
# kernels/tuned_<gpu>.py; read its log first (kernels/NOTES.md: how runs are judged).
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(bash scripts/gpu_host_env.sh)"
stage=$1 out=$2
mkdir -p "$out"
results=benchmarks/results
case $stage in
  retune)
    start=$(date +%s)
    slug=$(python -c "import torch; from vllm_spon.kernels.configs import gpu_slug; print(gpu_slug(torch.cuda.get_device_name()))")
    # fp8 first: the bf16 run then writes its table beside the new fp8 one (it reads the committed table through
    # VLLM_SPON_KERNEL_TABLE).
    timeout 240 python benchmarks/bench_kernels.py --fp8 --tune --fanins 0 4 8 16 --out "$out/fp8" \
      --candidates-from $results/h200_kernels_fp8_run5_tune.jsonl $results/h100_kernels_fp8_run12_tune.jsonl \
      > "$out/fp8.log" 2>&1 || echo "fp8 re-tune: exit $? (240 s limit)" | tee -a "$out/fp8.log"
    table=()  # without a new fp8 table the bf16 run writes the committed one beside its own
    [ -f "$out/fp8/tuned_$slug.py" ] && table=("VLLM_SPON_KERNEL_TABLE=$out/fp8/tuned_$slug.py")
    env "${table[@]}" timeout $((560 - ($(date +%s) - start))) python benchmarks/bench_kernels.py \
      --tune --tokens 1 --fanins 0 4 8 16 --out "$out/bf16" --candidates-from $results/h200_kernels_run8_tune.jsonl \
      $results/h200_kernels_run9_down_tune.jsonl $results/h100_kernels_run12_tune.jsonl \
      > "$out/bf16.log" 2>&1 || echo "bf16 re-tune: exit $?" | tee -a "$out/bf16.log"
    tail -n 25 "$out/fp8.log" "$out/bf16.log" | cut -c1-220 ;;
  tests)
    timeout 560 python -m pytest -q tests/test_kernels_gpu.py 2>&1 | tee "$out/gpu_tests.log" | tail -15 ;;
  *) echo "unknown stage $stage (retune | tests)" >&2; exit 2 ;;
esac
