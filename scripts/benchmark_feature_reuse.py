"""FeatureReuse against fewer steps and EasyCache, on a compute-honest footing.

    .venv/bin/python scripts/benchmark_feature_reuse.py [--queries 100] [--batch 50] [--kb-size 300] [--out out/bench_fr]
    .venv/bin/python scripts/benchmark_feature_reuse.py --sd15-only out/sd15_times_256.json   # per-call times only
    .venv/bin/python scripts/benchmark_feature_reuse.py --sd15-runs out/sd15_runs_256.json   # whole-run check of them

Every setting runs the same queries on the demo model (euler, 20 steps, cfg 6, the KB's fixed
seed) and gets, in one table (OUT/results.md, OUT/results.json) and one plot
(OUT/pareto.png, quality against the SD1.5-size cost):
  - compute: the fraction of the full run's UNet FLOPs actually executed, counted during the
    run (network calls that reached the UNet, and FeatureReuse's own per-block reuse counts),
    each block weighted by its FLOPs from torch's FlopCounterMode; for the demo UNet and for
    an SD1.5-size UNet;
  - demo cost: the process CPU time of the run over the full run's (one torch thread, so the
    figure holds on a shared machine), and the wall-time ratio beside it;
  - SD1.5 cost: an SD1.5-size UNet (random weights, 256x256 by default) is timed per call kind
    (full call; FeatureReuse keyframe, reuse and jump calls of each order; the sampler's
    per-step overhead), and each setting's cost is its call counts from the demo run times
    those measured per-call times, over 20 full calls. (A 20-step run per setting at that size
    does not fit this machine's budget; the per-call times are measured on the real patch.)
  - quality: evaluator accuracy, Frechet distance in the evaluator's feature space against
    real dataset images, PSNR to the full run of the same prompt and seed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import bench_report  # noqa: E402
import benchmark as B  # noqa: E402

from redi_demo import paired_stats  # noqa: E402

STEPS = B.STEPS
FULL = f"full {STEPS} steps"
DEFAULT_NAME = "FR adaptive i3 o0 mix bias 1.0 thr 0.12"  # the node's defaults
OLD_DEFAULT_NAME = "FR fixed i2 o0 mix bias 0.8"  # the node's defaults before they were re-tuned at per-image seeds  # the row benchmark.Bench.record takes as the reference
PARTS = "input,middle,output"


# --- settings ------------------------------------------------------------------------------
def fr_settings() -> list[dict]:
    """FeatureReuse settings: (interval, schedule, order, mixing, start, threshold, mix bias)."""
    out = []
    for interval, schedule, order, mixing, start, thr, bias in [
        (2, "fixed", 0, False, 0.0, 0.0, 0.5), (2, "fixed", 0, True, 0.0, 0.0, 0.5), (3, "fixed", 0, False, 0.0, 0.0, 0.5),
        (3, "fixed", 0, True, 0.0, 0.0, 0.5), (2, "fixed", 1, False, 0.0, 0.0, 0.5), (3, "fixed", 1, False, 0.0, 0.0, 0.5),
        (3, "fixed", 2, False, 0.0, 0.0, 0.5), (3, "fixed", 1, True, 0.0, 0.0, 0.5), (4, "fixed", 1, False, 0.0, 0.0, 0.5),
        (4, "fixed", 2, False, 0.0, 0.0, 0.5), (3, "fixed", 1, False, 0.2, 0.0, 0.5),
        (4, "ramp", 0, False, 0.0, 0.0, 0.5), (3, "ramp", 1, False, 0.0, 0.0, 0.5), (4, "ramp", 1, False, 0.0, 0.0, 0.5),
        (5, "ramp", 1, False, 0.0, 0.0, 0.5), (4, "adaptive", 1, False, 0.0, 0.1, 0.5), (4, "adaptive", 1, False, 0.0, 0.2, 0.5),
        (6, "ramp", 0, False, 0.0, 0.0, 0.5), (8, "ramp", 0, False, 0.0, 0.0, 0.5),
        # score mixing switching late: the non-keyframe steps before the switch skip the network (as fewer steps
        # do), the last ones reuse features (the detail fewer steps lose)
        (2, "fixed", 0, True, 0.0, 0.0, 0.7), (2, "fixed", 0, True, 0.0, 0.0, 0.8), (2, "fixed", 0, True, 0.0, 0.0, 0.9),
        (2, "fixed", 0, True, 0.0, 0.0, 1.0), (2, "fixed", 1, True, 0.0, 0.0, 0.8),
        # the adaptive rule with late score mixing: early, a step is skipped (its score reused, as EasyCache
        # reuses its output change) while EasyCache's change estimate stays under the threshold, never more
        # than interval - 1 in a row; late, the non-keyframe steps reuse features
        (3, "adaptive", 0, True, 0.0, 0.1, 0.8), (3, "adaptive", 0, True, 0.0, 0.2, 0.8), (4, "adaptive", 0, True, 0.0, 0.2, 0.8),
        (4, "adaptive", 0, True, 0.0, 0.3, 0.8), (3, "adaptive", 0, True, 0.15, 0.2, 0.8), (3, "adaptive", 0, False, 0.0, 0.2, 0.5),
        (2, "fixed", 0, True, 0.15, 0.0, 0.8),
        (3, "adaptive", 0, True, 0.0, 0.12, 0.8), (3, "adaptive", 0, True, 0.0, 0.14, 0.8), (3, "adaptive", 0, True, 0.0, 0.16, 0.8),
        (4, "adaptive", 0, True, 0.0, 0.14, 0.8), (3, "adaptive", 0, True, 0.0, 0.14, 0.9), (3, "adaptive", 0, True, 0.0, 0.12, 1.0),
        (3, "adaptive", 0, True, 0.0, 0.11, 1.0), (3, "adaptive", 0, True, 0.0, 0.13, 1.0),
    ]:
        name = (f"FR {schedule} i{interval} o{order}" + (" mix" if mixing else "") + (f" bias {bias}" if mixing and bias != 0.5 else "")
                + (f" start {start}" if start else "") + (f" thr {thr}" if schedule == "adaptive" else ""))
        out.append({"name": name, "interval": interval, "schedule": schedule, "order": order, "mixing": mixing, "start": start,
                    "threshold": thr, "bias": bias})
    return out


def patch_fr(fr, model, s: dict):
    """FeatureReuse with setting s (its parts: the UNet's by default)."""
    return fr.ReDiFeatureReuse.execute(model, s["interval"], s["start"], 1.0, "all", s.get("parts", PARTS), s["mixing"], s.get("bias", 0.5),
                                       s["order"], s["schedule"], s["threshold"] or 0.15).result[0]


def fr_state(patched):
    import comfy.patcher_extension

    key = importlib.import_module("redi_accelerate.nodes.feature_reuse").WRAPPER_KEY
    return patched.wrappers[comfy.patcher_extension.WrappersMP.OUTER_SAMPLE][key][0].__self__.state


# --- counting what ran ---------------------------------------------------------------------
class Accounting:
    """Innermost wrappers: network calls that reached the UNet, and FeatureReuse's counts per run."""

    def __init__(self, state=None) -> None:
        self.state, self.net_calls, self.kinds, self.slot_skips, self.runs = state, 0, Counter(), Counter(), 0

    def attach(self, model):
        import comfy.patcher_extension as pe

        m = model.clone()
        m.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, "bench_accounting", self.outer)
        m.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "bench_accounting", self.dm)
        return m

    def outer(self, executor, *args, **kwargs):
        try:
            return executor(*args, **kwargs)
        finally:
            self.runs += 1
            if self.state is not None:
                self.kinds.update(self.state.calls)
                self.slot_skips.update(self.state.slot_skips)

    def dm(self, executor, *args, **kwargs):
        self.net_calls += 1
        return executor(*args, **kwargs)


def block_flops(diffusion_model, x: torch.Tensor, context: torch.Tensor) -> tuple[float, dict[str, float]]:
    """FLOPs of one UNet call and of each module (by path), from torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        diffusion_model(x, torch.full((x.shape[0],), 500.0), context=context, transformer_options={})
    counts = {k: float(sum(v.values())) for k, v in fc.get_flop_counts().items()}
    root = type(diffusion_model).__name__
    return counts[root], {k[len(root) + 1 :]: v for k, v in counts.items() if k.startswith(root + ".")}


def slot_flops(per_module: dict[str, float], slot: str) -> float:
    # a ResBlock slot reuses its in_layers; a transformer slot the whole spatial transformer
    return per_module.get(f"{slot}.in_layers", per_module.get(slot, 0.0))


# --- the SD1.5-size UNet -------------------------------------------------------------------
class CallTimer:
    """Outermost DIFFUSION_MODEL wrapper: CPU and wall time of each call, with FeatureReuse's mode."""

    def __init__(self, state=None) -> None:
        self.state, self.calls = state, []

    def __call__(self, executor, *args, **kwargs):
        c0, w0 = time.process_time(), time.perf_counter()
        out = executor(*args, **kwargs)
        self.calls.append((self.state.mode if self.state else "full", time.process_time() - c0, time.perf_counter() - w0))
        return out


def sd15_setup(size: int) -> tuple:
    """The SD1.5-size UNet (random weights), a fixed conditioning, an empty latent of `size` pixels and its noise."""
    import comfy.sample

    ctx = [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(0)) * 0.1, {}]]
    lat = torch.zeros(1, 4, size // 8, size // 8)
    return B.sd15_patcher(), ctx, lat, comfy.sample.prepare_noise(lat, 0)


def timed_sample(model, steps: int, noise, ctx, lat, scheduler: str, state=None) -> tuple[list, float]:
    """One euler run with every diffusion-model call timed (CallTimer): the calls and the run's CPU seconds."""
    import comfy.patcher_extension as pe
    import comfy.sample

    timer = CallTimer(state)
    m = model.clone()
    # outermost: FeatureReuse's own wrapper (mixing, forecasting of the score) is inside the timing
    m.wrappers.setdefault(pe.WrappersMP.DIFFUSION_MODEL, {})
    m.wrappers[pe.WrappersMP.DIFFUSION_MODEL] = {"bench_timer": [timer], **m.wrappers[pe.WrappersMP.DIFFUSION_MODEL]}
    c0 = time.process_time()
    comfy.sample.sample(m, noise, steps, B.CFG, "euler", scheduler, ctx, ctx, lat, disable_pbar=True)
    return timer.calls, time.process_time() - c0


def sd15_call_times(fr, size: int, orders: tuple[int, ...] = (0, 1, 2), known: dict | None = None) -> dict:
    """Per-call CPU seconds on the SD1.5-size UNet: a full call, the sampler's per-step
    overhead, and FeatureReuse's keyframe / reuse / jump calls for orders 0, 1, 2."""

    patcher, ctx, lat, noise = sd15_setup(size)

    def timed(model, steps, state=None):
        return timed_sample(model, steps, noise, ctx, lat, "normal", state)

    if known:  # a partial earlier measurement (the same size): add the missing orders
        out, jump = known, known["jump"]
    else:
        timed(patcher, 1)  # warm-up
        calls, total = timed(patcher, 2)
        full = float(np.median([c for _, c, _ in calls]))
        out = {"size": size, "full": full, "overhead_per_step": max(0.0, (total - sum(c for _, c, _ in calls)) / 2), "orders": {}}
        print(f"SD1.5-size {size}x{size}: full call {full:.2f}s CPU, sampler overhead {out['overhead_per_step']:.3f}s per step", flush=True)
        # mixing switching late: every step off the keyframe grid is a jump (no network call; a copy or a forecast)
        m = fr.ReDiFeatureReuse.execute(patcher, 2, 0.0, 1.0, "all", PARTS, True, 0.95, 0, "fixed", 0.15).result[0]
        jump = [c for kind, c, _ in timed(m, 4, fr_state(m))[0] if kind == "jump"][-1]  # normal, 4 steps: key, jump, key, jump
        out["jump"] = jump
    for order in orders:
        # interval 2: key, reuse, key, reuse, ...; the last reuse forecasts from `order` + 1 keyframes
        m = fr.ReDiFeatureReuse.execute(patcher, 2, 0.0, 1.0, "all", PARTS, False, 0.5, order, "fixed", 0.15).result[0]
        calls, _ = timed(m, 2 + 2 * order, fr_state(m))
        by = {k: [c for kind, c, _ in calls if kind == k] for k in ("key", "reuse")}
        out["orders"][order] = {"key": float(np.median(by["key"])), "reuse": by["reuse"][-1], "jump": jump}
        print(f"  FR order {order}: key {out['orders'][order]['key']:.2f}s, reuse {out['orders'][order]['reuse']:.2f}s, "
              f"jump {out['orders'][order]['jump']:.4f}s", flush=True)
    return out


# (row name, steps): fewer-steps rows, and FeatureReuse rows of fr_settings() by name
SD15_RUNS = [("euler 10 steps", 10), ("euler 11 steps", 11), ("FR fixed i2 o0 mix bias 0.8", STEPS), ("FR fixed i2 o0", STEPS)]


def sd15_runs(fr, size: int, reverse: bool = False) -> list[dict]:
    """Whole runs on the SD1.5-size UNet (random weights): wall and CPU time of each fixed-count
    setting over the full 20-step run's, to check the per-call cost model end to end."""
    import comfy.sample

    patcher, ctx, lat, noise = sd15_setup(size)
    settings = {s["name"]: s for s in fr_settings()}

    def timed(m, steps):
        c0, w0 = time.process_time(), time.perf_counter()
        comfy.sample.sample(m, noise, steps, B.CFG, "euler", "normal", ctx, ctx, lat, disable_pbar=True)
        return time.perf_counter() - w0, time.process_time() - c0

    timed(patcher, 1)  # warm-up
    order = [(FULL, STEPS)] + SD15_RUNS
    rows = {}
    for name, steps in order[::-1] if reverse else order:  # alternate rounds run in opposite orders: drift cancels
        m = patch_fr(fr, patcher, settings[name]) if name in settings else patcher
        wall, cpu = timed(m, steps)
        rows[name] = {"name": name, "steps": steps, "wall_s": wall, "cpu_s": cpu}
    rows = [rows[name] for name, _ in order]
    for r in rows:
        r["wall_ratio"], r["cpu_ratio"] = r["wall_s"] / rows[0]["wall_s"], r["cpu_s"] / rows[0]["cpu_s"]
        print(f"| {r['name']} | {r['wall_s']:.1f} | {r['wall_ratio']:.3f} | {r['cpu_ratio']:.3f} |", flush=True)
    return rows


def _spread(values: list[float]) -> dict:
    v = np.asarray(values, dtype=float)
    return {"median": float(np.median(v)), "min": float(v.min()), "max": float(v.max()), "n": len(v)}


def median_times(rounds: list[dict]) -> dict:
    """Per-call times over several rounds: the median of each kind, and each kind's spread under `spread`."""
    out = {"size": rounds[0]["size"], "rounds": len(rounds), "loadavg": os.getloadavg(), "orders": {}, "spread": {}}
    for key in ("full", "overhead_per_step", "jump"):
        out["spread"][key] = _spread([r[key] for r in rounds])
        out[key] = out["spread"][key]["median"]
    for o in rounds[0]["orders"]:
        out["orders"][o] = {}
        for key in ("key", "reuse", "jump"):
            sp = _spread([r["orders"][o][key] for r in rounds])
            out["spread"][f"order {o} {key}"] = sp
            out["orders"][o][key] = sp["median"]
    # the ratios the cost model uses, per round (load that hits a whole round cancels in a ratio)
    out["spread"]["key / full"] = _spread([r["orders"][0]["key"] / r["full"] for r in rounds])
    out["spread"]["reuse / key"] = _spread([r["orders"][0]["reuse"] / r["orders"][0]["key"] for r in rounds])
    return out


def median_rows(rounds: list[list[dict]]) -> list[dict]:
    """Whole-run timings over several rounds: each setting's median wall and CPU ratio to the full run of its round."""
    out = []
    for i, r in enumerate(rounds[0]):
        walls = [rd[i]["wall_s"] / rd[0]["wall_s"] for rd in rounds]
        cpus = [rd[i]["cpu_s"] / rd[0]["cpu_s"] for rd in rounds]
        out.append({"name": r["name"], "steps": r["steps"], "wall_s": float(np.median([rd[i]["wall_s"] for rd in rounds])),
                    "wall_ratio": _spread(walls)["median"], "cpu_ratio": _spread(cpus)["median"],
                    "wall_ratio_spread": _spread(walls), "cpu_ratio_spread": _spread(cpus)})
        print(f"| {r['name']} | {out[-1]['wall_s']:.1f} | {out[-1]['wall_ratio']:.3f} ({min(walls):.3f}-{max(walls):.3f}) | "
              f"{out[-1]['cpu_ratio']:.3f} |", flush=True)
    return out


def sd15_cost(row: dict, t: dict, per_run: float) -> float:
    """The setting's SD1.5-size CPU time over the full 20-step run's, from its call counts."""
    full = STEPS * (t["full"] + t["overhead_per_step"])
    steps = row["steps_per_run"]
    if row.get("fr_kinds"):
        k = {n: v / per_run for n, v in row["fr_kinds"].items()}
        o, key = t["orders"][row.get("order", 0)], t["orders"][0]["key"]
        # a keyframe does the same work in every order (the history keeps references); each order's
        # reuse call is taken relative to the keyframe timed in the same run, so that the load of the
        # shared machine during that run cancels out
        reuse = o["reuse"] * key / o["key"]
        cost = k.get("key", 0) * key + k.get("reuse", 0) * reuse + k.get("jump", 0) * o["jump"]
    else:
        net = row["net_calls"] / per_run
        cost = net * t["full"] + (row["nfe"] / per_run - net) * t["orders"][0]["jump"]  # EasyCache skips cost ~ a jump
    return (cost + steps * t["overhead_per_step"]) / full


def sd15_flops_fraction(row: dict, flops: tuple[float, dict], slots: list[str], per_run: float) -> float:
    """The same counts weighted by the SD1.5-size UNet's FLOPs (every reuse call reuses all its slots)."""
    total, per_module = flops
    if row.get("fr_kinds"):
        k = {n: v / per_run for n, v in row["fr_kinds"].items()}
        saved = sum(slot_flops(per_module, s) for s in slots)
        return (k.get("key", 0) * total + k.get("reuse", 0) * (total - saved)) / (STEPS * total)
    return row["net_calls"] / per_run / STEPS


# --- the run -------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "out" / "bench_fr"))
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--kb-size", type=int, default=300, help="KB for the ReDi and ReDi + FeatureReuse rows (0: no ReDi rows)")
    ap.add_argument("--sd15-size", type=int, default=256)
    ap.add_argument("--sd15-times", default="", help="read the SD1.5-size per-call times from this JSON (from --sd15-only) instead of measuring them")
    ap.add_argument("--sd15-only", default="", help="measure only the SD1.5-size per-call times and write them to this JSON")
    ap.add_argument("--groups", default="fewer,easycache,fr,redi", help="row groups to run (the full baseline always runs): fewer, easycache, fr, redi")
    ap.add_argument("--merge", nargs="*", default=[], help="merge the results.json of runs of disjoint --groups/--only into OUT (no sampling)")
    ap.add_argument("--sd15-orders", default="0,1,2", help="with --sd15-only: the FeatureReuse orders to time (others are kept from an existing file)")
    ap.add_argument("--sd15-runs", default="", help="time whole 20-step runs of a few fixed-count settings on the SD1.5-size UNet "
                    "and write them to this JSON (checks the per-call cost model end to end)")
    ap.add_argument("--sd15-rounds", type=int, default=5, help="with --sd15-only / --sd15-runs: repeat the timings this many rounds "
                    "(alternating the settings' order) and keep the median of each, with its spread")
    ap.add_argument("--only", default="", help="run only these rows (names separated by |; the full baseline always runs)")
    ap.add_argument("--paired", default=DEFAULT_NAME, help="compare these rows (names separated by |) with every other row, paired "
                    "over the same images (PSNR, Frechet, accuracy, each with its standard error)")
    ap.add_argument("--seeds", choices=("per-image", "fixed"), default="per-image",
                    help="per-image: query i at seed SEED_BASE + i (the artist's regime, the default); fixed: every query at the "
                    "KB's seed 1024 (the ReDi paper's regime, for comparison with it)")
    ap.add_argument("--seed-base", type=int, default=B.PER_IMAGE_SEED_BASE)
    ap.add_argument("--prompt-seed", type=int, default=999, help="which random prompts of the demo grammar the queries are")
    ap.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the Frechet standard errors")
    ap.add_argument("--fr-slice", default=":", help="run only these FeatureReuse settings of the list, as a Python slice (e.g. 0:8)")
    args = ap.parse_args()
    if args.queries % args.batch:
        raise SystemExit("--queries must be a multiple of --batch (every UNet call then has the same batch)")
    torch.set_num_threads(1)  # CPU-time ratios that hold on a shared machine
    if args.sd15_runs:
        from redi_demo import host

        host.load_pack()
        fr = importlib.import_module("redi_accelerate.nodes.feature_reuse")
        rounds = [sd15_runs(fr, args.sd15_size, reverse=bool(i % 2)) for i in range(args.sd15_rounds)]
        runs = median_rows(rounds)
        Path(args.sd15_runs).write_text(json.dumps({"size": args.sd15_size, "machine": platform.platform(), "threads": 1, "rounds": rounds,
                                                    "loadavg": os.getloadavg(), "rows": runs}, indent=1))
        return
    if args.sd15_only:
        from redi_demo import host

        host.load_pack()
        tmp, dest = Path(args.sd15_only + ".part"), Path(args.sd15_only)
        src = dest if dest.is_file() else Path(args.sd15_only + ".known")  # an earlier partial measurement
        known = json.loads(src.read_text()) if src.is_file() else None
        if known:
            known["orders"] = {int(k): v for k, v in known["orders"].items()}
        orders = tuple(int(o) for o in args.sd15_orders.split(","))
        fr = importlib.import_module("redi_accelerate.nodes.feature_reuse")
        if known:
            times = sd15_call_times(fr, args.sd15_size, orders, known)
        else:
            rounds = [sd15_call_times(fr, args.sd15_size, orders[::-1] if i % 2 else orders) for i in range(args.sd15_rounds)]
            times = median_times(rounds)
        tmp.write_text(json.dumps(times, indent=1))
        tmp.replace(args.sd15_only)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        runs = [json.loads(Path(f).read_text()) for f in args.merge]
        rows = runs[0]["rows"][:1] + [r for run in runs for r in run["rows"] if r["name"] != FULL]
        feats = {}
        for f in args.merge:
            with np.load(Path(f).with_name("features.npz")) as z:
                feats.update({k: z[k] for k in z.files})
        times = json.loads(Path(args.sd15_times).read_text()) if args.sd15_times else runs[0]["sd15_call_times"]
        times["orders"] = {int(k): v for k, v in times["orders"].items()}
        for r in rows:
            r["sd15_cost"] = sd15_cost(r, times, runs[0]["args"]["queries"] // runs[0]["args"]["batch"])
        for key in ("seeds", "seed_base", "prompt_seed", "queries", "batch", "kb_size"):
            setattr(args, key, runs[0]["args"][key])
        real, _ = B.evaluator.real_images(max(args.queries, 1000), 31337)
        write(rows, times, args, out, feats, B.evaluator.predict(B.evaluator.load(), real)[1],
              note=f"Merged from {len(runs)} runs, each against its own full baseline (the same queries and seeds).")
        return
    groups = set(args.groups.split(","))
    b = B.Bench(out, args.queries, args.batch, prompt_seed=args.prompt_seed, seed_base=args.seed_base)
    regime = "per-image" if args.seeds == "per-image" else "same"
    feats: dict[str, np.ndarray] = {}
    fr = b.fr
    from comfy_extras.nodes_easycache import EasyCacheNode

    per_run = args.queries // args.batch
    dm = b.model.model.diffusion_model
    ctx = b.conds[0][0][0][:1].repeat(2, 1, 1)
    demo_flops = block_flops(dm, torch.randn(2, 4, 8, 8), ctx)
    sd15 = B.sd15_patcher()
    size = args.sd15_size // 8
    sd15_flops = block_flops(sd15.model.diffusion_model, torch.randn(2, 4, size, size), torch.randn(2, 77, 768) * 0.1)
    sd15_slots = [p for _, p, _ in fr.find_blocks(sd15.model.diffusion_model, "all", set(PARTS.split(",")))]
    del sd15
    rows: list[dict] = []

    only = set(args.only.split("|")) if args.only else None

    def run(group: str, name: str, model, steps: int = STEPS, sampler=None, **extra) -> dict | None:
        if only is not None and name != FULL and name not in only:
            return None
        state = fr_state(model) if extra.get("fr") else None
        acct = Accounting(state)
        m = acct.attach(model)
        c0 = time.process_time()
        imgs, wall, nfe = b.generate(sampler or b.full(steps), regime, model=m)
        cpu = time.process_time() - c0
        if name == FULL:
            b.refs[regime] = imgs
        row = b.record(group, name, imgs, wall, nfe, regime, regime)
        row.update(cpu_s=cpu, net_calls=acct.net_calls, steps_per_run=steps, runs=acct.runs, **{k: v for k, v in extra.items() if k != "fr"})
        # per image, for the standard errors and paired comparisons
        row["psnr_items"] = [float(p) for p in B.evaluator.psnr(imgs, b.refs[regime])]
        row["correct"] = B.evaluator.correct(b.net, imgs, b.samples).tolist()
        feats[name] = B.evaluator.predict(b.net, imgs)[1]
        if state is not None:
            row["fr_kinds"] = dict(acct.kinds)
            total, per_module = demo_flops
            saved = sum(n * slot_flops(per_module, s) for s, n in acct.slot_skips.items())
            row["flops_demo"] = (acct.net_calls * total - saved) / (rows[0]["net_calls"] * total) if rows else 1.0
        else:
            row["flops_demo"] = acct.net_calls / rows[0]["net_calls"] if rows else 1.0
        rows.append(row)
        return row

    t0 = time.time()
    run("baseline", FULL, b.model)
    for n in (8, 9, 10, 11, 12, 14) if "fewer" in groups else ():
        run("fewer steps", f"euler {n} steps", b.model, steps=n)
    # EasyCache on fewer steps too: FeatureReuse's score mixing skips whole steps early, so the fair rival
    # of a mixing setting includes EasyCache on a shorter schedule
    for thr, n in ((0.1, STEPS), (0.12, STEPS), (0.15, STEPS), (0.2, STEPS), (0.3, STEPS), (0.1, 16), (0.1, 14)) if "easycache" in groups else ():
        run("EasyCache", f"EasyCache {thr}" + (f", {n} steps" if n != STEPS else ""),
            EasyCacheNode.execute(b.model, thr, 0.15, 0.95, False).result[0], steps=n)
    lo, hi = (int(v) if v else None for v in args.fr_slice.split(":"))
    for s in fr_settings()[lo:hi] if "fr" in groups else ():
        run(f"FR order {s['order']}", s["name"], patch_fr(fr, b.model, s), fr=True, order=s["order"], setting=s)
    if args.kb_size and "redi" in groups:
        kb = b.build_kb(f"fixed_{args.kb_size}_v12", args.kb_size, "fixed", steps=(2, 3, 4, 10, 12, 14))
        space = "latent" if regime == "same" else "denoised"  # at new seeds only the denoised keys match
        # start 0.25: no reuse in the key phase, whose latent must stay on the KB's trajectory (the KB is built
        # without FeatureReuse); the percent is a noise level, so it means the same in the key phase and the finish
        fr_i2 = {st: {"name": f"i2 o0 mix start {st}", "interval": 2, "schedule": "fixed", "order": 0, "mixing": True, "start": st,
                      "threshold": 0.0} for st in (0.0, 0.25)}
        fr_default = {**next(s for s in fr_settings() if s["name"] == DEFAULT_NAME), "start": 0.25}
        fr_default["name"] = "default start 0.25"
        for k, v, settings in ((4, 10, (fr_i2[0.0], fr_i2[0.25], fr_default)), (3, 12, (fr_default,)), (2, 12, (fr_default,)),
                               (3, 14, (fr_i2[0.0], fr_i2[0.25], fr_default)), (2, 14, (fr_i2[0.25], fr_default))):
            run("ReDi", f"ReDi k={k} v={v}", b.model, steps=STEPS - v + k, sampler=b.redi(kb, k, v, 1, space))
            for s in settings:
                run("ReDi+FR", f"ReDi k={k} v={v} + FR {s['name']}", patch_fr(fr, b.model, s), steps=STEPS - v + k,
                    sampler=b.redi(kb, k, v, 1, space), fr=True, order=0, setting=s)
    print(f"demo-model runs: {time.time() - t0:.0f}s", flush=True)

    if args.sd15_times:
        while not Path(args.sd15_times).is_file():  # measured by a --sd15-only run in parallel
            time.sleep(10)
        times = json.loads(Path(args.sd15_times).read_text())
        times["orders"] = {int(k): v for k, v in times["orders"].items()}
    else:
        times = sd15_call_times(fr, args.sd15_size)
    for r in rows:
        r["cpu_ratio"] = r["cpu_s"] / rows[0]["cpu_s"]
        r["sd15_cost"] = sd15_cost(r, times, per_run)
        r["flops_sd15"] = sd15_flops_fraction(r, sd15_flops, sd15_slots, per_run)
    write(rows, times, args, out, feats, b.real_feats)


def cost_table(rows: list[dict]) -> str:
    lines = ["| group | setting | UNet FLOPs run, demo | UNet FLOPs run, SD1.5 | demo CPU (x full) | demo wall (x full) | SD1.5-size cost (x full) |",
             "|" + "---|" * 7]
    for r in rows:
        lines.append(f"| {r['group']} | {r['name']} | {r['flops_demo']:.2f} | {r['flops_sd15']:.2f} | {r['cpu_ratio']:.2f} | "
                     f"{r['wall_ratio']:.2f} | {r['sd15_cost']:.3f} |")
    return "\n".join(lines)


def pareto(rows: list[dict], key: str, lower_is_better: bool) -> list[dict]:
    front, best = [], None
    for r in sorted(rows, key=lambda r: r["sd15_cost"]):
        v = r[key] if lower_is_better else -r[key]
        if best is None or v < best:
            front.append(r)
            best = v
    return front


def write(rows: list[dict], times: dict, args, out: Path, feats: dict[str, np.ndarray], real_feats: np.ndarray, note: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    real = paired_stats.RealStats.of(real_feats)
    idx = paired_stats.bootstrap_indices(len(rows[0]["psnr_items"]), args.bootstrap, seed=0)
    bench_report.summarize(rows, feats, real, idx, FULL)
    seeds = (f"a seed per image ({args.seed_base} + i)" if args.seeds == "per-image" else f"every query at the KB's fixed seed {B.SEED}")
    md = (f"{args.queries} queries (prompts of seed {args.prompt_seed}, batch {args.batch}), {seeds}, euler {STEPS} steps, cfg {B.CFG}; "
          f"KB of {args.kb_size} for the ReDi rows. Every figure: value ± standard error over images (Frechet: bootstrap, "
          f"{args.bootstrap} resamples); differences are paired with the full run over the same images. {note}\n\n")
    md += bench_report.table(rows, FULL) + "\n\n" + cost_table(rows)
    t = times
    md += (f"\n\nSD1.5-size UNet ({t['size']}x{t['size']}, random weights, one torch thread, CPU seconds per call, batch 2 = cond + uncond"
           + (f", median of {t['rounds']} alternating rounds" if t.get("rounds") else "") + "): "
           f"full {t['full']:.2f}, sampler overhead per step {t['overhead_per_step']:.3f}; "
           + "; ".join(f"FR order {o}: keyframe {v['key']:.2f}, reuse {v['reuse']:.2f}, jump {v['jump']:.4f}" for o, v in t["orders"].items()))
    for name in filter(None, args.paired.split("|")):
        md += "\n\n" + bench_report.paired_table(rows, feats, real, idx, name, FULL)
    print("\n" + md)
    (out / "results.md").write_text(md + "\n")
    np.savez_compressed(out / "features.npz", **feats)
    (out / "results.json").write_text(json.dumps({"rows": rows, "sd15_call_times": times, "machine": platform.platform(),
                                                  "threads": torch.get_num_threads(), "args": vars(args)}, indent=1, default=str))
    colours = {"baseline": "black", "fewer steps": "tab:gray", "EasyCache": "tab:green", "FR order 0": "tab:orange",
               "FR order 1": "tab:red", "FR order 2": "tab:brown", "ReDi": "tab:blue", "ReDi+FR": "tab:purple"}
    fig, axes = plt.subplots(1, 2, figsize=(15, 6))
    for ax, key, label, lower in ((axes[0], "frechet", "Frechet distance to real images (lower is better)", True),
                                  (axes[1], "psnr", "PSNR to the full run, dB (higher is better)", False)):
        # Frechet: settings far off the full run's quality are drawn at the top edge (marked ^), so the
        # region where the methods compete stays readable
        top = 1.3 * rows[0]["frechet"] if key == "frechet" else None
        for r in rows:
            if key == "psnr" and r["name"] == FULL:
                continue
            y, off = (top, True) if top is not None and r[key] > top else (r[key], False)
            ax.scatter(r["sd15_cost"], y, color=colours.get(r["group"], "k"), s=25, marker="^" if off else "o")
            if not off:
                ax.annotate(r["name"].replace("FR ", ""), (r["sd15_cost"], y), fontsize=5.5, xytext=(3, 2), textcoords="offset points")
        if top is not None:
            ax.set_ylim(top=top * 1.03)
            ax.annotate("^ off scale (higher), see the table", (0.01, 0.99), xycoords="axes fraction", va="top", fontsize=7)
        front = pareto([r for r in rows if not (key == "psnr" and r["name"] == FULL)], key, lower)
        ax.plot([r["sd15_cost"] for r in front], [r[key] for r in front], "k--", lw=0.8, label="Pareto front")
        for g, c in colours.items():
            ax.scatter([], [], color=c, label=g)
        ax.set_xlabel(f"cost on an SD1.5-size UNet, {t['size']}x{t['size']} (x the full 20-step run; CPU)")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.suptitle("FeatureReuse, EasyCache, fewer steps and ReDi: demo-model quality against SD1.5-size cost")
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=130)
    print(f"\nwrote {out / 'results.md'}, {out / 'results.json'}, {out / 'pareto.png'}")


if __name__ == "__main__":
    main()
