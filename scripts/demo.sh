#!/usr/bin/env bash
# Sets everything up (scripts/bootstrap.sh) and runs the demo: accelerated generation
# in a real ComfyUI on the bundled demo model. Writes to out/demo/ (or the folder given).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
exec .venv/bin/python scripts/demo.py --out "${1:-$ROOT/out/demo}"
