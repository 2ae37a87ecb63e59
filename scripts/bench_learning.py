"""The learning curve: an artist's session through ReDi KSampler on a library that starts empty.

    .venv/bin/python scripts/bench_learning.py --generations 500 --out out/learning [--preset balanced]

Streams generations the way a session goes (themes from the demo grammar, with variations and
repeats, random seeds) through the ReDi KSampler node's own `execute` (real ComfyUI sampling,
in-process) with `library` set, so every image it samples in full is recorded into the library
and later ones retrieve from it. Each image is compared with its full run (euler, 20 steps,
cfg 6): an image that jumped is sampled again in full; an image ReDi sampled in full from the
key step IS the full run for euler (tests/integration/test_finish_rows.py), so its own output is
the reference, checked by a real full run every `--check-every` such images (PSNR must be > 50 dB).

Writes OUT/results.json with `windows`, one object per `--window` generations: start, end,
calls_ratio (mean UNet calls per image over the full run's), accuracy and accuracy_full (0..1),
frechet, frechet_full, frechet_se (bootstrap standard error of frechet - frechet_full, items
resampled in pairs), calls_ratio_se and accuracy_diff_se (standard errors over the window's items of
the mean calls ratio and of accuracy - accuracy_full, paired per item), items, items_below_15db (PSNR to the full run), jumped, explored (sampled in full by the
exploration rule), recorded (trajectories
added to the library); and OUT/learning_curve.png.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from redi_demo import dataset, demo_models, evaluator, host, paired_stats  # noqa: E402

SD1 = demo_models.MODELS["sd1"]
STEPS, CFG, SAMPLER, SCHEDULER = SD1.steps, SD1.cfg, SD1.sampler, SD1.scheduler
LIBRARY = "learning"


def session_stream(n: int, seed: int) -> list[dataset.Sample]:
    """An artist's session: a theme is kept for a few images with one attribute changed at a
    time (a variation), sometimes repeated exactly, then a new theme begins."""
    rng = np.random.default_rng(seed)
    names = list(dataset.ATTRIBUTES)
    out: list[dataset.Sample] = []
    theme = None
    while len(out) < n:
        r = rng.random()
        if theme is None or r < 0.25:
            theme = dataset.random_samples(1, int(rng.integers(2**31)))[0]
            out.append(theme)
        elif r < 0.40:
            out.append(theme)  # the same prompt again (at a new seed)
        else:
            attrs = dict(theme.attrs)
            name = names[int(rng.integers(len(names)))]
            attrs[name] = int(rng.integers(len(dataset.ATTRIBUTES[name])))
            theme = dataset.Sample(attrs, int(rng.integers(len(dataset.CONTENT_TEMPLATES))), int(rng.integers(len(dataset.STYLE_TEMPLATES))))
            out.append(theme)
    return out


class Session:
    def __init__(self, out: Path, preset: str, fresh: bool = True) -> None:
        torch.set_num_threads(int(os.environ.get("REDI_THREADS", "1")))
        host.load_pack()
        import folder_paths

        self.kb_root = out / "kb"
        if fresh and (self.kb_root / LIBRARY).exists():
            raise SystemExit(f"{self.kb_root / LIBRARY} exists: the curve starts from an empty library; use a new --out")
        self.kb_root.mkdir(parents=True, exist_ok=True)
        folder_paths.add_model_folder_path("redi_kb", str(self.kb_root), is_default=True)
        self.rk = importlib.import_module("redi_accelerate.nodes.redi_ksampler")
        self.kb_nodes = importlib.import_module("redi_accelerate.nodes.kb_nodes")
        self.cs = importlib.import_module("redi_accelerate.comfy_adapter")
        self.lib = importlib.import_module("redi_accelerate.kb_tools.library")
        self.model, self.clip, self.vae = host.load_checkpoint(ROOT / "models" / SD1.ckpt)
        neg = self.clip.encode_from_tokens(self.clip.tokenize(""), return_pooled=True)
        self.negative = [[neg[0], {}]]
        self.preset = preset
        self.net = evaluator.load()
        real, _ = evaluator.real_images(1000, 31337)
        _, self.real_feats = evaluator.predict(self.net, real)

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> np.ndarray:
        return (self.vae.decode(latent).clamp(0, 1).numpy() * 255).round().astype(np.uint8)

    def full(self, cond, seed: int) -> tuple[torch.Tensor, int]:
        counter = self.rk.NFECounter()
        latent = torch.zeros(1, 4, 8, 8)
        ph = self.cs.Phases(counter.attach(self.model), STEPS, CFG, SAMPLER, SCHEDULER, self.negative, preview=False)
        out = ph.full(cond, latent, self.cs.noise_for(latent, [seed]), seed).float().cpu()
        return out, counter.calls

    def redi(self, cond, seed: int) -> tuple[torch.Tensor, int, list[str], float]:
        counter = self.rk.NFECounter()
        latent = {"samples": torch.zeros(1, 4, 8, 8)}
        t0 = time.perf_counter()
        res = self.rk.ReDiKSampler.execute(counter.attach(self.model), seed, STEPS, CFG, SAMPLER, SCHEDULER, cond, self.negative,
                                           latent, 4, 10, 1, "auto", 1.5, 0.0, library=LIBRARY, speed=self.preset, learn=True)
        wall = time.perf_counter() - t0
        return res.result[0]["samples"], counter.calls, res.ui["redi_report"], wall


def window_row(s: Session, rows: list[dict], start: int, reps: int) -> dict:
    samples = [r["sample"] for r in rows]
    imgs = np.stack([r["img"] for r in rows])
    refs = np.stack([r["ref"] for r in rows])
    acc = evaluator.accuracy(s.net, imgs, samples)
    acc_full = evaluator.accuracy(s.net, refs, samples)
    pa, fa = evaluator.predict(s.net, imgs)
    pb, fb = evaluator.predict(s.net, refs)
    truth = dataset.attribute_array(samples)
    # per item: the share of its attributes read right; standard errors over the window's items
    item_acc = np.mean([pa[k] == truth[k] for k in dataset.ATTRIBUTES], axis=0)
    item_acc_full = np.mean([pb[k] == truth[k] for k in dataset.ATTRIBUTES], axis=0)
    ratios = np.array([r["calls"] / r["full_calls"] for r in rows])
    n = len(rows)
    psnr = np.array([r["psnr"] for r in rows])
    return {
        "start": start, "end": start + len(rows), "calls_ratio": float(ratios.mean()),
        "calls_ratio_se": float(ratios.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0,
        "accuracy": float(np.mean(list(acc.values()))), "accuracy_full": float(np.mean(list(acc_full.values()))),
        "accuracy_diff_se": float((item_acc - item_acc_full).std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0,
        "frechet": evaluator.frechet_distance(fa, s.real_feats), "frechet_full": evaluator.frechet_distance(fb, s.real_feats),
        "frechet_se": paired_stats.paired_frechet(fa, fb, paired_stats.RealStats.of(s.real_feats),
                                                  paired_stats.bootstrap_indices(len(rows), reps, start)).se, "items": len(rows),
        "items_below_15db": int((psnr < 15).sum()), "recorded": int(sum(r["recorded"] for r in rows)),
        "jumped": int(sum(r["jumped"] for r in rows)), "explored": int(sum(r["explored"] for r in rows)),
        "min_psnr_jumped": float(min(r["psnr"] for r in rows if r["jumped"])) if any(r["jumped"] for r in rows) else None,
        "median_psnr_jumped": float(np.median([r["psnr"] for r in rows if r["jumped"]])) if any(r["jumped"] for r in rows) else None,
        "wall_s_per_image": float(np.mean([r["wall"] for r in rows])),
    }


def plot(windows: list[dict], path: Path, baselines: dict[str, list[dict]] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [w["end"] for w in windows]
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    ax[0].plot(x, [w["calls_ratio"] for w in windows], "o-", label="ReDi KSampler, library")
    ax[0].axhline(1.0, color="gray", ls=":", label="full run")
    ax[0].axhline(0.45, color="red", ls="--", lw=0.8, label="target 0.45")
    ax[0].set(xlabel="generations", ylabel="UNet calls / full run's", ylim=(0, 1.05), title="cost")
    ax[0].legend(fontsize=7)
    ax[1].plot(x, [w["accuracy"] for w in windows], "o-", label="ReDi")
    ax[1].plot(x, [w["accuracy_full"] for w in windows], "s--", label="full")
    ax[1].set(xlabel="generations", ylabel="attribute accuracy", title="accuracy")
    ax[1].legend(fontsize=7)
    ax[2].errorbar(x, [w["frechet"] for w in windows], yerr=[2 * w["frechet_se"] for w in windows], fmt="o-", label="ReDi (2 SE)")
    ax[2].plot(x, [w["frechet_full"] for w in windows], "s--", label="full")
    colours = ["tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive"]
    for (name, rows), c in zip((baselines or {}).items(), colours):  # the same stream, fewer steps or EasyCache, about the same cost
        bx = [w["end"] for w in rows]
        ax[0].plot(bx, [w["calls_ratio"] for w in rows], ":", marker=".", color=c, label=name)
        ax[1].plot(bx, [w["accuracy"] for w in rows], ":", marker=".", color=c, label=name)
        ax[2].plot(bx, [w["frechet"] for w in rows], ":", marker=".", color=c, label=name)
    ax[0].legend(fontsize=7)
    ax[1].legend(fontsize=7)
    ax[2].set(xlabel="generations", ylabel="Frechet distance", title="Frechet")
    ax[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


BASELINES = {"euler 8 steps": ("steps", 8), "euler 9 steps": ("steps", 9), "EasyCache 0.3": ("easycache", 0.3),
             "EasyCache 0.4": ("easycache", 0.4)}


def baselines(out: Path, reps: int) -> None:
    """The stream of OUT/results.json again with fewer steps and with EasyCache (one generation at a
    time, as a queue runs them), per window beside the curve: calls ratio (UNet calls over the full
    run's), accuracy, Frechet, images under 15 dB. Stored in results.json["baselines"]; re-plots."""
    res = json.loads((out / "results.json").read_text())
    s = Session(out, res["preset"], fresh=False)
    from comfy_extras.nodes_easycache import EasyCacheNode  # ComfyUI's path is set up by the session

    stream = session_stream(res["generations"], res["seed"])
    seeds = [it["seed"] for it in res["per_image"]]
    window = res["window"]
    refs, conds = [], {}
    for smp, seed in zip(stream, seeds):
        if smp.prompt() not in conds:
            conds[smp.prompt()] = s.kb_nodes.encode_batch(s.clip, [smp.prompt()])
        refs.append(s.decode(s.full(conds[smp.prompt()], seed)[0])[0])
    out_rows: dict[str, list[dict]] = {}
    for name, (kind, val) in BASELINES.items():
        model = EasyCacheNode.execute(s.model, val, 0.15, 0.95, False).result[0] if kind == "easycache" else s.model
        steps = val if kind == "steps" else STEPS
        rows = []
        for smp, seed, ref in zip(stream, seeds, refs):
            net = importlib.import_module("benchmark_feature_reuse").Accounting()
            latent = torch.zeros(1, 4, 8, 8)
            ph = s.cs.Phases(net.attach(model), steps, CFG, SAMPLER, SCHEDULER, s.negative, preview=False)
            img = s.decode(ph.full(conds[smp.prompt()], latent, s.cs.noise_for(latent, [seed]), seed).float().cpu())[0]
            rows.append({"sample": smp, "img": img, "ref": ref, "calls": net.net_calls, "full_calls": STEPS,
                         "psnr": float(evaluator.psnr(img[None], ref[None])[0]), "jumped": False, "explored": False,
                         "recorded": 0, "wall": 0.0})
        out_rows[name] = [window_row(s, rows[a : a + window], a, reps) for a in range(0, len(rows), window)]
        w = out_rows[name][-1]
        print(f"{name}: last window calls {w['calls_ratio']:.3f} acc {w['accuracy']:.3f}/{w['accuracy_full']:.3f} "
              f"FD {w['frechet']:.2f}/{w['frechet_full']:.2f} <15dB {w['items_below_15db']}", flush=True)
    res["baselines"] = out_rows
    (out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    plot(res["windows"], out / "learning_curve.png", out_rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--generations", type=int, default=500)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--window", type=int, default=100)
    p.add_argument("--preset", default="balanced", choices=["fidelity", "balanced", "speed"])
    p.add_argument("--seed", type=int, default=2026, help="the session's prompt stream and seeds")
    p.add_argument("--check-every", type=int, default=10, help="re-run every n-th full-sampled image in full to check it")
    p.add_argument("--bootstrap", type=int, default=200)
    p.add_argument("--explore-warmup", type=int, default=None, help="override the preset's exploration warm-up size (trajectories)")
    p.add_argument("--explore-density", type=float, default=None, help="override the preset's exploration density factor (0: off)")
    p.add_argument("--baselines", action="store_true", help="add fewer steps and EasyCache on the same stream to OUT's curve")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.baselines:
        return baselines(args.out, args.bootstrap)
    s = Session(args.out, args.preset)
    adaptive = importlib.import_module("redi_accelerate.redi_core.adaptive")
    rule = adaptive.EXPLORATION[args.preset]
    rule = adaptive.Exploration(rule.min_trajectories if args.explore_warmup is None else args.explore_warmup,
                                rule.density_factor if args.explore_density is None else args.explore_density)
    adaptive.EXPLORATION[args.preset] = rule
    stream = session_stream(args.generations, args.seed)
    seeds = np.random.default_rng(args.seed + 1).integers(0, 2**31, size=args.generations)
    conds: dict[str, object] = {}
    rows: list[dict] = []
    windows: list[dict] = []
    checks, full_sampled = [], 0
    items: list[dict] = []  # per image: its value step (None: sampled in full), nearest distance, PSNR to the full run
    t_start = time.perf_counter()
    for i, (sample, seed) in enumerate(zip(stream, seeds.tolist())):
        prompt = sample.prompt()
        if prompt not in conds:
            conds[prompt] = s.kb_nodes.encode_batch(s.clip, [prompt])
        cond = conds[prompt]
        before = s.lib.RECORDER.seconds
        out, calls, report, wall = s.redi(cond, seed)
        s.lib.RECORDER.flush()
        rec_s = s.lib.RECORDER.seconds - before
        jumped = any("jumped from step" in line for line in report)
        explored = any(line.startswith("[0] ") and "exploring" in line for line in report)
        recorded = int(any("recording 1 full" in line for line in report))
        img = s.decode(out)[0]
        if jumped:
            ref_lat, full_calls = s.full(cond, seed)
            ref = s.decode(ref_lat)[0]
        else:
            full_calls, ref = STEPS, img
            full_sampled += 1
            if full_sampled % args.check_every == 1:
                ref_lat, full_calls = s.full(cond, seed)
                checks.append(float(evaluator.psnr(img[None], s.decode(ref_lat))[0]))
                ref = s.decode(ref_lat)[0]
        psnr = float(evaluator.psnr(img[None], ref[None])[0]) if jumped else float("inf")
        step_line = next((ln for ln in report if ln.startswith("[0] ")), "")
        m = re.search(r"to step (\d+)", step_line)
        d = re.search(r"nearest key at ([0-9.]+)", step_line)
        items.append({"i": i, "prompt": prompt, "seed": int(seed), "calls": calls, "value_step": int(m.group(1)) if m else None,
                      "distance": float(d.group(1)) if d else None, "psnr": psnr if jumped else None, "explored": explored})
        rows.append({"sample": sample, "img": img, "ref": ref, "calls": calls, "full_calls": full_calls, "psnr": psnr,
                     "jumped": jumped, "explored": explored, "recorded": recorded, "wall": wall, "record_s": rec_s})
        if (i + 1) % 10 == 0:
            print(f"  {i + 1} generations, {sum(r['jumped'] for r in rows)} jumped, {sum(r['recorded'] for r in rows)} recorded, "
                  f"{time.perf_counter() - t_start:.0f}s", flush=True)
        if (i + 1) % args.window == 0 or i + 1 == args.generations:
            part = rows[len(windows) * args.window :]
            windows.append(window_row(s, part, len(windows) * args.window, args.bootstrap))
            w = windows[-1]
            print(f"[{w['start']:4d}-{w['end']:4d}] calls {w['calls_ratio']:.3f} acc {w['accuracy']:.3f}/{w['accuracy_full']:.3f} "
                  f"FD {w['frechet']:.3f}/{w['frechet_full']:.3f} (se {w['frechet_se']:.3f}) <15dB {w['items_below_15db']} "
                  f"recorded {w['recorded']} jumped {w['jumped']} explored {w['explored']} ({time.perf_counter() - t_start:.0f}s)", flush=True)
            result = {"generations": i + 1, "preset": args.preset, "seed": args.seed, "window": args.window,
                      "exploration": {"min_trajectories": rule.min_trajectories, "density_factor": rule.density_factor},
                      "settings": {"sampler": SAMPLER, "scheduler": SCHEDULER, "steps": STEPS, "cfg": CFG},
                      "windows": windows, "full_run_checks_psnr": checks,
                      "record_seconds_per_recorded": float(sum(r["record_s"] for r in rows) / max(1, sum(r["recorded"] for r in rows))),
                      "redi_wall_s_per_image": float(np.mean([r["wall"] for r in rows])),
                      "elapsed_s": time.perf_counter() - t_start, "per_image": items}
            (args.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
            plot(windows, args.out / "learning_curve.png")
    if checks and min(checks) < 50:
        raise SystemExit(f"an image ReDi sampled in full from the key step differs from its full run ({min(checks):.1f} dB): the reference shortcut is invalid")


if __name__ == "__main__":
    main()
