#!/usr/bin/env bash
# Make this checkout importable and discoverable as the vLLM plugin on the offline GPU host, without pip:
# the package folders are linked into place and a minimal dist-info carries the `vllm.general_plugins`
# entry point (vLLM finds plugins through package metadata). Prints the environment to export.
#   eval "$(bash scripts/gpu_host_env.sh)"
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
site=${SPON_SITE:-/tmp/spon-site}
mkdir -p "$site/vllm_spon-0.1.0.dist-info"
ln -sfn "$repo/kernels" "$repo/vllm_spon/kernels"
ln -sfn "$repo/calibration" "$repo/vllm_spon/calibration"
ln -sfn "$repo/format" "$repo/vllm_spon/format"
printf 'Metadata-Version: 2.1\nName: vllm-spon\nVersion: 0.1.0\n' > "$site/vllm_spon-0.1.0.dist-info/METADATA"
printf '[vllm.general_plugins]\nspon = vllm_spon:register\n' > "$site/vllm_spon-0.1.0.dist-info/entry_points.txt"
echo "export PYTHONPATH=$repo:$site\${PYTHONPATH:+:\$PYTHONPATH}"
