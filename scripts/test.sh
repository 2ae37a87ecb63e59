#!/usr/bin/env bash
# Sets everything up (scripts/bootstrap.sh) and runs every check: ruff, the unit
# tests of the pure modules, and the integration tests against a real ComfyUI server.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh tests/unit`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
.venv/bin/python -m ruff check .
# pytest exits non-zero when a test fails and (code 5) when no test ran
exec .venv/bin/python -m pytest "${@:-tests}"
