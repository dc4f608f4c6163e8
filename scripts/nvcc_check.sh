#!/usr/bin/env bash
# Compiles one kernel translation unit with the project's flags and prints the ptxas report
# (registers, spills, shared memory). Costs no device time. Usage: scripts/nvcc_check.sh csrc/x/y.cu
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cuda=${CUDA_HOME:-/usr/local/cuda}
py=${PYTHON:-python3}
cutlass=$($py -c "import cutlass_library, pathlib; print(pathlib.Path(cutlass_library.__file__).parent / 'source')")
out=${OUT_O:-/tmp/$(basename "$1" .cu).o}
"$cuda/bin/nvcc" -gencode=arch=compute_90a,code=sm_90a -O3 -std=c++20 --expt-relaxed-constexpr \
  --expt-extended-lambda -lineinfo -Xcompiler=-fPIC -DNDEBUG -DCUTLASS_ENABLE_TENSOR_CORE_MMA=1 \
  -I"$root/csrc" -isystem "$cutlass/include" -isystem "$cutlass/tools/util/include" \
  -Xptxas=-v -c "$1" -o "$out" "${@:2}"
echo "compiled $1 -> $out"
