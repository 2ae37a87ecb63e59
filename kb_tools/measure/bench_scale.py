"""`python -m kb_tools bench-scale`: a KB of a given size written through the real writer,
then timed the way a user meets it. Prints one markdown table row (and JSON).

The trajectories are synthetic but structured: every entry's latents are a smooth low-rank
field (256 clusters of coefficients over 16 smooth basis images per step) plus per-entry
full-resolution noise, so pooling loses real information and neighbours are not trivial.
Queries are fresh entries of the same generator (not stored in the KB).

Measured, in this order:
  write     every append of the build (bounded batches), total seconds and disk size
  open      KnowledgeBase.open in a fresh process, and that process's RSS after it
  cold      the first retrieve() after open (reads the reduced keys, builds the index)
  warm      median retrieve() of the next queries, H=1 and H=4 (search + re-rank on full
            keys + value reads + least-squares blend: the node's whole retrieval step)
  append    one append of 32 entries to the finished KB
  recall    recall@1 and recall@4 of kb.search against brute-force search on full keys
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ..storage.commit_log import listed_files
from ..storage.disk_format import Entry, Fingerprint
from ..storage.writer import append_batch, create_kb, default_shard_rows

RANK, CLUSTERS, NOISE = 16, 256, 0.15


class Generator:
    """Deterministic structured trajectories for a latent shape and stored steps."""

    def __init__(self, shape: tuple[int, int, int], steps: tuple[int, ...], seed: int = 0):
        self.shape, self.steps = shape, steps
        rng = np.random.default_rng(seed)
        c, h, w = shape
        lo = (c, max(1, h // 8), max(1, w // 8))
        self.basis = {}
        for s in steps:
            b = rng.normal(size=(RANK, *lo)).astype(np.float32)
            b = np.repeat(np.repeat(b, h // lo[1], axis=2), w // lo[2], axis=3)  # smooth (blocky) images
            self.basis[s] = b.reshape(RANK, -1) / np.sqrt(RANK)
        self.centers = rng.normal(size=(CLUSTERS, RANK)).astype(np.float32)

    def batch(self, first: int, n: int, salt: int = 0) -> tuple[dict, dict]:
        rng = np.random.default_rng([first, n, salt])
        coef = self.centers[rng.integers(0, CLUSTERS, n)] + 0.3 * rng.normal(size=(n, RANK)).astype(np.float32)
        x, d = {}, {}
        for i, s in enumerate(self.steps):
            base = coef @ self.basis[s]
            noise = rng.standard_normal(size=base.shape, dtype=np.float32)
            x[s] = (base + NOISE * (1 + i) * noise).reshape(n, *self.shape)
            d[s] = (0.5 * base).reshape(n, *self.shape)
        return x, d


def _fingerprint(shape: tuple[int, int, int], steps: tuple[int, ...]) -> Fingerprint:
    return Fingerprint(model_hash="bench-scale", model_name="synthetic", latent_shape=shape, sampler="euler",
                       scheduler="normal", steps=20, cfg=6.0, stored_steps=steps, seed_mode="fixed", seed=0)


def write_kb(path: Path, shape, steps, entries: int, batch: int, dtype: str) -> float:
    fp = _fingerprint(shape, steps)
    create_kb(path, fp, dtype=dtype)
    gen = Generator(shape, steps)
    batch = batch or default_shard_rows(fp, dtype)
    t0 = time.perf_counter()
    for first in range(0, entries, batch):
        n = min(batch, entries - first)
        x, d = gen.batch(first, n)
        append_batch(path, x, d, [Entry(f"synthetic prompt {first + j}", 0, first + j) for j in range(n)])
        if sys.stdout.isatty():
            print(f"\r  wrote {first + n}/{entries}", end="", flush=True)
    return time.perf_counter() - t0


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def probe(path: Path, queries: int) -> dict:
    """Run in a fresh process: open, query, append; returns the timings."""
    from ..storage.knowledge_base import KnowledgeBase
    try:  # inside the pack
        from ...redi_core.retrieval import KeyState, ReDiParams, retrieve
    except ImportError:  # the repository root on sys.path (the CLI)
        from redi_core.retrieval import KeyState, ReDiParams, retrieve

    rss0 = _rss_mb()
    t0 = time.perf_counter()
    kb = KnowledgeBase.open(path)
    open_s = time.perf_counter() - t0
    rss_open = _rss_mb()
    fp = kb.fingerprint
    k, v = fp.stored_steps[0], fp.stored_steps[-1]
    gen = Generator(fp.latent_shape, fp.stored_steps)
    qx, qd = gen.batch(0, queries + 1, salt=7)
    out = {"open_s": open_s, "rss_before_open_mb": rss0, "rss_after_open_mb": rss_open}

    def one(i: int, h: int) -> float:
        st = KeyState(qx[k][i : i + 1], qd[k][i : i + 1], np.zeros_like(qx[k][i : i + 1]))
        t = time.perf_counter()
        retrieve(kb, st, ReDiParams(k, v, h), sigma_v=1.0)
        return time.perf_counter() - t

    out["cold_query_s"] = one(queries, 4)
    out["rss_after_first_query_mb"] = _rss_mb()
    for h in (1, 4):
        out[f"warm_h{h}_ms"] = float(np.median([one(i, h) for i in range(queries)]) * 1000)
    q = qx[k][: min(queries, 20)].reshape(min(queries, 20), -1)
    _, got = kb.search("latent", k, q, 4)
    _, exact = kb.exact_search("latent", k, q, 4)
    out["recall@1"] = float((got[:, 0] == exact[:, 0]).mean())
    out["recall@4"] = float(np.mean([len(set(g) & set(e)) / 4 for g, e in zip(got, exact)]))
    out["recall_queries"] = len(q)
    x, d = gen.batch(10**9, 32, salt=3)
    t = time.perf_counter()
    append_batch(path, x, d, [Entry(f"appended {j}", 0, len(kb) + j) for j in range(32)])
    out["append32_s"] = time.perf_counter() - t
    return out


def run(args) -> None:
    if getattr(args, "probe", None):
        print(json.dumps(probe(Path(args.probe), args.queries)))
        return
    shape = tuple(int(v) for v in args.latent.lower().split("x"))
    steps = tuple(sorted(int(v) for v in args.stored_steps.split(",")))
    path = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="kb_bench_")) / "kb"
    if path.exists() and any(path.iterdir()):
        raise SystemExit(f"{path} is not empty; give a new folder to --keep")
    try:
        write_s = write_kb(path, shape, steps, args.entries, args.batch, args.dtype)
        size = sum((path / f).stat().st_size for f in listed_files(path))
        res = subprocess.run([sys.executable, "-m", "kb_tools", "bench-scale", "--probe", str(path), "--queries", str(args.queries)],
                             capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])  # the repository root
        if res.returncode:
            raise SystemExit(f"probe failed:\n{res.stderr[-2000:]}")
        p = json.loads(res.stdout.strip().splitlines()[-1])
    finally:
        if not args.keep:
            shutil.rmtree(path.parent, ignore_errors=True)
    row = {"latent": args.latent, "entries": args.entries, "stored_steps": list(steps), "dtype": args.dtype,
           "disk_gb": size / 1e9, "write_s": write_s, **p}
    print(json.dumps(row))
    print("\n| latent | entries | disk | write | open | RSS after open | cold query | warm H=1 | warm H=4 | append 32 | recall@1 | recall@4 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.latent} | {args.entries:,} | {row['disk_gb']:.2f} GB | {write_s:.0f} s | {p['open_s']:.2f} s | "
          f"{p['rss_after_open_mb']:.0f} MB | {p['cold_query_s']:.2f} s | {p['warm_h1_ms']:.2f} ms | {p['warm_h4_ms']:.2f} ms | "
          f"{p['append32_s']:.3f} s | {p['recall@1']:.2f} | {p['recall@4']:.2f} |")
    if args.keep:
        print(f"KB kept in {path} (python -m kb_tools inspect|validate|query {path})")
