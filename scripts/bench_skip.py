"""A skip chosen per image, measured on a pre-built library KB at random seeds.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_skip.py measure --kb 5000 --queries 300 --split calib --out out/skip
    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_skip.py measure --kb 5000 --queries 300 --split test --fr --out out/skip
    .venv/bin/python scripts/bench_skip.py report --kb 5000 --out out/skip [--tiers 3:16@0.55,14@1.2]

`measure` fills a library KB with full trajectories of one session stream at random seeds (the
stream of scripts/bench_learning.py; demo model, euler/normal, 20 steps, cfg 6; batches of
--batch, resumable), then runs queries of another stream at new seeds (split `calib` or `test`,
disjoint prompts and seeds) and, per query, every candidate: the full run, euler with fewer
steps, and for each key step k and value step v the jump the node makes (redi_core.adaptive's
retrieval with one tier, the nearest neighbour, its weight guard) finished by the stock sampler;
with --fr also each jump finished on a FeatureReuse-patched model (the node's defaults, at batch
1, its call kinds counted per image). Per image and candidate it keeps the PSNR to the full run,
which attributes the evaluator reads right, its evaluator features, its UNet calls and its
SD1.5-size cost, so any per-image rule can be evaluated offline without re-sampling: the image a
rule picks is exactly the candidate computed here.

`report` fits a preset's tiers on the calib split (for each value step, from the farthest jump
down: the largest distance bound under which no calib image of that step fails; a failure is
under 15 dB to the full run or an attribute lost that the full run had) or takes them from
--tiers, and evaluates them on the test split: cost, accuracy and Frechet paired to the full
run with standard errors, failing images, and paired comparisons with euler at the same cost.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import bench_learning as bl  # noqa: E402

from redi_demo import evaluator  # noqa: E402
from redi_demo import paired_stats as ps  # noqa: E402

LIBRARY = "prebuilt"
KEYS, VALUES, FR_VALUES = (2, 3), (8, 10, 12, 14, 16), (12, 14, 16)
FEWER = (6, 7, 8, 9, 10, 11)
PSNR_CAP = 60.0  # an image sampled in full is identical to its full run (inf dB): counted as 60 dB in means
SPLITS = {"calib": (21, 22), "test": (31, 32)}
KB_STREAM, KB_SEEDS = 11, 12


def library_kb(s: bl.Session, n: int, batch: int):
    """The library KB filled to `n` trajectories (continued where a stopped build left it)."""
    lib = s.lib.Library(s.kb_root / LIBRARY, cap=n + 1000)
    rec = importlib.import_module("redi_accelerate.comfy_adapter.recording")
    fp = rec.run_fingerprint(s.model, (1, 4, 8, 8), bl.SAMPLER, bl.SCHEDULER, bl.STEPS, bl.CFG, s.negative)
    lkb = lib.find_or_create(fp)
    stored = lkb.fingerprint.stored_steps
    ph = s.cs.Phases(s.model, bl.STEPS, bl.CFG, bl.SAMPLER, bl.SCHEDULER, s.negative, preview=False)
    stream = bl.session_stream(n, KB_STREAM)
    seeds = np.random.default_rng(KB_SEEDS).integers(0, 2**31, size=n).tolist()
    t0 = time.time()
    while lkb.count < n:
        lo = lkb.count
        hi = min(n, lo + batch)
        prompts = [smp.prompt() for smp in stream[lo:hi]]
        cond = s.kb_nodes.encode_batch(s.clip, prompts)
        latent = torch.zeros(hi - lo, 4, 8, 8)
        x, d = ph.trajectory(cond, latent, s.cs.noise_for(latent, seeds[lo:hi]), seeds[lo:hi], stored)
        entries = [s.lib.Entry(p, sd) for p, sd in zip(prompts, seeds[lo:hi])]
        lkb, _ = lib.append(lkb, x, d, entries, [f"{i:012x}" for i in range(lo, hi)])
        print(f"KB {lkb.count}/{n} ({time.time() - t0:.0f}s)", flush=True)
    return lib, lkb, stored


class Scorer:
    def __init__(self, s: bl.Session, samples: list) -> None:
        self.s, self.samples, self.data = s, samples, {}

    def add(self, name: str, rows: np.ndarray, latents: torch.Tensor, calls: np.ndarray, sd15: np.ndarray, **extra) -> None:
        imgs = self.s.decode(latents)
        d = self.data.setdefault(name, {"img": {}, "calls": {}, "sd15": {}, **{k: {} for k in extra}})
        for j, r in enumerate(rows.tolist()):
            d["img"][r] = imgs[j]
            d["calls"][r] = float(calls[j])
            d["sd15"][r] = float(sd15[j])
            for k, v in extra.items():
                d[k][r] = v[j]

    def arrays(self, full: str = "full") -> dict[str, np.ndarray]:
        n = len(self.samples)
        ref = np.stack([self.data[full]["img"][i] for i in range(n)])
        out = {}
        for name, d in self.data.items():
            imgs = np.stack([d["img"][i] for i in range(n)])
            _, feats = evaluator.predict(self.s.net, imgs)
            out[f"{name}|psnr"] = evaluator.psnr(imgs, ref) if name != full else np.full(n, np.inf)
            out[f"{name}|correct"] = evaluator.correct(self.s.net, imgs, self.samples)
            out[f"{name}|feats"] = feats.astype(np.float32)
            for k in d:
                if k != "img":
                    out[f"{name}|{k}"] = np.array([d[k][i] for i in range(n)])
        return out


def measure(args) -> None:
    s = bl.Session(args.out, "balanced", fresh=False)
    lib, lkb, stored = library_kb(s, args.kb, args.batch)
    kb = lib.open(lkb)
    ad = importlib.import_module("redi_accelerate.redi_core.adaptive")
    bfr = importlib.import_module("benchmark_feature_reuse")
    fr = importlib.import_module("redi_accelerate.nodes.feature_reuse")
    times = json.loads((ROOT / args.sd15_times).read_text())
    times["orders"] = {int(k): v for k, v in times["orders"].items()}
    fr_setting = {**next(x for x in bfr.fr_settings() if x["name"] == bfr.DEFAULT_NAME), "start": 0.25}
    pseed, sseed = SPLITS[args.split]
    samples = bl.session_stream(args.queries, pseed)
    qseeds = np.random.default_rng(sseed).integers(0, 2**31, size=args.queries).tolist()
    sc = Scorer(s, samples)
    steps = bl.STEPS
    ph = s.cs.Phases(s.model, steps, bl.CFG, bl.SAMPLER, bl.SCHEDULER, s.negative, preview=False)
    sig = ph.sigmas.float().tolist()
    meta = {"distance": {k: [None] * args.queries for k in KEYS}, "weight_sum": {k: [None] * args.queries for k in KEYS}}
    t0 = time.time()
    for lo in range(0, args.queries, args.batch):
        hi = min(args.queries, lo + args.batch)
        rows = np.arange(lo, hi)
        seeds = qseeds[lo:hi]
        cond = s.kb_nodes.encode_batch(s.clip, [smp.prompt() for smp in samples[lo:hi]])
        latent = torch.zeros(hi - lo, 4, 8, 8)
        noise = s.cs.noise_for(latent, seeds)
        one = np.ones(hi - lo)
        sc.add("full", rows, ph.full(cond, latent, noise, seeds[0], seeds).float().cpu(), steps * one, one)
        for n in FEWER:
            pn = s.cs.Phases(s.model, n, bl.CFG, bl.SAMPLER, bl.SCHEDULER, s.negative, preview=False)
            sc.add(f"euler {n}", rows, pn.full(cond, latent, noise, seeds[0], seeds).float().cpu(), n * one, n / steps * one)
        for k in KEYS:
            state = ph.key_phase(cond, latent, noise, seeds[0], k, seeds)
            for v in VALUES:
                ret = ad.retrieve_adaptive(kb, state, k, [ad.Tier(float("inf"), v)], sig, 1)
                if v == VALUES[0]:
                    for j, rep in enumerate(ret.reports):
                        meta["distance"][k][lo + j] = rep.distances[0]
                        meta["weight_sum"][k][lo + j] = float(np.sum(rep.weights))
                out = torch.zeros(latent.shape)
                for start, idx, src in ret.starts():
                    out[idx] = ph.finish(cond, src, start, seeds[0], rows=idx).float().cpu()
                calls = np.where(ret.value_steps > k, k + steps - v, steps)
                sc.add(f"k{k} v{v}", rows, out, calls, calls / steps, jumped=ret.accepted.astype(np.int8))
                if args.fr and v in FR_VALUES:
                    fr_finish(s, sc, bfr, fr, fr_setting, times, cond, latent, noise, seeds, rows, ret, k, v)
            if args.fr:  # sampled in full from k (the guard's fallback) with FeatureReuse in the graph
                ret = ad.retrieve_adaptive(None, state, k, [ad.Tier(float("inf"), k + 1)], sig, 1)
                fr_finish(s, sc, bfr, fr, fr_setting, times, cond, latent, noise, seeds, rows, ret, k, k)
        print(f"queries {hi}/{args.queries} ({time.time() - t0:.0f}s)", flush=True)
    arrays = sc.arrays()
    for k in KEYS:
        arrays[f"dist|k{k}"] = np.array(meta["distance"][k], dtype=float)
        arrays[f"wsum|k{k}"] = np.array(meta["weight_sum"][k], dtype=float)
    path = args.out / f"skip_{args.split}_kb{args.kb}.npz"
    np.savez_compressed(path, **arrays)
    (args.out / f"skip_{args.split}_kb{args.kb}.json").write_text(json.dumps(
        {"kb": args.kb, "kb_count": lkb.count, "queries": args.queries, "split": args.split, "seconds": time.time() - t0,
         "fr_setting": fr_setting if args.fr else None, "prompts": [smp.prompt() for smp in samples], "seeds": qseeds}, indent=1) + "\n")
    print(f"wrote {path}", flush=True)


def fr_finish(s, sc, bfr, fr, setting, times, cond, latent, noise, seeds, rows, ret, k, v) -> None:
    """Each item of `ret` finished from its start on the FeatureReuse-patched model, one generation at a
    time (the adaptive schedule decides per batch), with its SD1.5-size cost from its call kinds."""
    steps = bl.STEPS
    patched = bfr.patch_fr(fr, s.model, setting)
    state = bfr.fr_state(patched)
    ph = s.cs.Phases(patched, steps, bl.CFG, bl.SAMPLER, bl.SCHEDULER, s.negative, preview=False)
    out = torch.zeros(latent.shape)
    calls, sd15 = np.zeros(len(rows)), np.zeros(len(rows))
    for j in range(len(rows)):
        start = int(ret.value_steps[j])
        c1 = [[cond[0][0][j : j + 1], {kk: t[j : j + 1] for kk, t in cond[0][1].items()}]]
        out[j : j + 1] = ph.finish(c1, ret.x_start[j : j + 1], start, seeds[j]).float().cpu()
        kinds = dict(state.calls)
        net = kinds.get("key", 0) + kinds.get("reuse", 0)
        calls[j] = k + net
        sd15[j] = bfr.sd15_cost({"steps_per_run": steps - start, "fr_kinds": kinds, "order": 0}, times, 1) + k / steps
    sc.add(f"k{k} v{v} fr" if v > k else f"k{k} full fr", rows, out, calls, sd15, jumped=ret.accepted.astype(np.int8))


# --- report --------------------------------------------------------------------------------
def load(out: Path, split: str, kb: int) -> dict[str, np.ndarray]:
    with np.load(out / f"skip_{split}_kb{kb}.npz") as z:
        return {k: z[k] for k in z.files}


def fails(a: dict, name: str, attributes: bool = True) -> np.ndarray:
    """Per image: under 15 dB to the full run (and with `attributes`: or an attribute lost)."""
    if attributes:
        return ps.failures(a[f"{name}|psnr"], a[f"{name}|correct"], a["full|correct"])
    return np.asarray(a[f"{name}|psnr"], dtype=float) < ps.FAIL_DB


def fit_tiers(a: dict, k: int, values=VALUES, max_fail: int = 0, attributes: bool = True) -> list[tuple[int, float]]:
    """redi_core.adaptive.fit_tiers on the calib split's jumps from key step k (`fails`)."""
    from redi_core import adaptive as ad

    failed = {v: fails(a, f"k{k} v{v}", attributes) & (a[f"k{k} v{v}|jumped"] > 0) for v in values}
    return [(t.value_step, t.max_distance) for t in ad.fit_tiers(a[f"dist|k{k}"], failed, max_fail)]


def pick(a: dict, k: int, tiers: list[tuple[int, float]], fr: bool = False) -> dict[str, np.ndarray]:
    """The per-image choice of `tiers` on split `a`: each item's candidate (jump or full)."""
    dist = a[f"dist|k{k}"]
    n = len(dist)
    suffix = " fr" if fr else ""
    full = f"k{k} full fr" if fr else "full"
    chosen = np.array([full] * n, dtype=object)
    for i in range(n):
        for v, bound in tiers:
            if dist[i] <= bound and a[f"k{k} v{v}|jumped"][i]:
                chosen[i] = f"k{k} v{v}{suffix}"
                break
    res = {}
    for key in ("psnr", "correct", "feats", "calls", "sd15"):
        res[key] = np.stack([a[f"{c}|{key}"][i] for i, c in enumerate(chosen)])
    if not fr:
        res["calls"] = np.where(chosen == "full", a["full|calls"], res["calls"])
    res["chosen"] = chosen
    return res


def evaluate(a: dict, res: dict, real: ps.RealStats, reps: int = 200) -> dict:
    n = len(res["psnr"])
    idx = ps.bootstrap_indices(n, reps, 7)
    acc = res["correct"].mean(axis=1) - a["full|correct"].mean(axis=1)
    f_full = ps.frechet(a["full|feats"], real)
    fd = ps.paired_frechet(res["feats"], a["full|feats"], real, idx)
    fl = ps.failures(res["psnr"], res["correct"], a["full|correct"])
    psnr = np.minimum(res["psnr"], PSNR_CAP)
    return {"calls": ps.mean_se(res["calls"] / 20.0), "sd15": ps.mean_se(res["sd15"]), "acc_diff": ps.mean_se(acc * 100),
            "frechet_full": f_full, "frechet_diff": fd, "frechet_rel": ps.relative(fd, f_full),
            "under15": int((psnr < 15).sum()), "lost": int(ps.attributes_lost(res["correct"], a["full|correct"]).sum()),
            "fail_share": ps.share_se(fl), "fail_upper": ps.upper_bound_share(fl), "psnr_median": float(np.median(psnr)),
            "n": n}


def fmt(e, digits: int = 2, sign: bool = True) -> str:
    return f"{e.value:{'+' if sign else ''}.{digits}f} ± {e.se:.{digits}f}"


def plot(results: dict, path: Path, kb: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for label, r in results.items():
        euler = label.startswith("euler")
        style = dict(color="gray", marker="s") if euler else dict(color="tab:purple" if "FeatureReuse" in label else "tab:blue", marker="o")
        x = r["sd15"]["value"]
        ax[0].errorbar(x, r["acc_diff"]["value"], yerr=2 * r["acc_diff"]["se"], ls="none", **style)
        ax[1].plot(x, 100 * r["fail_share"]["value"], ls="none", **style)
        if euler:
            ax[0].annotate(label.split()[1], (x, r["acc_diff"]["value"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax[0].axhline(-2, color="red", ls="--", lw=0.8)
    ax[0].set(xlabel="SD1.5-size cost (x full run)", ylabel="accuracy - full run's, points (2 SE)",
              title=f"per-image skip, KB of {kb} (blue ReDi, purple + FeatureReuse, gray euler N steps)")
    ax[1].set(xlabel="SD1.5-size cost (x full run)", ylabel="% of images failing (< 15 dB or an attribute lost)", title="per-image failures")
    ax[0].title.set_fontsize(8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(args) -> None:
    test = load(args.out, "test", args.kb)
    calib = load(args.out, "calib", args.kb) if (args.out / f"skip_calib_kb{args.kb}.npz").is_file() else None
    real_imgs, _ = evaluator.real_images(1000, 31337)
    real = ps.RealStats.of(evaluator.predict(evaluator.load(), real_imgs)[1])
    presets = {}
    if args.tiers:
        for spec in args.tiers.split(";"):
            k, rest = spec.split(":")
            presets[f"given k={k}: {rest}"] = (int(k), [(int(v), float(b)) for v, b in (t.split("@") for t in rest.split(","))])
    for k in KEYS if calib is not None else ():
        for attributes in (False, True):
            for mf in (0, 1):
                crit = "< 15 dB or attribute lost" if attributes else "< 15 dB"
                presets[f"fitted k={k}: calib {crit} <= {mf} per step"] = (k, fit_tiers(calib, k, max_fail=mf, attributes=attributes))
    lines = [f"# Per-image skip, pre-built library KB of {args.kb} at random seeds; test split {len(test['dist|k2'])} queries",
             "", "| rule | tiers (v@bound) | calls | SD1.5 cost | accuracy diff, pts | Frechet diff (rel) | < 15 dB | attr lost | fail share (95% upper) |",
             "|---|---|---|---|---|---|---|---|---|"]
    results, picked = {}, {}
    for name, (k, tiers) in presets.items():
        for fr in (False, True):
            if fr and any(f"k{k} v{v} fr|psnr" not in test for v, _ in tiers) or fr and f"k{k} full fr|psnr" not in test:
                continue
            res = pick(test, k, tiers, fr)
            ev = evaluate(test, res, real)
            label = name + (" + FeatureReuse" if fr else "")
            picked[label] = res
            results[label] = {"k": k, "tiers": tiers, **{kk: (vars(vv) if hasattr(vv, "se") else vv) for kk, vv in ev.items()}}
            lines.append(f"| {label} | {', '.join(f'{v}@{b:.2f}' for v, b in tiers)} | {fmt(ev['calls'], 3, False)} | {fmt(ev['sd15'], 3, False)} | "
                         f"{fmt(ev['acc_diff'])} | {fmt(ev['frechet_diff'])} ({ev['frechet_rel'].value * 100:+.1f}%) | {ev['under15']} | "
                         f"{ev['lost']} | {ev['fail_share'].value * 100:.1f}% ({ev['fail_upper'] * 100:.1f}%) |")
    for n in FEWER:
        res = {kk: test[f"euler {n}|{kk}"] for kk in ("psnr", "correct", "feats", "calls", "sd15")}
        ev = evaluate(test, res, real)
        results[f"euler {n}"] = {kk: (vars(vv) if hasattr(vv, "se") else vv) for kk, vv in ev.items()}
        lines.append(f"| euler {n} steps | - | {fmt(ev['calls'], 3, False)} | {fmt(ev['sd15'], 3, False)} | {fmt(ev['acc_diff'])} | "
                     f"{fmt(ev['frechet_diff'])} ({ev['frechet_rel'].value * 100:+.1f}%) | {ev['under15']} | {ev['lost']} | "
                     f"{ev['fail_share'].value * 100:.1f}% ({ev['fail_upper'] * 100:.1f}%) |")
    lines += ["", "Paired with euler at the same or a higher cost (rule - euler, over the same images; positive PSNR and accuracy,",
              "negative Frechet favour the rule):", "",
              "| rule | euler steps | accuracy, pts | PSNR, dB (share closer) | Frechet |", "|---|---|---|---|---|"]
    idx = ps.bootstrap_indices(len(test["dist|k2"]), 200, 11)
    for label, res in picked.items():
        cost = float(np.mean(res["sd15"]))
        n = min((m for m in FEWER if m / 20 >= cost - 1e-3), default=FEWER[-1])
        e = f"euler {n}"
        pa = ps.paired(res["correct"].mean(axis=1) * 100, test[f"{e}|correct"].mean(axis=1) * 100)
        pp = ps.paired(np.minimum(res["psnr"], PSNR_CAP), np.minimum(test[f"{e}|psnr"], PSNR_CAP))
        pf = ps.paired_frechet(res["feats"], test[f"{e}|feats"], real, idx)
        results[label][f"vs {e}"] = {"acc": vars(pa.diff), "psnr": vars(pp.diff), "psnr_share": pp.share_a_larger, "frechet": vars(pf)}
        lines.append(f"| {label} | {n} | {fmt(pa.diff)} | {fmt(pp.diff)} ({pp.share_a_larger * 100:.0f}%) | {fmt(pf)} |")
    plot(results, args.out / f"skip_kb{args.kb}.png", args.kb)
    text = "\n".join(lines)
    print(text)
    (args.out / f"skip_report_kb{args.kb}.md").write_text(text + "\n")
    (args.out / f"skip_report_kb{args.kb}.json").write_text(json.dumps(results, indent=1, default=float) + "\n")


def validate(args) -> None:
    """The shipped preset through the ReDi KSampler node itself (the library, learn off) on the test
    split: each image must be the candidate the offline rule picks (the same PSNR to the full run and
    the same evaluator features), with the same UNet calls."""
    s = bl.Session(args.out, "balanced", fresh=False)
    ad = importlib.import_module("redi_accelerate.redi_core.adaptive")
    steps_of = importlib.import_module("redi_accelerate.kb_tools.library").library_steps
    bfr = importlib.import_module("benchmark_feature_reuse")
    fr = importlib.import_module("redi_accelerate.nodes.feature_reuse")
    meta = json.loads((args.out / f"skip_test_kb{args.kb}.json").read_text())
    test = load(args.out, "test", args.kb)
    n = min(args.queries, len(meta["prompts"]))
    model = s.model
    if args.fr:
        model = bfr.patch_fr(fr, s.model, {**next(x for x in bfr.fr_settings() if x["name"] == bfr.DEFAULT_NAME), "start": 0.25})
    k, tiers = ad.plan(args.preset, bl.STEPS, steps_of(bl.STEPS), args.kb)
    res = pick(test, k, [(t.value_step, t.max_distance) for t in tiers], args.fr)
    same, calls_ok, dpsnr, dfeat = 0, 0, 0.0, 0.0
    for i in range(n):
        cond = s.kb_nodes.encode_batch(s.clip, [meta["prompts"][i]])
        counter = s.rk.NFECounter()
        out = s.rk.ReDiKSampler.execute(counter.attach(model), meta["seeds"][i], bl.STEPS, bl.CFG, bl.SAMPLER, bl.SCHEDULER, cond,
                                        s.negative, {"samples": torch.zeros(1, 4, 8, 8)}, 4, 10, 1, "auto", 1.5, 0.0,
                                        library=LIBRARY, speed=args.preset, learn=False).result[0]["samples"]
        img = s.decode(out.float().cpu())
        full, _ = s.full(cond, meta["seeds"][i])
        p = float(evaluator.psnr(img, s.decode(full))[0])
        feat = evaluator.predict(s.net, img)[1][0]
        want_p = float(min(res["psnr"][i], PSNR_CAP))
        dp = abs(min(p, PSNR_CAP) - want_p)
        df = float(np.abs(feat - res["feats"][i]).max())
        dpsnr, dfeat = max(dpsnr, dp), max(dfeat, df)
        same += dp < 0.05 and df < 1e-3
        calls_ok += int(round(counter.calls)) == int(round(res["calls"][i]))
    print(f"{args.preset}{' + FeatureReuse' if args.fr else ''}, KB of {args.kb}, tiers {[(t.value_step, t.max_distance) for t in tiers]}: "
          f"{same} of {n} node images are the offline pick (largest differences: {dpsnr:.3f} dB, features {dfeat:.2e}); "
          f"UNet calls equal for {calls_ok} of {n}", flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=["measure", "report", "validate"])
    p.add_argument("--kb", type=int, default=5000)
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--split", choices=list(SPLITS), default="calib")
    p.add_argument("--batch", type=int, default=25)
    p.add_argument("--fr", action="store_true", help="also finish every jump on a FeatureReuse-patched model")
    p.add_argument("--sd15-times", default="out/sd15_times_256.json")
    p.add_argument("--preset", default="balanced", help="validate: the preset run through the node")
    p.add_argument("--tiers", default="", help="rules to evaluate, e.g. '3:16@0.6,14@1.2;2:14@0.9'")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    {"measure": measure, "report": report, "validate": validate}[args.mode](args)


if __name__ == "__main__":
    main()
