"""What the pack's HTTP routes may serve or delete on a worker (pure; the aiohttp glue is in
nodes/kb_routes.py).

    GET  /redi/kb/NAME/FILE       a file of a KB: NAME a KB folder under a KB root, FILE the
                                  manifest or a file its manifest lists; plain names only,
                                  nothing reached through a symlink or outside the folder
    POST /redi/kb/units/release   delete unit KBs of distributed builds (and only those)
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

from ..errors import KBError
from ..storage.disk_format import MANIFEST
from . import store as dist_store
from .plan import parse_unit_kb_name

KB_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
FILE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
UNIT_TTL_S = 24 * 3600.0  # unit KBs left by a coordinator that never came back are deleted after this


class Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False


def find_kb(roots: list[str], kb: str) -> Path:
    if not KB_NAME_RE.match(kb):
        raise Refused(400, f"KB name {kb!r} is not allowed")
    for root in roots:
        r = Path(root)
        d = r / kb
        if d.is_dir() and not d.is_symlink() and (d / MANIFEST).is_file():
            if not _inside(d.resolve(), r.resolve()):
                raise Refused(403, f"KB {kb!r} lies outside its KB folder")
            return d
    raise Refused(404, f"no KB named {kb!r} on this server")


def resolve_kb_file(roots: list[str], kb: str, name: str) -> Path:
    """The path of a KB file the route may serve, or Refused(status, why)."""
    if not FILE_NAME_RE.match(name):
        raise Refused(400, f"file name {name!r} is not allowed")
    d = find_kb(roots, kb)
    try:
        listed = dist_store.listed_files(d)
    except (KBError, OSError) as e:
        raise Refused(409, f"KB {kb!r} has no readable manifest ({e})") from e
    if name not in listed:
        raise Refused(404, f"{name!r} is not a file KB {kb!r} lists")
    p = d / name
    if p.is_symlink() or not p.is_file() or p.resolve().parent != d.resolve():
        raise Refused(404, f"{name!r} of KB {kb!r} is missing or not a plain file")
    return p


def release_units(roots: list[str], names: list[str], build: str = "", ttl_s: float = UNIT_TTL_S) -> list[str]:
    """Delete the named unit KBs, every unit KB of `build`, and any unit KB idle for `ttl_s`.
    Other folders are never touched. Returns the names deleted."""
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or not isinstance(build, str):
        raise Refused(400, "expected {\"names\": [unit KB names], \"build\": build id}")
    wanted = {n for n in names if parse_unit_kb_name(n)}
    if len(wanted) != len(set(names)):
        raise Refused(400, "only unit KBs of distributed builds (rd-...) can be released")
    gone = []
    now = time.time()
    for root in roots:
        r = Path(root)
        if not r.is_dir():
            continue
        for d in r.iterdir():
            parsed = parse_unit_kb_name(d.name)
            if not parsed or d.is_symlink() or not d.is_dir():
                continue
            stale = now - max((f.stat().st_mtime for f in d.iterdir()), default=d.stat().st_mtime) > ttl_s
            if d.name in wanted or (build and parsed[0] == build) or stale:
                shutil.rmtree(d, ignore_errors=True)
                gone.append(d.name)
    return gone
