#!/usr/bin/env bash
# Sets everything up (scripts/bootstrap.sh) and runs the demo: accelerated generation
# in a real ComfyUI on the bundled demo model. Writes to out/demo/ (or the folder given).
# REDI_COMFY picks the host (default 0.30.0; 0.3.75 runs on .venv-0.3.75, see scripts/bootstrap.sh).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
case "${REDI_COMFY:-0.30.0}" in 0.3.75) VENV=.venv-0.3.75 ;; *) VENV=.venv ;; esac
exec "$VENV/bin/python" scripts/demo.py --out "${1:-$ROOT/out/demo}"
