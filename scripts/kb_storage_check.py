"""The benchmark's ReDi rows on one set of trajectories stored two ways (issue 12's "no worse" check).

    .venv/bin/python scripts/kb_storage_check.py [--kb-size 1000] [--queries 200] [--out out/kb_storage]

A KB is built once with float32 storage: the numbers a format-1 KB held, searched exactly (the
demo model's keys are 256 floats, so they are not pooled, and a KB of up to 8,192 entries uses
an exact flat index, as format 1 did). The same trajectories are then copied into a KB with the
default float16 storage. Both serve the benchmark's ReDi settings (same prompts, seeds, model
and scoring as scripts/benchmark.py); the table shows whether float16 storage and the format-2
reader move Frechet distance, accuracy, PSNR or UNet calls.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import benchmark  # noqa: E402

from kb_tools.storage.disk_format import Entry  # noqa: E402
from kb_tools.storage.knowledge_base import KnowledgeBase  # noqa: E402
from kb_tools.storage.writer import append_batch, create_kb  # noqa: E402

STORED = (3, 4, 6, 10, 12, 14)
CONFIGS = [(4, 10, 1), (3, 14, 1), (4, 10, 4)]


def copy_as(src: KnowledgeBase, dst: Path, dtype: str) -> KnowledgeBase:
    """The same trajectories, entries and order in a new KB with `dtype` storage."""
    if not (dst / "manifest.json").is_file():
        create_kb(dst, src.fingerprint, dtype=dtype)
        for a in range(0, len(src), 1024):
            ids = np.arange(a, min(a + 1024, len(src)))
            x = {s: src.values("latent", s, ids) for s in src.fingerprint.stored_steps}
            d = {s: src.values("denoised", s, ids) for s in src.fingerprint.stored_steps}
            append_batch(dst, x, d, [Entry(e.prompt, e.seed, e.pos) for e in src.entries[a : a + len(ids)]])
    return KnowledgeBase.open(dst)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kb-size", type=int, default=1000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--out", default=str(ROOT / "out" / "kb_storage"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    b = benchmark.Bench(out, args.queries, args.batch)
    path = out / "kb" / f"float32_{args.kb_size}"
    prompts = [s.prompt() for s in benchmark.dataset.random_samples(args.kb_size, 12345, styles=benchmark.dataset.STYLES)]
    b.kb_nodes.build_kb(b.model, b.clip, path, prompts, "", benchmark.SAMPLER, benchmark.SCHEDULER, benchmark.STEPS,
                        benchmark.CFG, 64, 64, 64, "fixed", benchmark.SEED, STORED, dtype="float32")
    kb32 = KnowledgeBase.open(path)
    kb16 = copy_as(kb32, out / "kb" / f"float16_{args.kb_size}", "float16")
    print(f"KBs: {len(kb32)} trajectories, float32 and float16 storage")
    for regime in ("same", "new"):
        imgs, wall, nfe = b.generate(b.full(benchmark.STEPS), regime)
        b.refs[regime] = imgs
        b.record("baseline", f"full {benchmark.STEPS} steps", imgs, wall, nfe, regime, regime)
    for k, v, h in CONFIGS:
        for name, kb in (("float32 (format 1's numbers)", kb32), ("float16 (format 2 default)", kb16)):
            imgs, wall, nfe = b.generate(b.redi(kb, k, v, h, "latent"), "same")
            b.record("ReDi", f"k={k} v={v} H={h}, {name}", imgs, wall, nfe, "same", "same")
    for name, kb in (("float32 (format 1's numbers)", kb32), ("float16 (format 2 default)", kb16)):
        imgs, wall, nfe = b.generate(b.redi(kb, 4, 10, 1, "denoised"), "new")
        b.record("ReDi seeds", f"k=4 v=10 denoised keys, {name}", imgs, wall, nfe, "new", "new")
    text = benchmark.table(b.rows)
    print("\n" + text)
    (out / "results.md").write_text(text + "\n")
    print(f"\nwrote {out / 'results.md'}")


if __name__ == "__main__":
    main()
