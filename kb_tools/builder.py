"""Resumable, appendable KB builds. The sampling itself is injected (`run_batch`),
so the node, the CLI and the tests share this one loop."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from . import kb_format
from .errors import KBError
from .kb_format import Entry, Fingerprint, Manifest
from .knowledge_base import KnowledgeBase

# (prompts, seeds) -> ({step: B x C x H x W latents}, {step: B x C x H x W denoised})
RunBatch = Callable[[list[str], list[int]], tuple[dict[int, np.ndarray], dict[int, np.ndarray]]]

# Fields that must agree for two builds (or shards) to share a KB.
COMPAT_FIELDS = ("model_hash", "latent_shape", "sampler", "scheduler", "steps", "cfg", "stored_steps", "seed_mode", "negative_hash", "sampling", "negative_cond")


def clean_prompts(prompts: list[str]) -> list[str]:
    """Strip whitespace, drop empty lines and `#` comments."""
    return [p.strip() for p in prompts if p.strip() and not p.strip().startswith("#")]


def incompatible(a: Fingerprint, b: Fingerprint) -> list[str]:
    """Fingerprint fields that keep two builds or shards out of one KB."""
    bad = a.mismatches(b, COMPAT_FIELDS)
    if a.seed_mode == "fixed" and a.seed != b.seed:
        bad.append("seed")
    return bad


def _open_or_create(kb_dir: Path, fp: Fingerprint) -> Manifest:
    if (kb_dir / kb_format.MANIFEST).is_file():
        manifest = kb_format.read_manifest(kb_dir)
        bad = incompatible(manifest.fingerprint, fp)
        if bad:
            diffs = ", ".join(f"{f}: KB has {getattr(manifest.fingerprint, f)!r}, request has {getattr(fp, f)!r}" for f in bad)
            raise KBError(f"KB {kb_dir.name} already exists with other settings ({diffs}); choose another KB name or match its settings")
        return manifest
    kb_dir.mkdir(parents=True, exist_ok=True)
    return Manifest(fp)


def _remove_orphans(kb_dir: Path, manifest: Manifest) -> None:
    """Shards a killed run wrote but never listed are dropped (their batch reruns)."""
    listed = {s["file"] for s in manifest.shards}
    for f in kb_dir.glob("shard_*.safetensors"):
        if f.name not in listed:
            f.unlink()
    for f in kb_dir.glob(".*.tmp"):
        f.unlink()


def _stored_prompts(kb_dir: Path, manifest: Manifest) -> list[str]:
    prompts = []
    for rec in manifest.shards:
        _, entries = kb_format.read_shard(kb_dir, rec, manifest.fingerprint, check_hash=False)
        prompts.extend(e.prompt for e in entries)
    return prompts


def build(
    kb_dir: Path,
    fp: Fingerprint,
    prompts: list[str],
    batch_size: int,
    run_batch: RunBatch,
    progress: Callable[[int, int], None] = lambda done, total: None,
    check_interrupt: Callable[[], None] = lambda: None,
) -> Manifest:
    """Add `prompts` to the KB at `kb_dir`, one shard per batch.

    If the KB's entries are a prefix of `prompts`, the build resumes after them (a
    killed build continues where it stopped); otherwise all of `prompts` are appended.
    `check_interrupt` is called between batches and may raise to stop cleanly."""
    prompts = clean_prompts(prompts)
    if not prompts:
        raise KBError("no prompts given: enter one prompt per line (or a prompts file)")
    if batch_size < 1:
        raise KBError(f"batch size must be at least 1, not {batch_size}")
    kb_dir = Path(kb_dir)
    manifest = _open_or_create(kb_dir, fp)
    _remove_orphans(kb_dir, manifest)
    stored = _stored_prompts(kb_dir, manifest) if manifest.shards else []
    todo = prompts[len(stored) :] if prompts[: len(stored)] == stored else prompts
    start = manifest.count
    total = len(todo)
    manifest.planned = start + total
    kb_format.write_manifest(kb_dir, manifest)
    progress(0, total)
    for i in range(0, total, batch_size):
        check_interrupt()
        batch = todo[i : i + batch_size]
        first = start + i
        seeds = [fp.seed if fp.seed_mode == "fixed" else fp.seed + first + j for j in range(len(batch))]
        x, d = run_batch(batch, seeds)
        for s in fp.stored_steps:
            if not (np.isfinite(x[s]).all() and np.isfinite(d[s]).all()):
                raise KBError(f"the model produced NaN/inf latents at step {s}; this batch was not stored (check the model and cfg)")
        rec = kb_format.write_shard(kb_dir, len(manifest.shards), fp, x, d, [Entry(p, s) for p, s in zip(batch, seeds)])
        manifest.shards.append(rec)
        kb_format.write_manifest(kb_dir, manifest)
        progress(min(i + batch_size, total), total)
    manifest.planned = 0
    kb_format.write_manifest(kb_dir, manifest)
    KnowledgeBase.load(kb_dir, check_hash=False).write_indexes()
    return manifest


def merge(out_dir: Path, sources: list[Path]) -> Manifest:
    """Merge KB shards built elsewhere into one new KB, refusing incompatible ones."""
    if not sources:
        raise KBError("merge needs at least one source KB")
    out_dir = Path(out_dir)
    if (out_dir / kb_format.MANIFEST).exists():
        raise KBError(f"{out_dir} already holds a KB; merge into a new name")
    kbs = [KnowledgeBase.load(s) for s in sources]
    fp0 = kbs[0].fingerprint
    for kb in kbs[1:]:
        bad = incompatible(kb.fingerprint, fp0)
        if bad:
            raise KBError(f"cannot merge {kb.name} into {kbs[0].name}: they differ in {', '.join(bad)}")
    out_dir.mkdir(parents=True)
    manifest = Manifest(fp0)
    for kb in kbs:
        rec = kb_format.write_shard(out_dir, len(manifest.shards), fp0, kb.x, kb.d, kb.entries)
        manifest.shards.append(rec)
    kb_format.write_manifest(out_dir, manifest)
    KnowledgeBase.load(out_dir, check_hash=False).write_indexes()
    return manifest
