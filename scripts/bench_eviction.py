"""Does the library's eviction keep coverage? The rotation at the size cap keeps half of a KB chosen
by greedy k-center (kb_tools/library.py `k_center`); this measures that half against a random half
and the oldest and newest halves, by how close held-out queries at new seeds find their nearest
stored trajectory.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_eviction.py --out out/skip5000 --kb 5000

Needs the library KB and the test split of scripts/bench_skip.py (`measure --split test`). For each
half: the queries' nearest relative distance at the key step (median, 90th percentile, largest),
the share of queries within balanced's small-KB bounds (v=16 within 0.6, a jump at all within 1.2)
and the UNet calls that balanced would make with it. Writes OUT/eviction_kb{N}.json.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import bench_learning as bl  # noqa: E402
import bench_skip as bs  # noqa: E402

K = 2


def nearest(queries: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Each query's nearest relative distance (to the query's norm, as the retrieval measures it)."""
    q2 = (queries**2).sum(1)[:, None]
    d2 = np.maximum(q2 - 2 * queries @ keys.T + (keys**2).sum(1)[None, :], 0)
    return np.sqrt(d2.min(1)) / np.maximum(np.sqrt(q2[:, 0]), 1e-12)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--kb", type=int, default=5000)
    p.add_argument("--batch", type=int, default=25)
    args = p.parse_args(argv)
    s = bl.Session(args.out, "balanced", fresh=False)
    lib_mod = importlib.import_module("redi_accelerate.kb_tools.library")
    lib = s.lib.Library(s.kb_root / bs.LIBRARY, cap=args.kb + 1000)
    lkb = max(lib.list(), key=lambda x: x.count)
    kb = lib.open(lkb)
    n = len(kb.entries)
    stored = lkb.fingerprint.stored_steps
    rot_step = stored[len(stored) // 4]  # the step the rotation's k-center reads
    keys = kb.full_keys("denoised", K, np.arange(n)).reshape(n, -1).astype(np.float32)
    half = n // 2
    halves = {
        "k-center (the library's rotation)": np.sort(lib_mod.k_center(kb.full_keys("denoised", rot_step, np.arange(n)), half)),
        f"k-center on step-{K} keys": np.sort(lib_mod.k_center(keys, half)),
        "random half": np.sort(np.random.default_rng(0).choice(n, half, replace=False)),
        "oldest half": np.arange(half),
        "newest half": np.arange(n - half, n),
        f"whole KB ({n})": np.arange(n),
    }
    meta = json.loads((args.out / f"skip_test_kb{args.kb}.json").read_text())
    ph = s.cs.Phases(s.model, bl.STEPS, bl.CFG, bl.SAMPLER, bl.SCHEDULER, s.negative, preview=False)
    qs = []
    for lo in range(0, len(meta["prompts"]), args.batch):
        prompts, seeds = meta["prompts"][lo : lo + args.batch], meta["seeds"][lo : lo + args.batch]
        cond = s.kb_nodes.encode_batch(s.clip, prompts)
        latent = torch.zeros(len(prompts), 4, 8, 8)
        state = ph.key_phase(cond, latent, s.cs.noise_for(latent, seeds), seeds[0], K, seeds)
        qs.append(state.denoised.reshape(len(prompts), -1).astype(np.float32))
    q = np.concatenate(qs)
    out = {}
    print("| kept | median nearest | 90th pct | largest | within 0.6 | within 1.2 | balanced calls |\n|---|---|---|---|---|---|---|")
    for name, idx in halves.items():
        d = nearest(q, keys[idx])
        calls = np.where(d <= 0.6, K + 4, np.where(d <= 1.2, K + 6, bl.STEPS)) / bl.STEPS
        out[name] = {"median": float(np.median(d)), "p90": float(np.percentile(d, 90)), "max": float(d.max()),
                     "within_0.6": float((d <= 0.6).mean()), "within_1.2": float((d <= 1.2).mean()),
                     "calls": float(calls.mean()), "calls_se": float(calls.std(ddof=1) / np.sqrt(len(calls)))}
        r = out[name]
        print(f"| {name} | {r['median']:.3f} | {r['p90']:.3f} | {r['max']:.3f} | {100 * r['within_0.6']:.1f}% | "
              f"{100 * r['within_1.2']:.1f}% | {r['calls']:.3f} ± {r['calls_se']:.3f} |", flush=True)
    (args.out / f"eviction_kb{args.kb}.json").write_text(json.dumps({"queries": len(q), "key_step": K, "halves": out}, indent=1) + "\n")


if __name__ == "__main__":
    main()
