"""Resumable, appendable KB builds. The sampling itself is injected (`run_batch`),
so the node, the CLI and the tests share this one loop."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from .errors import KBError
from .storage import commit_log as kb_log
from .storage import disk_format as kb_format
from .storage import writer as kb_writer
from .storage.disk_format import Entry, Fingerprint, State

# (prompts, seeds) -> ({step: B x C x H x W latents}, {step: B x C x H x W denoised})
RunBatch = Callable[[list[str], list[int]], tuple[dict[int, np.ndarray], dict[int, np.ndarray]]]



def clean_prompts(prompts: list[str]) -> list[str]:
    """Strip whitespace, drop empty lines and `#` comments."""
    return [p.strip() for p in prompts if p.strip() and not p.strip().startswith("#")]


def build(
    kb_dir: Path,
    fp: Fingerprint,
    prompts: list[str],
    batch_size: int,
    run_batch: RunBatch,
    progress: Callable[[int, int], None] = lambda done, total: None,
    check_interrupt: Callable[[], None] = lambda: None,
    dtype: str = "float16",
    resumed: Callable[[int, int], None] = lambda stored, total: None,
    negative_prompt: str | None = None,
) -> State:
    """Add `prompts` to the KB at `kb_dir`, one commit per batch.

    If the KB's entries are a prefix of `prompts` (checked on the log's prompt hash chain,
    no shard is read), the build resumes after them (a killed build continues where it
    stopped); otherwise all of `prompts` are appended. Each batch is committed under the
    writer lock, so builds running at the same time on one KB all land.
    `check_interrupt` is called between batches and may raise to stop cleanly.
    `dtype` is the storage of a new KB (an existing KB keeps its own), `negative_prompt` the negative
    prompt's text that a new KB's manifest keeps (for the KB Loader's report).

    `progress(done, total)` counts the trajectories of `prompts`, those a resumed build finds already
    stored included (a resumed build starts from them, not from 0); `resumed(stored, total)` is called
    once, before sampling, when the KB already holds the first `stored` of the `total` prompts."""
    prompts = clean_prompts(prompts)
    if not prompts:
        raise KBError("no prompts given: enter one prompt per line (or a prompts file)")
    if batch_size < 1:
        raise KBError(f"batch size must be at least 1, not {batch_size}")
    kb_dir = Path(kb_dir)
    header = kb_writer.create_kb(kb_dir, fp, dtype=dtype, negative_prompt=negative_prompt)
    kb_writer.remove_orphans(kb_dir)
    tail = kb_log.read_tail_state(kb_dir, header)
    done = tail.count if tail.count <= len(prompts) and kb_format.prompt_chain(prompts[: tail.count]) == tail.chain else 0
    todo = prompts[done:] if done else prompts
    start = tail.count
    total = len(todo)
    if done:
        resumed(done, len(prompts))
    progress(done, done + total)
    for i in range(0, total, batch_size):
        check_interrupt()
        batch = todo[i : i + batch_size]
        first = start + i
        seeds = [fp.seed if fp.seed_mode == "fixed" else fp.seed + first + j for j in range(len(batch))]
        x, d = run_batch(batch, seeds)
        for s in fp.stored_steps:
            if not (np.isfinite(x[s]).all() and np.isfinite(d[s]).all()):
                raise KBError(f"the model produced NaN/inf latents at step {s}; this batch was not stored (check the model and cfg)")
        entries = [Entry(p, s, first + j) for j, (p, s) in enumerate(zip(batch, seeds))]
        tail = kb_writer.append_batch(kb_dir, x, d, entries, number=True)  # pos given under the writer lock
        progress(done + min(i + batch_size, total), done + total)
    return tail


def merge(out_dir: Path, sources: list[Path]) -> State:
    """Merge KBs built elsewhere into one new KB, refusing incompatible ones."""
    return kb_writer.merge(Path(out_dir), [Path(s) for s in sources])
