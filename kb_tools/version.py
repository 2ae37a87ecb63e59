"""The pack's version, as pyproject.toml states it. A distributed build refuses workers that
run another version (their Builder node may write other files or other values)."""

from __future__ import annotations

import re
from pathlib import Path

_PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _read() -> str:
    try:
        m = re.search(r'^version\s*=\s*"([^"]+)"', _PYPROJECT.read_text(), re.MULTILINE)
    except OSError:
        return "unknown"
    return m.group(1) if m else "unknown"


PACK_VERSION = _read()
