"""The distributed build's only contact with the KB storage format (v2, kb_tools.storage.writer).

    listed_files(kb_dir)        the files a KB consists of now (what the file route may serve)
    first_files / rest_files    which files of a unit KB to download, in order
    read_unit(dir)              fully verify a downloaded unit KB -> (fingerprint, entries, dtype)
    open_target(out, fp, dtype) create (or reopen) the build's KB
    units_held(out)             {unit: unit record} the KB already holds
    read_fingerprint(out)       the build KB's fingerprint
    add_unit(out, dir, unit)    append a verified unit under its unit id (atomic, once)
    finalize(out)               check the finished KB; returns its entry count

A unit's id in the KB log is "u<unit>@<first prompt>+<count>#<prompts hash>", so a resumed
build can tell that the units a KB holds belong to the same plan. Entries keep their global
prompt position (`pos`); their order in the KB is commit order (units finish out of order).
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import KBError
from ..storage import commit_log as kb_log
from ..storage import disk_format as kb_format
from ..storage.disk_format import Entry, Fingerprint
from ..storage.validate import validate_kb
from ..storage.writer import append_kb, create_kb
from .plan import Unit

PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
UNIT_ID_RE = re.compile(r"^u(\d+)@(\d+)\+(\d+)#([0-9a-f]{16})$")


def unit_id(unit: Unit) -> str:
    return f"u{unit.uid}@{unit.start}+{unit.count}#{unit.prompts_hash()}"


def listed_files(kb_dir: Path) -> set[str]:
    return set(kb_log.listed_files(Path(kb_dir)))


def first_files() -> list[str]:
    """Downloaded first: they say which other files the unit consists of."""
    return [kb_format.MANIFEST, kb_format.LOG]


def rest_files(unit_dir: Path) -> list[str]:
    """The other files a downloaded unit's manifest and log list (plain names only)."""
    try:
        names = [n for n in kb_log.listed_files(Path(unit_dir)) if n not in first_files()]
    except (KBError, OSError, ValueError) as e:
        raise KBError(f"the unit's manifest or log is not valid ({e})") from e
    bad = [n for n in names if not isinstance(n, str) or not PLAIN_NAME.match(n)]
    if bad:
        raise KBError(f"the unit's log lists files with unsafe names: {bad[:3]}")
    return names


def read_unit(unit_dir: Path) -> tuple[Fingerprint, list[Entry], str]:
    """Every checksum, row, shape and value of a downloaded unit KB checked; KBError otherwise."""
    validate_kb(unit_dir)
    from ..storage.knowledge_base import KnowledgeBase

    kb = KnowledgeBase.open(unit_dir)
    try:
        return kb.fingerprint, list(kb.entries), kb.header.dtype
    finally:
        kb.close()


def open_target(out: Path, fp: Fingerprint, dtype: str, negative_prompt: str | None = None) -> None:
    """Create the build's KB, or reopen it for a resumed build (same fingerprint required). A new KB
    keeps `negative_prompt`'s text when the fingerprint's negative_hash names it."""
    out = Path(out)
    header = create_kb(out, fp, dtype=dtype, negative_prompt=negative_prompt)
    if header.fingerprint.seed != fp.seed:
        raise KBError(f"{out} already holds a KB built from seed {header.fingerprint.seed}, this build uses {fp.seed}; "
                      "choose another --out or the same --seed")
    if header.dtype != dtype:
        raise KBError(f"{out} stores {header.dtype}, the workers build {dtype}; choose another --out")
    if kb_log.read_state(out, header).count and not units_held(out):
        raise KBError(f"{out} holds entries that were not built as units of a distributed build; choose another --out")


def read_fingerprint(out: Path) -> Fingerprint:
    return kb_format.read_header(Path(out)).fingerprint


def units_held(out: Path) -> dict[int, dict]:
    held: dict[int, dict] = {}
    for uid in kb_log.read_units(Path(out)):
        m = UNIT_ID_RE.match(uid)
        if not m:
            raise KBError(f"{out} holds a unit {uid!r} that this build did not make; choose another --out")
        held[int(m.group(1))] = {"unit": int(m.group(1)), "start": int(m.group(2)), "count": int(m.group(3)), "prompts_hash": m.group(4)}
    return held


def add_unit(out: Path, unit_dir: Path, unit: Unit) -> bool:
    """Append a verified unit to the KB as one atomic step; False if it already holds it."""
    return append_kb(Path(out), Path(unit_dir), unit=unit_id(unit), first_pos=unit.start)


def finalize(out: Path) -> int:
    return kb_log.read_state(Path(out)).count
