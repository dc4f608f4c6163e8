#!/usr/bin/env bash
# Same-machine A/B of kernel libraries inside one device call: relinks _C against each library in turn
# and runs one command after each. A change to how a kernel's CTAs overlap their neighbours can win
# in a back-to-back loop of that kernel and lose in the model (session 12), so judge it here, by the
# model bench, with both builds on one card.
# On this machine: build the other revisions' kernels into the snapshot (gzip: the carry limit is 64 MiB),
#   git worktree add --detach /tmp/ab_A REV && (cd /tmp/ab_A && scripts/build_kernels.sh /tmp/ab_A/out)
#   gzip -c /tmp/ab_A/out/libflashseek_kernels.a > .snapshot/.prebuilt/ab/libA.a.gz
# On the device, from .snapshot, after scripts/gpu_run.sh has built _C once:
#   bash scripts/kernel_ab.sh OUTDIR "COMMAND" B A B A
# NAME B is the snapshot's own library; any other NAME is .prebuilt/ab/libNAME.a.gz. COMMAND runs after
# each relink with $AB_NAME and $AB_OUT (OUTDIR/NAME-i) set, e.g.
#   'python3 -m flashseek.cli.main bench model --quick --json $AB_OUT.json'
set -uo pipefail
out=${1:?usage: kernel_ab.sh OUTDIR COMMAND NAME...}
cmd=${2:?usage: kernel_ab.sh OUTDIR COMMAND NAME...}
shift 2
mkdir -p "$out"
export PYTHONPATH=/tmp/site:${PYTHONPATH:-}  # gpu_run.sh installs the wheels there
lib=.prebuilt/libflashseek_kernels.a
own=$(mktemp /tmp/kernel_ab_own.XXXXXX.a)
cp "$lib" "$own"
i=0
for name in "$@"; do
  i=$((i + 1))
  if [ "$name" = B ]; then cp "$own" "$lib"; else gunzip -c ".prebuilt/ab/lib$name.a.gz" > "$lib" || exit 1; fi
  if ! FLASHSEEK_KERNELS_LIB=$PWD/$lib FLASHSEEK_CUDA=1 MAX_JOBS=$(nproc) python3 -m pip install \
      --no-build-isolation --no-deps -e . > "$out/build-$name-$i.log" 2>&1; then
    echo "kernel_ab: relink against $name failed"; tail -20 "$out/build-$name-$i.log"; continue
  fi
  echo "### $name ($i)"
  AB_NAME=$name AB_OUT=$out/$name-$i bash -c "$cmd"
done
cp "$own" "$lib"
rm -f "$own"
