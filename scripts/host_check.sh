#!/usr/bin/env bash
# Compiles one host-glue file (csrc/<family>/<family>_ops.cpp) against torch + CUDA headers.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cuda=${CUDA_HOME:-/usr/local/cuda}
py=${PYTHON:-python3}
incs=$($py -c "
from torch.utils import cpp_extension; import sysconfig, nvidia, pathlib
p = cpp_extension.include_paths() + [sysconfig.get_paths()['include']]
p += [str(pathlib.Path(b) / 'cu13' / 'include') for b in nvidia.__path__]
print(' '.join('-isystem ' + x for x in p))")
abi=$($py -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")
g++ -std=c++20 -O1 -fPIC -c "$1" -o /tmp/$(basename "$1" .cpp).o -I"$root/csrc" $incs \
  -isystem "$cuda/include" -isystem "$cuda/include/cccl" -DFLASHSEEK_WITH_CUDA=1 \
  -D_GLIBCXX_USE_CXX11_ABI=$abi -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H -Wall -Wno-unused-parameter
echo "compiled $1"
