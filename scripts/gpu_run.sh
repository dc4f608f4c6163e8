#!/usr/bin/env bash
# The one call for a GPU machine: build (all cores; links .prebuilt/libflashseek_kernels.a when present,
# see scripts/build_kernels.sh), run the GPU tests, run the benchmarks. Logs and JSON go to OUTDIR.
# Usage: scripts/gpu_run.sh OUTDIR
#   TESTS="tests/test_mla.py ..."  which test files (default: all; only `cuda`-marked tests run)
#   BENCH="mla gemm ..."           which bench families (default: all; BENCH=none skips)
#   SANITIZE="tests/x.py -k y"     also run these under compute-sanitizer memcheck
#   TEST_TIMEOUT / BENCH_TIMEOUT   seconds (default 300 / 240)
set -uo pipefail
out=${1:?usage: scripts/gpu_run.sh OUTDIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
t0=$(date +%s)
stamp() { echo "[gpu_run +$(( $(date +%s) - t0 ))s] $*"; }
# The GPU machine has no network: Python packages travel as wheels in .whl/.
if compgen -G ".whl/*.whl" >/dev/null; then
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
[ -f .prebuilt/libflashseek_kernels.a ] && export FLASHSEEK_KERNELS_LIB=$PWD/.prebuilt/libflashseek_kernels.a
[ -f .prebuilt/commit.txt ] && export FLASHSEEK_COMMIT=$(cat .prebuilt/commit.txt)
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv | tee "$out/gpu.txt"
stamp "building (prebuilt kernels: ${FLASHSEEK_KERNELS_LIB:-none})"
if ! FLASHSEEK_CUDA=1 FLASHSEEK_PTXAS_VERBOSE=1 MAX_JOBS=$(nproc) $py -m pip install --no-build-isolation --no-deps -e . >"$out/build.log" 2>&1; then
  tail -80 "$out/build.log"; stamp "BUILD FAILED"; exit 1
fi
stamp "built"
$py -m flashseek.cli.main info | tee "$out/info.txt"
stamp "GPU tests"
timeout "${TEST_TIMEOUT:-300}" $py -m pytest ${TESTS:-tests} -m cuda -q -rs -p no:cacheprovider \
  --junitxml="$out/tests.xml" >"$out/tests.log" 2>&1
echo "pytest rc=$?"; grep -E "passed|failed|error" "$out/tests.log" | tail -3
grep -E "^(FAILED|ERROR)" "$out/tests.log" | head -30
if [ -n "${SANITIZE:-}" ]; then
  stamp "compute-sanitizer memcheck: $SANITIZE"
  timeout 240 compute-sanitizer --tool memcheck --error-exitcode 9 $py -m pytest $SANITIZE -m cuda -q -p no:cacheprovider \
    >"$out/sanitizer.log" 2>&1
  echo "sanitizer rc=$?"; grep -E "ERROR SUMMARY|passed|failed" "$out/sanitizer.log" | tail -3
fi
if [ "${BENCH:-all}" != none ]; then
  stamp "benchmarks: ${BENCH:-all}"
  timeout "${BENCH_TIMEOUT:-240}" $py -m flashseek.cli.main bench ${BENCH:-all} --json "$out/bench.json" \
    --roofline "$out/roofline.png" >"$out/bench.log" 2>&1
  echo "bench rc=$?"; cat "$out/bench.log" | tail -60
fi
stamp "done"
