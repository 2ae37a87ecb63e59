"""Throughput of `kb_tools build --workers` against the number of workers W.

Starts local ComfyUI servers (this checkout's .host/ComfyUI with the pack), or uses the
servers given with --urls, builds the same prompts with W = 1, 2, ... workers, and prints
trajectories per minute (wall clock of the whole build, probes included) with a plot.

    .venv/bin/python scripts/bench_distributed.py --workers 1,2,3 --prompts 48
    .venv/bin/python scripts/bench_distributed.py --urls http://gpu:8188,http://gpu:8189 --workers 1,2 --steps 20

Every local server is a separate process with its own model copy; on a CPU-only machine they
share the cores, so the curve shows how the coordinator scales, not what more machines give.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kb_tools.distributed import build as dist_build  # noqa: E402
from redi_demo import workflows  # noqa: E402
from redi_demo.comfy_server import ComfyServer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", default="1,2,3", help="worker counts to measure")
    ap.add_argument("--urls", default="", help="use these running servers instead of starting local ones")
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--unit-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--stored-steps", default="2,4")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--ckpt", default=workflows.CKPT)
    ap.add_argument("--threads", type=int, default=0, help="OMP/torch threads per local server (0: torch's default)")
    ap.add_argument("--plot", default=str(ROOT / "docs" / "distributed_throughput.png"))
    args = ap.parse_args()
    counts = [int(w) for w in args.workers.split(",")]
    prompts = workflows.kb_prompts(args.prompts, seed=5).splitlines()
    settings = dist_build.Settings(ckpt=args.ckpt, steps=args.steps, stored_steps=args.stored_steps, batch_size=args.unit_size,
                                   seed_mode="range", seed=1, width=args.size, height=args.size)
    limits = dist_build.Limits(unit_size=args.unit_size, unit_timeout=1800)
    tmp = Path(tempfile.mkdtemp(prefix="bench_dist_"))
    servers: list[ComfyServer] = []
    try:
        if args.urls:
            urls = [u.strip() for u in args.urls.split(",") if u.strip()]
        else:
            if args.threads:
                os.environ["OMP_NUM_THREADS"] = str(args.threads)
            servers = [ComfyServer(tmp / f"w{i}", sys.executable) for i in range(max(counts))]
            for s in servers:
                s.launch()
            for s in servers:
                s.wait_ready()
            urls = [s.base for s in servers]
        if len(urls) < max(counts):
            raise SystemExit(f"--workers asks for {max(counts)} workers, only {len(urls)} URLs")
        rows = []
        for w in counts:
            out = tmp / f"kb_w{w}"
            t0 = time.monotonic()
            coord = dist_build.Coordinator(urls[:w], settings, prompts, out, limits, log=lambda m: None)
            sched = coord.run_build()
            wall = time.monotonic() - t0
            per_min = 60.0 * len(prompts) / wall
            rows.append((w, len(prompts), wall, per_min, sum(s.failures for s in sched.stats.values())))
            print(f"W={w}: {len(prompts)} trajectories in {wall:.1f} s = {per_min:.1f}/min", flush=True)
            shutil.rmtree(out, ignore_errors=True)
    finally:
        for s in servers:
            s.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {'CUDA' if _has_cuda() else 'no GPU'}"
    print(f"\nmachine: {machine}; {args.prompts} prompts, {args.steps} steps, {args.size}x{args.size}, unit size {args.unit_size}")
    print("| workers | trajectories | wall s | trajectories/min | speed-up | failures |")
    print("|---|---|---|---|---|---|")
    for w, n, wall, per_min, fails in rows:
        print(f"| {w} | {n} | {wall:.1f} | {per_min:.1f} | {per_min / rows[0][3]:.2f}x | {fails} |")
    _plot(rows, machine, Path(args.plot))


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _plot(rows, machine: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=110)
    ws = [r[0] for r in rows]
    ax.plot(ws, [r[3] for r in rows], "o-", label="measured")
    ax.plot(ws, [rows[0][3] * w for w in ws], "--", color="grey", label="linear")
    ax.set_xlabel("workers (ComfyUI servers)")
    ax.set_ylabel("trajectories / minute")
    ax.set_xticks(ws)
    ax.set_title(f"kb_tools build --workers\n{machine}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
