#!/usr/bin/env bash
# Prepares .snapshot/, the tree the device tool carries to the GPU machine (run with carry [".snapshot"]
# and command `cd .snapshot && ... bash scripts/gpu_run.sh $OUT/run`):
#   - HEAD's files, or with --worktree the tracked files as they are now (uncommitted changes included);
#   - the wheels of .whl/ (the GPU machine has no network);
#   - .prebuilt/libflashseek_kernels.a, the CUDA kernels compiled here (scripts/build_kernels.sh), so that
#     only the host glue compiles there.
# .snapshot/.prebuilt/ keeps anything else in it (local harnesses: never committed); the peer binaries of
# .prebuilt/peers/ are copied in afresh.
# Needs nvcc and the dev venv's cmake (>= 3.26) on PATH. Ninja's build directory persists between calls
# in $FLASHSEEK_SNAPSHOT_BUILD (default /tmp/flashseek_snapshot_build), and ccache makes rebuilds cheap.
# Usage: scripts/device_snapshot.sh [--worktree]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
snap=$root/.snapshot
keep=${FLASHSEEK_SNAPSHOT_BUILD:-/tmp/flashseek_snapshot_build}
mkdir -p "$snap"
find "$snap" -mindepth 1 -maxdepth 1 ! -name .prebuilt -exec rm -rf {} +
# tar -m: every extracted file gets the current time. git archive stamps files with the commit's time,
# so after checking out an older commit Ninja would keep objects compiled from newer sources and link
# a library that does not match the headers (session 11 lost a device run to that).
if [ "${1:-}" = --worktree ]; then
  (cd "$root" && git ls-files -z | tar --null -cf - -T -) | tar -x -m -C "$snap"
else
  git -C "$root" archive HEAD | tar -x -m -C "$snap"
fi
[ -d "$root/.whl" ] && cp -r "$root/.whl" "$snap/"
# Peer binaries built here (git-ignored, never committed): refreshed on every snapshot, so that a rebuilt
# peer reaches the GPU machine (session 23 ran a stale FlashMLA binary that lacked varlen).
if [ -d "$root/.prebuilt/peers" ]; then
  mkdir -p "$snap/.prebuilt/peers"
  find "$root/.prebuilt/peers" -maxdepth 1 -type f -exec cp -p {} "$snap/.prebuilt/peers/" \;
fi
mkdir -p "$snap/build"
[ -d "$keep" ] && mv "$keep" "$snap/build/kernels"
status=0
(cd "$snap" && MAX_JOBS=${MAX_JOBS:-2} bash scripts/build_kernels.sh) || status=$?
mv "$snap/build/kernels" "$keep" 2>/dev/null || true
rm -rf "$snap/build"
[ $status -eq 0 ] || { echo "device_snapshot: kernel build failed" >&2; exit $status; }
# The commit the kernels were built from (.snapshot has no .git): HEAD, or with --worktree HEAD plus
# -dirty when the tree has changes.
if [ "${1:-}" = --worktree ]; then
  git -C "$root" describe --always --dirty > "$snap/.prebuilt/commit.txt"
else
  git -C "$root" rev-parse --short HEAD > "$snap/.prebuilt/commit.txt"
fi
echo "snapshot of $(cat "$snap/.prebuilt/commit.txt"): $(du -sh "$snap" | cut -f1) (the device tool carries at most 64 MiB)"
