"""Rules a unit KB from a worker must pass before it joins the build's KB, and the check that
refuses a worker whose model or pack differs. Pure: fingerprints and entries in, problems out."""

from __future__ import annotations

from dataclasses import replace

from ..storage.compat import COMPAT_FIELDS
from ..storage.disk_format import Entry, Fingerprint
from .plan import Unit

# Everything a worker's probe must agree on with the build (the seed is the unit's own).
WORKER_FIELDS = ("model_hash", "model_name", *COMPAT_FIELDS)


def differences(ref: Fingerprint, got: Fingerprint, fields: tuple[str, ...] = WORKER_FIELDS) -> list[str]:
    """'field: build has A, worker has B' for every field that differs."""
    seen, out = set(), []
    for f in fields:
        if f in seen:
            continue
        seen.add(f)
        a, b = getattr(ref, f), getattr(got, f)
        if a != b:
            out.append(f"{f}: build has {a!r}, worker has {b!r}")
    return out


def build_fingerprint(probe: Fingerprint, seed: int) -> Fingerprint:
    """The build KB's fingerprint from a worker's probe: the probe's seed is its own unit's."""
    return replace(probe, seed=seed)


def unit_problems(ref: Fingerprint, unit: Unit, got: Fingerprint, entries: list[Entry]) -> list[str]:
    """Why a unit KB (already checked for checksums, shapes and finite values) cannot join the
    build KB: other settings or model, other prompts, other seeds, missing or extra entries."""
    problems = differences(ref, got)
    if got.seed != unit.seed:
        problems.append(f"seed: unit {unit.uid} must be built with seed {unit.seed}, the worker used {got.seed}")
    if len(entries) != unit.count:
        problems.append(f"unit {unit.uid} must hold {unit.count} entries, the worker sent {len(entries)}")
        return problems
    want_seeds = unit.seeds(ref.seed_mode)
    for j, (e, p, s) in enumerate(zip(entries, unit.prompts, want_seeds)):
        if e.prompt != p or e.seed != s:
            problems.append(f"entry {unit.start + j} is ({e.prompt!r}, seed {e.seed}), expected ({p!r}, seed {s})")
            break
    return problems
