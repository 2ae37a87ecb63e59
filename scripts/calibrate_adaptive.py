"""Measure retrieval distance against image quality per value step, at random seeds, to set the
speed presets' tiers (redi_core/adaptive.py PRESETS).

    .venv/bin/python scripts/calibrate_adaptive.py --kb 200 --queries 60 --out out/calibrate

A library KB is filled with full trajectories of one session stream (scripts/bench_learning.py),
then queries of another stream at new seeds run the key phase (k=3), find their nearest stored
trajectory (denoised keys) and are finished from every candidate value step; each result's PSNR
to the query's own full run is recorded with the nearest distance. Prints, per value step, the
largest distance bound under which no image (and at most 1%) falls below 15 dB.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import bench_learning as bl  # noqa: E402

from redi_demo import evaluator  # noqa: E402

K, VALUES = 3, (8, 10, 12, 14, 16)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--kb", type=int, default=200)
    p.add_argument("--queries", type=int, default=60)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    s = bl.Session(args.out, "balanced", fresh=False)  # a stopped calibration continues its KB
    lib = s.lib.Library(s.kb_root / bl.LIBRARY)
    rec = importlib_module("redi_accelerate.comfy_adapter.recording")
    fp = rec.run_fingerprint(s.model, (1, 4, 8, 8), bl.SAMPLER, bl.SCHEDULER, bl.STEPS, bl.CFG, s.negative)
    lkb = lib.find_or_create(fp)
    stored = lkb.fingerprint.stored_steps
    ph = s.cs.Phases(s.model, bl.STEPS, bl.CFG, bl.SAMPLER, bl.SCHEDULER, s.negative, preview=False)
    stream = bl.session_stream(args.kb, 11)
    seeds = np.random.default_rng(12).integers(0, 2**31, size=args.kb).tolist()
    for i, (smp, seed) in enumerate(zip(stream, seeds)):
        if i < lkb.count:
            continue
        cond = s.kb_nodes.encode_batch(s.clip, [smp.prompt()])
        latent = torch.zeros(1, 4, 8, 8)
        x, d = ph.trajectory(cond, latent, s.cs.noise_for(latent, [seed]), [seed], stored)
        lkb, _ = lib.append(lkb, x, d, [s.lib.Entry(smp.prompt(), seed)], [f"{i:012x}"])
    kb = lib.open(lkb)
    from redi_core.blend import blend, lstsq_weights

    qs = bl.session_stream(args.queries, 21)
    qseeds = np.random.default_rng(22).integers(0, 2**31, size=args.queries).tolist()
    rows = []
    sig = ph.sigmas.float().tolist()
    for smp, seed in zip(qs, qseeds):
        cond = s.kb_nodes.encode_batch(s.clip, [smp.prompt()])
        latent = torch.zeros(1, 4, 8, 8)
        noise = s.cs.noise_for(latent, [seed])
        full = s.decode(ph.full(cond, latent, noise, seed).float().cpu())
        state = ph.key_phase(cond, latent, noise, seed, K)
        q = state.denoised.reshape(1, -1).astype(np.float32)
        dist, ids = kb.search("denoised", K, q, 1)
        rel = float(dist[0, 0]) / max(float(np.linalg.norm(q)), 1e-12)
        w, _ = lstsq_weights(kb.full_keys("denoised", K, ids[0]), q[0])
        row = {"distance": rel, "weight_sum": float(np.sum(w)), "psnr": {}}
        for v in VALUES:
            x_v = blend(kb.values("denoised", v, ids[0]), w) + np.float32(sig[v]) * state.eps[0]
            img = s.decode(ph.finish(cond, x_v[None], v, seed).float().cpu())
            row["psnr"][v] = float(evaluator.psnr(img, full)[0])
        rows.append(row)
        print(f"dist {rel:.3f} " + " ".join(f"v{v}:{row['psnr'][v]:.1f}" for v in VALUES), flush=True)
    summary = {}
    for v in VALUES:
        pts = sorted((r["distance"], r["psnr"][v]) for r in rows)
        safe0 = next((d for d, ps in pts if ps < 15), float("inf"))
        summary[v] = {"first_fail_distance": safe0, "fails": sum(ps < 15 for _, ps in pts),
                      "median_psnr_within_0.5": float(np.median([ps for d, ps in pts if d <= 0.5] or [float("nan")]))}
        print(f"v={v}: first image under 15 dB at distance {safe0:.3f}; {summary[v]['fails']} of {len(pts)} under 15 dB")
    (args.out / "calibration.json").write_text(json.dumps({"k": K, "rows": rows, "summary": summary}, indent=1) + "\n")


def importlib_module(name: str):
    import importlib

    return importlib.import_module(name)


if __name__ == "__main__":
    main()
