"""Wall-time overhead of recording: the stock KSampler with ReDi Record against without, in one
process on the demo model, runs alternated so that machine load hits both alike.

    .venv/bin/python scripts/bench_record_overhead.py --runs 20 [--out out/record_overhead.json]

Reports the median wall time of each (the generation as the queue sees it: the append itself runs
in the background thread afterwards) and, separately, the background append time per recorded
trajectory, which also costs CPU time on a busy machine.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from redi_demo import dataset, host  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    host.load_pack()
    import folder_paths

    import nodes

    root = Path(tempfile.mkdtemp(prefix="redi_record_overhead_"))
    folder_paths.add_model_folder_path("redi_kb", str(root), is_default=True)
    rr = importlib.import_module("redi_accelerate.nodes.redi_record")
    kbn = importlib.import_module("redi_accelerate.nodes.kb_nodes")
    lib = importlib.import_module("redi_accelerate.kb_tools.library")
    model, clip, _ = host.load_checkpoint(ROOT / "models" / "redi_demo_shapes.safetensors")
    neg = clip.encode_from_tokens(clip.tokenize(""), return_pooled=True)
    negative = [[neg[0], {}]]
    patched = rr.ReDiRecord.execute(model, "overhead", True).result[0]
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    prompts = [s.prompt() for s in dataset.random_samples(args.runs + 1, 77)]
    conds = [kbn.encode_batch(clip, [pr]) for pr in prompts]
    nodes.KSampler().sample(patched, 0, 20, 6.0, "euler", "normal", conds[-1], negative, latent)  # warm-up (and the KB's creation)
    lib.RECORDER.flush()
    plain, rec = [], []
    bg0 = lib.RECORDER.seconds
    for i in range(args.runs):
        for m, out in ((model, plain), (patched, rec)) if i % 2 == 0 else ((patched, rec), (model, plain)):
            t0 = time.perf_counter()
            nodes.KSampler().sample(m, 1000 + i, 20, 6.0, "euler", "normal", conds[i], negative, latent)
            out.append(time.perf_counter() - t0)
        lib.RECORDER.flush()
    bg = (lib.RECORDER.seconds - bg0) / args.runs
    res = {"runs": args.runs, "plain_median_s": float(np.median(plain)), "record_median_s": float(np.median(rec)),
           "overhead": float(np.median(rec) / np.median(plain) - 1), "paired_overhead_median": float(np.median(np.array(rec) / np.array(plain) - 1)),
           "background_append_s_per_trajectory": bg, "kb_trajectories": sum(k.count for k in lib.Library(root / "overhead").list())}
    print(json.dumps(res, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
