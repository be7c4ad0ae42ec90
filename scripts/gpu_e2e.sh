#!/usr/bin/env bash
# The end-to-end GPU benchmark in stages that each fit one device call (vLLM from the gpu-kit bundle):
#   bash scripts/gpu_e2e.sh make  WORK [--per-projection q_proj=S,...]  # Llama-3-8B-shaped random model + SPON
#                                                      # 40/50% checkpoints (+ spon-perproj: one sparsity a projection)
#   bash scripts/gpu_e2e.sh run   WORK OUT ENGINE...   # ENGINE: dense | fp8 | spon40 | spon50 | spon-perproj | spon50-fp8
#   bash scripts/gpu_e2e.sh table WORK OUT             # ratios to dense bf16, all JSONs of WORK in one table
#   bash scripts/gpu_e2e.sh profile WORK OUT ENGINE [BATCH]  # GPU time per kernel of a decode step (default 8)
#   bash scripts/gpu_e2e.sh ref DIR STAGE ARGS...      # a stage run by another revision's tree, for an A/B in one
#                                                      # session: locally `make ref-tree REV=...`, carry artifacts/ref
#   bash scripts/gpu_e2e.sh check OUT                  # greedy tokens of vLLM vs the reference sparse model
#   bash scripts/gpu_e2e.sh check-fp8 OUT              # the same under --quantization fp8, against dense fp8's
#   bash scripts/gpu_e2e.sh divergence OUT             # answers vs batch, default and VLLM_BATCH_INVARIANT=1
# TP=2 in the environment runs every engine and the token check with tensor parallelism 2 (two GPUs; keep NVLink
# multicast off as the device notes say). Every engine of one table must run on the same GPUs in one session.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(bash scripts/gpu_host_env.sh)"
export PYTHONUNBUFFERED=1 VLLM_USE_FLASHINFER_SAMPLER=0
# NVLink multicast stays off (it can take a shared host's GPUs out of service): vLLM and NCCL inherit these.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
bench=benchmarks/bench_gpu_e2e.py
engine_args() {  # engine_args WORK ENGINE: the model and vLLM options of ENGINE, into the array `args`
  case $2 in
    dense) args=("$1/base" --load-format auto) ;;
    fp8) args=("$1/base" --load-format auto --quantization fp8) ;;
    spon*-fp8) args=("$1/${2%-fp8}" --load-format spon --quantization fp8) ;;
    spon*) args=("$1/$2" --load-format spon) ;;
    *) echo "unknown engine $2" >&2; exit 2 ;;
  esac
}
stage=$1
shift
case $stage in
  make)
    python $bench make --out "$1" --sparsities 0.4,0.5 "${@:2}" ;;
  run)
    work=$1 out=$2
    shift 2
    for engine in "$@"; do
      engine_args "$work" "$engine"
      python $bench engine "${args[@]}" --tp "${TP:-1}" --json "$work/$engine.json" 2>&1 | tee "$out/$engine.log" \
        | grep -E "tok/s|TTFT|SPON:|Error|error" || true
      cp "$work/$engine.json" "$out/"
    done ;;
  profile)
    engine_args "$1" "$3"
    python $bench profile "${args[@]}" --batch "${4:-8}" --json "$2/profile_b${4:-8}_$3.json" 2>&1 \
      | tee "$2/profile_b${4:-8}_$3.log" | grep -E "^profile|^ +[0-9]|Error|error" | head -20 || true ;;
  ref)
    # Its own vLLM compile cache and plugin metadata: a graph compiled from this tree is never reused for it.
    dir=$(cd "$1" && pwd)
    shift
    VLLM_CACHE_ROOT=/tmp/vllm-cache-ref SPON_SITE=/tmp/spon-site-ref exec bash "$dir/scripts/gpu_e2e.sh" "$@" ;;
  table)
    python $bench table "$1"/dense.json $(ls "$1"/*.json | grep -v '/dense.json$') | tee "$2/table.md" ;;
  check)
    python $bench check-tokens --out /tmp/e2e-small --tp "${TP:-1}" 2>&1 | tee "$1/check_tokens.log" | tail -20 ;;
  check-fp8)
    python $bench check-fp8 --out /tmp/e2e-fp8 --json "$1/check_fp8.json" 2>&1 | tee "$1/check_fp8.log" | tail -5 ;;
  divergence)
    for invariant in 0 1; do
      VLLM_BATCH_INVARIANT=$invariant python $bench batch-divergence --out /tmp/e2e-div \
        --json "$1/batch_divergence_bi$invariant.json" 2>&1 | tee "$1/batch_divergence_bi$invariant.log" \
        | grep -E "batch-divergence|Error|error" || true
    done ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
