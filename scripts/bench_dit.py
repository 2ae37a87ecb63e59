"""ReDi, FeatureReuse, EasyCache and fewer steps on the Flux DiT demo model, per image and paired.

    .venv/bin/python scripts/bench_dit.py --seeds fixed [--queries 200] [--kb-size 1000] [--out out/bench_dit_fixed]
    .venv/bin/python scripts/bench_dit.py --seeds per-image [--out out/bench_dit_new]
    .venv/bin/python scripts/bench_dit.py --times-only out/dit_times.json [--flux-width 3072]
    .venv/bin/python scripts/bench_dit.py --recost out/dit_times.json --out OUT   (a run's rows at the Flux width)

The DiT demo model (models/redi_demo_shapes_dit.safetensors) at its defaults (euler, simple, 20 steps,
redi_demo/demo_models.py), every setting on the same queries:
  - fixed: every query at the KB's seed (1024), ReDi with latent keys (the paper's regime);
    per-image: query i at seed SEED_BASE + i, ReDi with denoised keys (the artist's regime);
  - rows: the full run, euler with fewer steps, EasyCache, FeatureReuse (DiT blocks), ReDi over
    key/value steps (the guard on), ReDi + FeatureReuse;
  - cost: each row's calls priced per call kind (full call, FeatureReuse keyframe and reuse call,
    sampler overhead per step), timed on the demo DiT itself (its own cost model; one thread,
    median of --rounds alternating rounds) and, with --flux-width, on a random-weight DiT of
    Flux's width (speed only); the executed FLOPs of the demo DiT beside them;
  - quality: every figure ± standard error, paired with the full run (scripts/bench_report.py),
    images under 15 dB and attributes lost, paired tables against the FeatureReuse default and
    the best ReDi row.
Writes OUT/results.md, OUT/results.json, OUT/features.npz and OUT/pareto.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import bench_report  # noqa: E402
import benchmark as B  # noqa: E402
import benchmark_feature_reuse as BFR  # noqa: E402

from redi_demo import paired_stats  # noqa: E402

B.use_model("dit")
STEPS = B.STEPS
FULL = f"full {STEPS} steps"
# FeatureReuse on the DiT: (name, interval, schedule, order, mixing, start, threshold, mix bias, parts)
FR_SETTINGS = [
    ("FR default", 3, "adaptive", 0, True, 0.0, 0.12, 1.0, "input,middle,output"),
    ("FR fixed i2", 2, "fixed", 0, False, 0.0, 0.0, 0.5, "input,middle,output"),
    ("FR fixed i2, first third computed", 2, "fixed", 0, False, 0.0, 0.0, 0.5, "middle,output"),
    ("FR fixed i3", 3, "fixed", 0, False, 0.0, 0.0, 0.5, "input,middle,output"),
    ("FR fixed i3 o1", 3, "fixed", 1, False, 0.0, 0.0, 0.5, "input,middle,output"),
    ("FR fixed i2 mix bias 0.8", 2, "fixed", 0, True, 0.0, 0.0, 0.8, "input,middle,output"),
    ("FR adaptive i4 thr 0.2", 4, "adaptive", 0, False, 0.0, 0.2, 0.5, "input,middle,output"),
    ("FR ramp i4", 4, "ramp", 0, False, 0.0, 0.0, 0.5, "input,middle,output"),
]
REDI = [(2, 8), (2, 10), (3, 10), (2, 12), (3, 12), (4, 12), (2, 14), (3, 14), (4, 14)]
# at new seeds also key steps past the eps-calibrated "denoised keys are blind" noise ratio (10: step 5 of 20 here)
REDI_NEW = REDI + [(5, 12), (5, 14), (6, 14), (4, 16)]


def fr_setting(row: tuple) -> dict:
    name, interval, schedule, order, mixing, start, thr, bias, parts = row
    return {"name": name, "interval": interval, "schedule": schedule, "order": order, "mixing": mixing, "start": start,
            "threshold": thr, "bias": bias, "parts": parts}


# --- the cost model ------------------------------------------------------------------------
FLUX_DEPTH = (1, 2)  # double- and single-stream blocks of the Flux-width DiT
FLUX_TOKENS = (64, 64)  # its image tokens (a 16 x 16 latent, patch 2) and text tokens


def flux_width_patcher(width: int):
    """A DiT of Flux's width, head size and rotary axes (random weights; speed only), with Flux's 1:2
    ratio of double- to single-stream blocks at a depth this CPU can time (FLUX_DEPTH), and the demo's
    4-channel latent."""
    import comfy.model_patcher

    from redi_demo import dit_config
    from redi_demo.train import init_weights

    cfg = dit_config.new_config()
    cfg.unet_config.update(hidden_size=width, num_heads=width // 128, axes_dim=[16, 56, 56], depth=FLUX_DEPTH[0], depth_single_blocks=FLUX_DEPTH[1],
                           context_in_dim=4096, vec_in_dim=768)
    torch.manual_seed(0)
    base = cfg.get_model({})
    init_weights(base.diffusion_model)
    return comfy.model_patcher.ModelPatcher(base, torch.device("cpu"), torch.device("cpu"))


def call_times(fr, patcher, ctx, lat, rounds: int) -> dict:
    """Per-call CPU seconds (one thread): a full call, the sampler's overhead per step, and
    FeatureReuse's keyframe and reuse calls (all blocks reused, and the first third computed);
    median of `rounds` rounds in alternating order, with the spread."""
    import comfy.sample

    noise = comfy.sample.prepare_noise(lat, 0)

    def timed(model, steps, state=None):
        return BFR.timed_sample(model, steps, noise, ctx, lat, B.SCHEDULER, state)

    def one_round(reverse: bool) -> dict:
        out = {}
        kinds = [("full", None), ("all", "input,middle,output"), ("first third computed", "middle,output")]
        for label, parts in kinds[::-1] if reverse else kinds:
            if parts is None:
                calls, total = timed(patcher, 4)
                out["full"] = float(np.median([c for _, c, _ in calls]))
                out["overhead_per_step"] = max(0.0, (total - sum(c for _, c, _ in calls)) / 4)
                continue
            m = fr.ReDiFeatureReuse.execute(patcher, 2, 0.0, 1.0, "all", parts, False, 0.5, 0, "fixed", 0.15).result[0]
            calls, _ = timed(m, 6, BFR.fr_state(m))
            out[f"key {label}"] = float(np.median([c for k, c, _ in calls if k == "key"]))
            out[f"reuse {label}"] = float(np.median([c for k, c, _ in calls if k == "reuse"]))
        return out

    timed(patcher, 1)  # warm-up
    all_rounds = [one_round(bool(i % 2)) for i in range(rounds)]
    res = {k: float(np.median([r[k] for r in all_rounds])) for k in all_rounds[0]}
    res["spread"] = {k: [min(r[k] for r in all_rounds), max(r[k] for r in all_rounds)] for k in all_rounds[0]}
    res["rounds"], res["loadavg"] = rounds, os.getloadavg()
    return res


def measure_times(fr, model, clip, rounds: int, flux_width: int) -> dict:
    cond = clip.encode_from_tokens(clip.tokenize("a small red circle at the top left on a white background"), return_pooled=True)
    out = {"demo": call_times(fr, model, [[cond[0], {"pooled_output": cond[1]}]], torch.zeros(1, 4, 8, 8), rounds)}
    print("demo DiT per-call CPU seconds:", json.dumps(out["demo"]), flush=True)
    if flux_width:
        g = torch.Generator().manual_seed(0)
        ctx = [[torch.randn(1, FLUX_TOKENS[1], 4096, generator=g) * 0.1, {"pooled_output": torch.randn(1, 768, generator=g) * 0.1}]]
        side = 2 * int(FLUX_TOKENS[0] ** 0.5)
        out["flux_width"] = {"width": flux_width, "depth": FLUX_DEPTH, "tokens": FLUX_TOKENS,
                             **call_times(fr, flux_width_patcher(flux_width), ctx, torch.zeros(1, 4, side, side), rounds)}
        print("Flux-width DiT per-call CPU seconds:", json.dumps(out["flux_width"]), flush=True)
    return out


def cost(row: dict, t: dict, per_run: float) -> float:
    """The row's CPU time over the full run's, from its call counts and the per-call times `t`."""
    full = STEPS * (t["full"] + t["overhead_per_step"])
    if row.get("fr_kinds"):
        label = "first third computed" if row["setting"]["parts"] == "middle,output" else "all"
        k = {n: v / per_run for n, v in row["fr_kinds"].items()}
        calls = k.get("key", 0) * t[f"key {label}"] + k.get("reuse", 0) * t[f"reuse {label}"]
    else:
        calls = row["net_calls"] / per_run * t["full"]
    return (calls + row["steps_per_run"] * t["overhead_per_step"]) / full


def recost(out: Path, times: dict) -> None:
    """A finished run's rows priced on both cost models (the demo DiT's and the Flux-width DiT's)."""
    res = json.loads((out / "results.json").read_text())
    per_run = res["args"]["queries"] // res["args"]["batch"]
    f = times["flux_width"]
    md = (f"Rows of {out / 'results.md'} priced per call kind on a random-weight DiT of width {f['width']} "
          f"({f['depth'][0]} double + {f['depth'][1]} single blocks, {f['tokens'][0]} image + {f['tokens'][1]} text tokens; "
          f"`scripts/bench_dit.py --times-only ... --flux-width {f['width']}`, {platform.processor() or platform.machine()}, "
          f"median of {f['rounds']} rounds, load {f['loadavg'][0]:.1f}).\n\n"
          "| setting | demo DiT cost | Flux-width DiT cost | PSNR (dB) |\n|---|---|---|---|\n")
    for r in res["rows"]:
        md += f"| {r['name']} | {r['cost']:.3f} | {cost(r, f, per_run):.3f} | {r['psnr']:.1f} |\n"
    (out / "flux_width_costs.md").write_text(md)
    print(md)


# --- the run -------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="")
    ap.add_argument("--seeds", choices=("fixed", "per-image"), default="fixed")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--kb-size", type=int, default=1000)
    ap.add_argument("--seed-base", type=int, default=B.PER_IMAGE_SEED_BASE)
    ap.add_argument("--prompt-seed", type=int, default=999)
    ap.add_argument("--groups", default="fewer,easycache,fr,redi")
    ap.add_argument("--times", default="", help="per-call times from a --times-only run (JSON; waits for it); measured here if not given")
    ap.add_argument("--times-only", default="", help="measure only the per-call times and write them to this JSON")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--flux-width", type=int, default=0, help="with --times-only: also time a random DiT of this width (e.g. 3072)")
    ap.add_argument("--recost", default="", help="times JSON with flux_width: price OUT/results.json's rows at the Flux width "
                    "(writes OUT/flux_width_costs.md)")
    ap.add_argument("--bootstrap", type=int, default=200)
    ap.add_argument("--noise-guard", choices=("on", "off"), default="on",
                    help="the guard's noise-level checks on the ReDi rows (off: every item's statistics, to calibrate them for flow)")
    args = ap.parse_args()
    out = Path(args.out or ROOT / "out" / f"bench_dit_{args.seeds}")
    if args.recost:
        recost(out, json.loads(Path(args.recost).read_text()))
        return
    torch.set_num_threads(1)
    from redi_demo import host

    host.load_pack()
    import importlib

    fr = importlib.import_module("redi_accelerate.nodes.feature_reuse")
    if args.times_only:
        model, clip, _ = host.load_checkpoint(ROOT / "models" / B.MODEL.ckpt)
        Path(args.times_only).write_text(json.dumps(measure_times(fr, model, clip, args.rounds, args.flux_width), indent=1))
        return
    out.mkdir(parents=True, exist_ok=True)
    b = B.Bench(out, args.queries, args.batch, prompt_seed=args.prompt_seed, seed_base=args.seed_base)
    regime = "same" if args.seeds == "fixed" else "per-image"
    space = "latent" if regime == "same" else "denoised"
    groups = set(args.groups.split(","))
    per_run = args.queries // args.batch
    dm = b.model.model.diffusion_model
    cond = b.conds[0][0]
    total_flops, per_module = BFR.block_flops(dm, torch.randn(2, 4, 8, 8), cond[0][:1].repeat(2, 1, 1))
    feats: dict[str, np.ndarray] = {}
    rows: list[dict] = []
    from comfy_extras.nodes_easycache import EasyCacheNode

    def run(group: str, name: str, model, steps: int = STEPS, sampler=None, setting: dict | None = None, **extra) -> dict:
        state = BFR.fr_state(model) if setting else None
        acct = BFR.Accounting(state)
        imgs, wall, nfe = b.generate(sampler or b.full(steps), regime, model=acct.attach(model))
        if name == FULL:
            b.refs[regime] = imgs
        row = b.record(group, name, imgs, wall, nfe, regime, regime)
        row.update(net_calls=acct.net_calls, steps_per_run=steps, setting=setting, **extra)
        row["psnr_items"] = [float(p) for p in B.evaluator.psnr(imgs, b.refs[regime])]
        row["correct"] = B.evaluator.correct(b.net, imgs, b.samples).tolist()
        feats[name] = B.evaluator.predict(b.net, imgs)[1]
        full_calls = rows[0]["net_calls"] if rows else acct.net_calls
        saved = 0.0
        if state is not None:
            row["fr_kinds"] = dict(acct.kinds)
            # a slot "double_block.3" is the module "double_blocks.3"
            saved = sum(n * per_module.get(s.replace("_block.", "_blocks."), 0.0) for s, n in acct.slot_skips.items())
        row["flops"] = (acct.net_calls * total_flops - saved) / (full_calls * total_flops)
        rows.append(row)
        return row

    run("baseline", FULL, b.model)
    for n in (8, 9, 10, 11, 12, 14) if "fewer" in groups else ():
        run("fewer steps", f"euler {n} steps", b.model, steps=n)
    for thr in (0.05, 0.1, 0.15, 0.2, 0.3) if "easycache" in groups else ():
        run("EasyCache", f"EasyCache {thr}", EasyCacheNode.execute(b.model, thr, 0.15, 0.95, False).result[0])
    for s in map(fr_setting, FR_SETTINGS if "fr" in groups else ()):
        run("FeatureReuse", s["name"], BFR.patch_fr(fr, b.model, s), setting=s)
    if "redi" in groups:
        stored = (2, 3, 4, 8, 10, 12, 14) if regime == "same" else (2, 3, 4, 5, 6, 8, 10, 12, 14, 16)
        kb = b.build_kb(f"dit_fixed_{args.kb_size}" + ("" if regime == "same" else "_new"), args.kb_size, "fixed", steps=stored)
        fr_redi = {**fr_setting(FR_SETTINGS[0]), "start": 0.25, "name": "FR default start 0.25"}
        b.noise_guard = args.noise_guard == "on"
        for k, v in REDI if regime == "same" else REDI_NEW:
            before = len(b.items)
            row = run("ReDi", f"ReDi k={k} v={v}", b.model, steps=STEPS - v + k, sampler=b.redi(kb, k, v, 1, space), k=k, v=v)
            row["redi_items"] = b.items[before:]  # per image, in the order of psnr_items: the guard's statistics
        for k, v in ((2, 12), (3, 12), (2, 14)):
            run("ReDi+FR", f"ReDi k={k} v={v} + {fr_redi['name']}", BFR.patch_fr(fr, b.model, fr_redi), steps=STEPS - v + k,
                sampler=b.redi(kb, k, v, 1, space), setting=fr_redi, k=k, v=v)
    if args.times:
        while not Path(args.times).is_file():  # measured by a --times-only run, on an idle machine
            time.sleep(10)
        times = json.loads(Path(args.times).read_text())
    else:
        times = measure_times(fr, b.model, b.clip, args.rounds, 0)
    for r in rows:
        r["cost"] = cost(r, times["demo"], per_run)
        if "flux_width" in times:
            r["cost_flux_width"] = cost(r, times["flux_width"], per_run)
    write(rows, feats, b, args, times, out)


def write(rows: list[dict], feats: dict, b, args, times: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    real = paired_stats.RealStats.of(b.real_feats)
    idx = paired_stats.bootstrap_indices(len(rows[0]["psnr_items"]), args.bootstrap, seed=0)
    bench_report.summarize(rows, feats, real, idx, FULL)
    seeds = f"a seed per image ({args.seed_base} + i), denoised keys" if args.seeds == "per-image" else f"every query at the KB's seed {B.SEED}, latent keys"
    md = (f"Flux DiT demo model, {args.queries} queries (prompts of seed {args.prompt_seed}), {seeds}; euler, {B.SCHEDULER}, {STEPS} "
          f"steps, cfg {B.CFG:g}; KB of {args.kb_size} at seed {B.SEED} for the ReDi rows, guard at its defaults. Cost: the row's "
          f"calls priced per call kind on the demo DiT (CPU, one thread, median of {times['demo']['rounds']} rounds). Every "
          "figure ± standard error over images; differences paired with the full run.\n\n")
    md += bench_report.table(rows, FULL, cost_key="cost", cost_label="DiT cost (x full)") + "\n\n"
    md += "| setting | demo DiT cost | FLOPs run (demo DiT) |" + (" Flux-width DiT cost |" if "flux_width" in times else "") + "\n"
    md += "|---|---|---|" + ("---|" if "flux_width" in times else "") + "\n"
    for r in rows:
        md += f"| {r['name']} | {r['cost']:.3f} | {r['flops']:.3f} |" + (f" {r['cost_flux_width']:.3f} |" if "flux_width" in times else "") + "\n"
    d = times["demo"]
    md += (f"\nPer-call CPU seconds on the demo DiT (batch 2 = cond + uncond, 64x64): full {d['full']:.4f}, keyframe "
           f"{d['key all']:.4f}, reuse (all blocks) {d['reuse all']:.4f}, reuse (first third computed) {d['reuse first third computed']:.4f}, "
           f"sampler overhead per step {d['overhead_per_step']:.4f}.")
    if "flux_width" in times:
        f = times["flux_width"]
        md += (f" Flux-width DiT (random weights, width {f['width']}, {f['depth'][0]} double + {f['depth'][1]} single blocks, "
               f"{f['tokens'][0]} image + {f['tokens'][1]} text tokens): "
               f"full {f['full']:.2f}, reuse (all) {f['reuse all']:.2f}, reuse (first third computed) {f['reuse first third computed']:.2f}.")
    for name in ("FR default", next((r["name"] for r in rows if r["group"] == "ReDi" and bench_report.within_tolerance(r)), "")):
        if name:
            md += "\n\n" + bench_report.paired_table(rows, feats, real, idx, name, FULL, cost_key="cost")
    print("\n" + md)
    (out / "results.md").write_text(md + "\n")
    np.savez_compressed(out / "features.npz", **feats)
    (out / "results.json").write_text(json.dumps({"rows": rows, "times": times, "machine": platform.platform(), "args": vars(args)},
                                                 indent=1, default=str))
    colours = {"baseline": "black", "fewer steps": "tab:gray", "EasyCache": "tab:green", "FeatureReuse": "tab:orange",
               "ReDi": "tab:blue", "ReDi+FR": "tab:purple"}
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5))
    for ax, key, label in ((axes[0], "frechet", "Frechet distance to real images (lower is better)"),
                           (axes[1], "psnr", "PSNR to the full run, dB (higher is better)")):
        for r in rows:
            if key == "psnr" and r["name"] == FULL:
                continue
            ax.scatter(r["cost"], r[key], color=colours.get(r["group"], "k"), s=25)
            ax.annotate(r["name"].replace("FR ", ""), (r["cost"], r[key]), fontsize=5.5, xytext=(3, 2), textcoords="offset points")
        for g, c in colours.items():
            ax.scatter([], [], color=c, label=g)
        ax.set_xlabel("cost on the demo DiT (x the full 20-step run; CPU time per call kind)")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.suptitle(f"Flux DiT demo model: quality against cost ({args.seeds} seeds)")
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=130)
    print(f"\nwrote {out / 'results.md'}, {out / 'results.json'}, {out / 'pareto.png'}")


if __name__ == "__main__":
    main()
