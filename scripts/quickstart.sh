#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the main job: generation with the embedded default checkpoint
# (a small DeepSeek-R1-architecture model that flashseek writes itself), on the GPU if there is one,
# otherwise on the CPU reference path. Extra arguments go to `flashseek generate`.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/setup.sh"
bin=${FLASHSEEK_VENV:-$root/.venv}/bin
"$bin/flashseek" info
exec "$bin/flashseek" generate "$@"
