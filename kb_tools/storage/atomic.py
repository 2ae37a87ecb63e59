"""Atomic file writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import KBError


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)`, fsync it, then rename it over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise KBError(f"could not write {path.name} in {path.parent} ({e.strerror or e}); check the disk space, the folder's "
                      "permissions, and that nothing but a regular file has that name") from e
    finally:
        if os.path.lexists(tmp) and not os.path.isdir(tmp):
            tmp.unlink()


def write_json_atomic(path: Path, data: Any) -> None:
    write_atomic(path, lambda p: p.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n"))
