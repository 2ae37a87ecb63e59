"""The distributed build's only contact with the KB storage format.

    listed_files(kb_dir)        the files a KB's manifest lists (what the file route may serve)
    unit_files(manifest)        which files of a unit KB to download (manifest first)
    read_unit(dir)              open and fully verify a downloaded unit KB -> (fingerprint, entries)
    open_target(out, fp, n)     create (or reopen) the build's KB
    units_held(out)             {unit id: unit record} the KB already holds
    add_unit(out, dir, unit)    append a verified unit under its unit id (atomic, once)
    finalize(out)               order entries by unit (= the single-process order), write indexes

Format v1: a unit's shards are moved into the KB under the next shard numbers and their
manifest records carry the unit record ({"unit", "start", "count", "prompts_hash"}); the
manifest is rewritten atomically after the shards are in place, so a kill in between leaves
only unlisted shards, which the next open deletes.
"""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path

from . import kb_format
from .builder import COMPAT_FIELDS
from .dist_plan import Unit
from .errors import KBError
from .kb_format import Entry, Fingerprint, Manifest
from .knowledge_base import KnowledgeBase

PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_lock = threading.Lock()  # one writer per process; the coordinator is the only writer of its KB


def listed_files(kb_dir: Path) -> set[str]:
    """The manifest and the files it lists (plain names). v1 does not list its faiss indexes,
    so they are not served (a unit's indexes are rebuilt by the build's KB anyway)."""
    return {kb_format.MANIFEST, *unit_files((Path(kb_dir) / kb_format.MANIFEST).read_bytes())}


def unit_files(manifest_bytes: bytes) -> list[str]:
    """Files a unit KB's manifest lists (plain names only), to download after the manifest."""
    try:
        data = json.loads(manifest_bytes)
        names = [s["file"] for s in data["shards"]]
    except (ValueError, KeyError, TypeError) as e:
        raise KBError(f"the unit's manifest is not a valid KB manifest ({e})") from e
    bad = [n for n in names if not isinstance(n, str) or not PLAIN_NAME.match(n) or n == kb_format.MANIFEST]
    if bad:
        raise KBError(f"the unit's manifest lists files with unsafe names: {bad[:3]}")
    return names


def read_unit(unit_dir: Path) -> tuple[Fingerprint, list[Entry]]:
    """Every checksum, shape and value of a downloaded unit KB checked; KBError otherwise."""
    kb = KnowledgeBase.load(unit_dir, check_hash=True)  # checksums, shapes, entry counts, finite values
    return kb.fingerprint, kb.entries


def open_target(out: Path, fp: Fingerprint, planned: int) -> None:
    """Create the build's KB, or reopen it for a resumed build (same fingerprint required)."""
    out = Path(out)
    with _lock:
        if (out / kb_format.MANIFEST).is_file():
            m = kb_format.read_manifest(out)
            bad = [f for f in ("model_hash", "model_name", *COMPAT_FIELDS) if getattr(m.fingerprint, f) != getattr(fp, f)]
            if m.fingerprint.seed != fp.seed:
                bad.append("seed")
            if bad:
                diffs = ", ".join(f"{f}: KB has {getattr(m.fingerprint, f)!r}, build has {getattr(fp, f)!r}" for f in bad)
                raise KBError(f"{out} already holds a KB with other settings ({diffs}); choose another --out or match its settings")
            if any("unit" not in s for s in m.shards):
                raise KBError(f"{out} holds entries that were not built as units of a distributed build; choose another --out")
            _remove_orphans(out, m)
            m.planned = planned
        else:
            out.mkdir(parents=True, exist_ok=True)
            m = Manifest(fp, [], planned)
        kb_format.write_manifest(out, m)


def read_fingerprint(out: Path) -> Fingerprint:
    return kb_format.read_manifest(Path(out)).fingerprint


def units_held(out: Path) -> dict[int, dict]:
    m = kb_format.read_manifest(Path(out))
    held: dict[int, dict] = {}
    for s in m.shards:
        rec = held.setdefault(int(s["unit"]), {k: s[k] for k in ("unit", "start", "prompts_hash")} | {"count": 0})
        rec["count"] += int(s["count"])
    return held


def add_unit(out: Path, unit_dir: Path, unit: Unit) -> bool:
    """Move a verified unit's shards into the KB under `unit.uid`; False if it is already held."""
    out, unit_dir = Path(out), Path(unit_dir)
    src = kb_format.read_manifest(unit_dir)
    with _lock:
        m = kb_format.read_manifest(out)
        if any(int(s["unit"]) == unit.uid for s in m.shards):
            return False
        taken = {s["file"] for s in m.shards}
        n = len(m.shards)
        new = []
        for rec in src.shards:
            while f"shard_{n:05d}.safetensors" in taken:
                n += 1
            name = f"shard_{n:05d}.safetensors"
            n += 1
            os.replace(unit_dir / rec["file"], out / name)
            new.append({"file": name, "count": rec["count"], "sha256": rec["sha256"], **{k: v for k, v in unit.record().items() if k != "count"}})
        m.shards.extend(new)
        kb_format.write_manifest(out, m)
        return True


def finalize(out: Path) -> int:
    """Order the shards by unit (so entry i is global prompt i), end the build, write indexes."""
    out = Path(out)
    with _lock:
        m = kb_format.read_manifest(out)
        m.shards.sort(key=lambda s: (int(s["unit"]), s["file"]))
        m.planned = 0
        kb_format.write_manifest(out, m)
    KnowledgeBase.load(out, check_hash=False).write_indexes()
    return m.count


def _remove_orphans(out: Path, m: Manifest) -> None:
    listed = {s["file"] for s in m.shards}
    for f in out.glob("shard_*.safetensors"):
        if f.name not in listed:
            f.unlink()
    for f in out.glob(".*.tmp"):
        f.unlink()
