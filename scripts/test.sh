#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the test suite. GPU tests skip cleanly without a Hopper GPU.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/setup.sh"
cd "$root"
exec "${FLASHSEEK_VENV:-$root/.venv}/bin/python" -m pytest tests -q -rs "$@"
