"""Work units of a distributed KB build: which prompts, which seeds, which name on a worker.

A unit is a contiguous slice of the cleaned prompt list. Seeds depend only on a prompt's
global position (range mode: seed + global index; fixed mode: the seed), so the KB does not
depend on which worker built which unit, and a unit starting at global index `a` is built by
the Builder node with seed `seed + a` (range) or `seed` (fixed).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

from ..errors import KBError

# KBs a build makes on a worker: rd-<build id>-<run>-u<unit>-a<attempt> and rd-<build id>-<run>-probe.
# The prefix keeps them apart from users' KBs; the run id (new for every coordinator start) and
# the attempt number keep a retried unit from resuming a stale folder or hitting ComfyUI's cache.
UNIT_NAME_RE = re.compile(r"^rd-([0-9a-f]{12})-([0-9a-f]{6})-(probe|u(\d{5})-a(\d{1,4}))$")


@dataclass(frozen=True)
class Unit:
    uid: int
    start: int  # global index of the first prompt
    prompts: tuple[str, ...]
    seed: int  # the Builder node's seed input for this unit

    @property
    def count(self) -> int:
        return len(self.prompts)

    def seeds(self, seed_mode: str) -> list[int]:
        return [self.seed + j if seed_mode == "range" else self.seed for j in range(self.count)]

    def prompts_hash(self) -> str:
        return hashlib.sha256(json.dumps(list(self.prompts)).encode()).hexdigest()[:16]

    def record(self) -> dict:
        """What the KB stores about the unit, so a resumed build can check it is the same unit."""
        return {"unit": self.uid, "start": self.start, "count": self.count, "prompts_hash": self.prompts_hash()}


def plan_units(prompts: list[str], unit_size: int, seed_mode: str, seed: int) -> list[Unit]:
    """Split cleaned prompts into units of `unit_size` (the last one may be shorter)."""
    if unit_size < 1:
        raise KBError(f"unit size must be at least 1, not {unit_size}")
    if seed_mode not in ("fixed", "range"):
        raise KBError(f"seed_mode must be 'fixed' or 'range', not {seed_mode!r}")
    units = []
    for uid, a in enumerate(range(0, len(prompts), unit_size)):
        units.append(Unit(uid, a, tuple(prompts[a : a + unit_size]), seed + a if seed_mode == "range" else seed))
    return units


def build_id(settings: dict, prompts: list[str], unit_size: int) -> str:
    """Stable id of a build (same command -> same id), used to namespace its unit KBs on workers."""
    blob = json.dumps({"settings": settings, "prompts": prompts, "unit_size": unit_size}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def unit_kb_name(bid: str, run: str, uid: int, attempt: int) -> str:
    return f"rd-{bid}-{run}-u{uid:05d}-a{attempt}"


def probe_kb_name(bid: str, run: str) -> str:
    return f"rd-{bid}-{run}-probe"


def parse_unit_kb_name(name: str) -> tuple[str, str, int, int] | None:
    """(build id, run id, unit, attempt) of a build's KB name (unit -1 for a probe), or None."""
    m = UNIT_NAME_RE.match(name)
    if not m:
        return None
    return (m.group(1), m.group(2), -1, 0) if m.group(3) == "probe" else (m.group(1), m.group(2), int(m.group(4)), int(m.group(5)))


def check_held(units: list[Unit], held: dict[int, dict]) -> list[str]:
    """Problems with the units a KB already holds, against this plan (empty: resume is safe)."""
    by_id = {u.uid: u for u in units}
    problems = []
    for uid, rec in sorted(held.items()):
        u = by_id.get(uid)
        if u is None:
            problems.append(f"unit {uid} is not part of this plan ({len(units)} units)")
        elif {k: rec.get(k) for k in ("start", "count", "prompts_hash")} != {k: v for k, v in u.record().items() if k != "unit"}:
            problems.append(f"unit {uid} holds prompts {rec.get('start')}..+{rec.get('count')} of another prompt list or unit size")
    return problems
