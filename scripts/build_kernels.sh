#!/usr/bin/env bash
# Compiles only the CUDA kernels (csrc/**/*.cu, no torch headers) into a static library, e.g. to carry
# to the GPU machine so that only the small host glue compiles there against its own torch.
# Usage: scripts/build_kernels.sh [dest_dir]   (default dest: .prebuilt)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest=${1:-$root/.prebuilt}
py=${PYTHON:-python3}
cuda=${CUDA_HOME:-/usr/local/cuda}
launch=()
command -v ccache >/dev/null && launch=(-DCMAKE_CUDA_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
export CCACHE_BASEDIR=$root
cmake -S "$root" -B "$root/build/kernels" -G Ninja -DCMAKE_BUILD_TYPE=Release -DFLASHSEEK_CUDA=ON \
  -DPython_EXECUTABLE="$(command -v $py)" -DCUDAToolkit_ROOT="$cuda" -DCMAKE_CUDA_COMPILER="$cuda/bin/nvcc" \
  "${launch[@]}" >/dev/null
cmake --build "$root/build/kernels" --target flashseek_kernels -j "${MAX_JOBS:-$(nproc)}"
mkdir -p "$dest"
cp "$root/build/kernels/libflashseek_kernels.a" "$dest/"
# The GPU machine's copy of the tree has no .git: carry the commit the kernels were built from.
git -C "$root" describe --always --dirty > "$dest/commit.txt"
echo "$dest/libflashseek_kernels.a ($(du -h "$dest/libflashseek_kernels.a" | cut -f1))"
