#!/usr/bin/env bash
# The one call for a GPU machine: build (all cores; links .prebuilt/libflashseek_kernels.a when present,
# see scripts/build_kernels.sh and scripts/device_snapshot.sh), run the GPU tests, run the benchmarks.
# OUTDIR gets bench.json, roofline.png and logs.tgz (every log; repacked after each step, so a run killed
# by its time limit still returns what finished: the device tool returns only a few files).
# Usage: scripts/gpu_run.sh OUTDIR
#   TESTS="tests/test_mla.py ..."  which test files (default: all; only `cuda`-marked tests run, one process each)
#   CRASH_GDB="expr"               on a crash, rerun the tests matching expr under cuda-gdb for a native backtrace
#   BENCH="mla gemm ..."           which bench families (default: all; BENCH=none skips)
#   SANITIZE="tests/x.py ..."      also run these test files under compute-sanitizer (SANITIZE_TOOL: memcheck,
#                                  or synccheck / racecheck / initcheck)
#   SANITIZE_K="expr"              ... only the tests matching this pytest -k expression
#   TEST_TIMEOUT / BENCH_TIMEOUT   seconds (default 300 / 240)
#   BUDGET=seconds                 start no further step (test file, sanitizer, bench) past this many
#                                  seconds, so the run ends inside the device call's own limit
set -uo pipefail
out=${1:?usage: scripts/gpu_run.sh OUTDIR}
mkdir -p "$out"
log=$(mktemp -d /tmp/gpu_run_logs.XXXXXX)
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
t0=$(date +%s)
stamp() { echo "[gpu_run +$(( $(date +%s) - t0 ))s] $*"; }
pack() { tar czf "$out/logs.tgz" -C "$log" . 2>/dev/null; }
over_budget() { [ -n "${BUDGET:-}" ] && [ $(( $(date +%s) - t0 )) -ge "$BUDGET" ]; }
# The GPU machine has no network: Python packages travel as wheels in .whl/.
if compgen -G ".whl/*.whl" >/dev/null; then
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
[ -f .prebuilt/libflashseek_kernels.a ] && export FLASHSEEK_KERNELS_LIB=$PWD/.prebuilt/libflashseek_kernels.a
[ -f .prebuilt/commit.txt ] && export FLASHSEEK_COMMIT=$(cat .prebuilt/commit.txt)
# A same-run peer for the MLA bench (a standalone FlashMLA benchmark binary built outside this repo).
[ -x .prebuilt/peers/bench_flashmla ] && export FLASHSEEK_FLASHMLA_BENCH=$PWD/.prebuilt/peers/bench_flashmla
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv | tee "$log/gpu.txt"
stamp "building (prebuilt kernels: ${FLASHSEEK_KERNELS_LIB:-none})"
if ! FLASHSEEK_CUDA=1 FLASHSEEK_PTXAS_VERBOSE=1 MAX_JOBS=$(nproc) $py -m pip install --no-build-isolation --no-deps -e . >"$log/build.log" 2>&1; then
  tail -80 "$log/build.log"; stamp "BUILD FAILED"; pack; exit 1
fi
stamp "built"
so=$(ls python/flashseek/_C*.so | head -1)
{ ${CXX:-g++} --version | head -1; echo "libstdc++.so: $(${CXX:-g++} -print-file-name=libstdc++.so)";
  echo "libstdc++ symbols defined in _C: $(nm -C "$so" | grep -c ' [TW] std::locale::')";
  ldd "$so" | grep -E "stdc|cudart"; grep -E "libstdc|flashseek:" "$log/build.log" | head -5; } | tee "$log/toolchain.txt"
$py -m flashseek.cli.main info | tee "$log/info.txt"
pack
stamp "GPU tests"
# One process per file, so that a crash in one file cannot hide the results of the others.
for f in ${TESTS:-tests/test_*.py}; do
  name=$(basename "$f" .py)
  if over_budget; then echo "== $name skipped: BUDGET=${BUDGET}s reached"; continue; fi
  FLASHSEEK_FAILURE_LOG="$log/$name.failures" timeout "${TEST_TIMEOUT:-300}" $py -m pytest "$f" -m cuda -q -rfEs --tb=short -p no:cacheprovider \
    --junitxml="$log/$name.xml" >"$log/$name.log" 2>&1
  rc=$?
  echo "== $name rc=$rc: $(tail -1 "$log/$name.log")"
  if [ -f "$log/$name.failures" ]; then
    echo "   failures: $(grep -c '^==== ' "$log/$name.failures"); first ones:"
    grep -E "^==== |^E  " "$log/$name.failures" | cut -c1-220 | head -${FAIL_LINES:-12}
  fi
  if [ $rc -ge 124 ]; then
    # A crash (or a hang) leaves no pytest summary: show where it died.
    grep -B2 -A12 "Fatal Python error" "$log/$name.log" | grep -v site-packages | head -30
    if [ -n "${CRASH_GDB:-}" ] && command -v cuda-gdb >/dev/null; then
      timeout 120 cuda-gdb -q -batch -ex run -ex bt --args $py -m pytest "$f" -m cuda -q -x -p no:cacheprovider \
        -k "${CRASH_GDB}" >"$log/$name.gdb" 2>&1
      grep -E "^#" "$log/$name.gdb" | head -25
    fi
  fi
  pack
done
if [ -n "${SANITIZE:-}" ] && over_budget; then
  echo "sanitizer skipped: BUDGET=${BUDGET}s reached"
elif [ -n "${SANITIZE:-}" ]; then
  stamp "compute-sanitizer ${SANITIZE_TOOL:-memcheck}: $SANITIZE -k '${SANITIZE_K:-}'"
  timeout "${SANITIZE_TIMEOUT:-240}" compute-sanitizer --tool "${SANITIZE_TOOL:-memcheck}" --error-exitcode 9 \
    $py -m pytest $SANITIZE -m cuda -q -p no:cacheprovider ${SANITIZE_K:+-k "$SANITIZE_K"} >"$log/sanitizer.log" 2>&1
  echo "sanitizer rc=$?"; grep -E "ERROR SUMMARY|passed|failed" "$log/sanitizer.log" | tail -3
  pack
fi
if [ "${BENCH:-all}" != none ] && over_budget; then
  echo "benchmarks skipped: BUDGET=${BUDGET}s reached"
elif [ "${BENCH:-all}" != none ]; then
  stamp "benchmarks: ${BENCH:-all}"
  timeout "${BENCH_TIMEOUT:-240}" $py -m flashseek.cli.main bench ${BENCH:-all} --json "$out/bench.json" \
    --roofline "$out/roofline.png" >"$log/bench.log" 2>&1
  echo "bench rc=$?"; cat "$log/bench.log" | tail -60
fi
pack
stamp "done"
