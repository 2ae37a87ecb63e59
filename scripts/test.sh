#!/usr/bin/env bash
# Sets everything up (scripts/bootstrap.sh, both hosts) and runs every check: ruff, the whole suite
# (unit, integration, browser) on ComfyUI 0.30.0, the default host, then the tiers that drive
# ComfyUI's APIs and frontend (integration, browser) on ComfyUI 0.3.75.
# With arguments, they go to pytest on the one host REDI_COMFY selects (default 0.30.0), e.g.
#   bash scripts/test.sh tests/unit
#   REDI_COMFY=0.3.75 bash scripts/test.sh tests/browser
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

venv_of() { case "$1" in 0.3.75) echo .venv-0.3.75 ;; *) echo .venv ;; esac; }

if [ $# -gt 0 ]; then
  bash scripts/bootstrap.sh
  VENV="$(venv_of "${REDI_COMFY:-0.30.0}")"
  "$VENV/bin/python" -m ruff check .
  # pytest exits non-zero when a test fails and (code 5) when no test ran
  exec "$VENV/bin/python" -m pytest "$@"
fi

REDI_COMFY=0.30.0 bash scripts/bootstrap.sh
REDI_COMFY=0.3.75 bash scripts/bootstrap.sh
.venv/bin/python -m ruff check .

status=0
run() {  # run HOST PYTEST_ARGS...: one host's tiers, timed; a failure still lets the other host run
  local host=$1 start=$SECONDS; shift
  echo "=== ComfyUI $host: pytest $*"
  REDI_COMFY=$host "$(venv_of "$host")/bin/python" -m pytest --durations=20 "$@" || status=1
  echo "=== ComfyUI $host: $((SECONDS - start)) s"
}
run 0.30.0 tests
run 0.3.75 tests/browser tests/integration  # browser first, as on 0.30: its KB build test starts from no KB
exit $status
