"""Which fingerprint fields must agree for two builds (or shards) to share one knowledge base."""

from __future__ import annotations

from .disk_format import Fingerprint

COMPAT_FIELDS = ("model_hash", "latent_shape", "sampler", "scheduler", "steps", "cfg", "stored_steps", "seed_mode", "negative_hash", "sampling", "negative_cond")


def incompatible(a: Fingerprint, b: Fingerprint) -> list[str]:
    """Fingerprint fields that keep two builds or shards out of one KB."""
    bad = a.mismatches(b, COMPAT_FIELDS)
    if a.seed_mode == "fixed" and a.seed != b.seed:
        bad.append("seed")
    return bad
