#!/usr/bin/env bash
# Creates .venv (reusing a torch that the system Python already has), installs the build and test
# dependencies, and builds + installs flashseek (editable) with its CUDA kernels when nvcc is found.
# Safe to re-run: each step is skipped when already done, and ccache keeps recompiles cheap.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
venv=${FLASHSEEK_VENV:-$root/.venv}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv --system-site-packages "$venv"
fi
py="$venv/bin/python"
pip_q() { "$py" -m pip install -q --disable-pip-version-check "$@"; }
if ! "$py" -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch"
  pip_q "torch>=2.11"
fi
echo "[setup] installing build and test dependencies"
pip_q "setuptools>=64" wheel "cmake>=3.26" ninja pybind11 "nvidia-cutlass==4.2.0.0" numpy safetensors tqdm \
  pytest "transformers>=4.57" matplotlib
# ccache keeps rebuilds of the CUDA kernels cheap; best effort where we may install it.
if ! command -v ccache >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get install -y -q ccache >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q ccache >/dev/null 2>&1)) || true
fi
# Paths under the checkout hash as relative ones, so a fresh clone elsewhere reuses the cache.
export CCACHE_BASEDIR=$root
# torch's helpers guess the toolkit from `nvcc` on PATH, which may be a wrapper script.
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
echo "[setup] building flashseek (CUDA kernels: ${FLASHSEEK_CUDA:-auto}; this takes a while the first time)"
mkdir -p "$root/build"
start=$(date +%s)
"$py" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e . \
  > "$root/build/setup-build.log" 2>&1 || { mkdir -p build; tail -60 "$root/build/setup-build.log"; exit 1; }
echo "[setup] built in $(( $(date +%s) - start )) s; $("$py" -c 'import flashseek; print("CUDA kernels compiled in" if flashseek.built_with_cuda() else "reference-only build (no CUDA toolkit)")')"
