"""The pack's one benchmark: cost against quality on the demo model, in one process.

    .venv/bin/python scripts/benchmark.py [--out out/bench] [--queries 1000] [--quick]

Prints a markdown table (also OUT/results.md, OUT/results.json) and writes the plot
OUT/cost_quality.png. Every ratio is measured in the same run on the same machine:
  - full: euler, 20 steps, cfg 6 (the reference for wall-time ratios and PSNR/SSIM)
  - fewer steps at the same NFE as each ReDi setting
  - ReDi over several (k, v, H), KB sizes, same-seed and new-seed queries
  - FeatureReuse (FRDiff) intervals with and without score mixing, EasyCache, and the
    speed of FeatureReuse on an SD1.5-size UNet (random weights; speed only)
  - faiss query time against KB size
Quality: the evaluator's attribute accuracy, a Frechet distance in its feature space
against real dataset images, PSNR/SSIM to the full-step image of the same prompt and seed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from redi_core.landing import finish_groups  # noqa: E402
from redi_demo import dataset, demo_models, evaluator, host  # noqa: E402
from redi_demo.train import init_weights  # noqa: E402

MODEL = demo_models.MODELS["sd1"]
STEPS, CFG, SAMPLER, SCHEDULER = MODEL.steps, MODEL.cfg, MODEL.sampler, MODEL.scheduler
SEED = 1024
PER_IMAGE_SEED_BASE = 70000


def use_model(name: str) -> None:
    """Measure another demo model (demo_models.MODELS): its checkpoint and sampling settings, for every Bench."""
    global MODEL, STEPS, CFG, SAMPLER, SCHEDULER
    MODEL = demo_models.MODELS[name]
    STEPS, CFG, SAMPLER, SCHEDULER = MODEL.steps, MODEL.cfg, MODEL.sampler, MODEL.scheduler


class Bench:
    def __init__(self, out: Path, queries: int, batch: int, prompt_seed: int = 999, seed_base: int = PER_IMAGE_SEED_BASE) -> None:
        host.load_pack()
        self.kb_nodes = importlib.import_module("redi_accelerate.nodes.kb_nodes")
        self.cs = importlib.import_module("redi_accelerate.comfy_adapter")
        self.rk = importlib.import_module("redi_accelerate.nodes.redi_ksampler")
        self.fr = importlib.import_module("redi_accelerate.nodes.feature_reuse")
        from redi_core.retrieval import ReDiParams, retrieve

        self.ReDiParams, self.retrieve = ReDiParams, retrieve
        self.model, self.clip, self.vae = host.load_checkpoint(ROOT / "models" / MODEL.ckpt)
        self.out, self.batch = out, batch
        self.net = evaluator.load()
        real, _ = evaluator.real_images(max(queries, 1000), 31337)
        _, self.real_feats = evaluator.predict(self.net, real)
        neg = self.clip.encode_from_tokens(self.clip.tokenize(""), return_pooled=True)
        self.negative = [[neg[0], {"pooled_output": neg[1]} if neg[1] is not None else {}]]  # the DiT reads the pooled vector
        self.rows: list[dict] = []
        self.refs: dict[str, np.ndarray] = {}
        self.seed_base = seed_base
        self.noise_guard = True  # the guard's noise-level checks (off: to calibrate them)
        self.items: list[dict] = []  # every ReDi item's guard statistics, in generation order
        self.set_queries(dataset.random_samples(queries, prompt_seed))

    def set_queries(self, samples: list) -> None:
        """Query prompts; `key_conds` holds their content-only conditionings (Style Split's)."""
        from redi_core.style_split import split_prompt

        self.samples = samples
        self.prompts = [s.prompt() for s in samples]
        b = self.batch
        self.conds = [self.kb_nodes.encode_batch(self.clip, self.prompts[i : i + b]) for i in range(0, len(samples), b)]
        content = [split_prompt(p).content for p in self.prompts]
        self.key_conds = [self.kb_nodes.encode_batch(self.clip, content[i : i + b]) for i in range(0, len(samples), b)]

    # --- generation -------------------------------------------------------------------
    @torch.no_grad()
    def _decode(self, latent: torch.Tensor) -> np.ndarray:
        return (self.vae.decode(latent).clamp(0, 1).numpy() * 255).round().astype(np.uint8)

    def _seeds(self, regime: str, i: int, n: int) -> list[int]:
        """"same": every query at the KB's fixed seed (the paper's regime); "new": seeds 5000 + i;
        "per-image": seeds seed_base + i (an artist's regime: a seed per image, none the KB used)."""
        if regime == "same":
            return [SEED] * n
        base = self.seed_base if regime == "per-image" else 5000
        return [base + i + j for j in range(n)]

    def generate(self, run, regime: str, model=None) -> tuple[np.ndarray, float, int]:
        counter = self.rk.NFECounter()
        m = counter.attach(model or self.model)
        imgs, wall = [], 0.0
        for bi, cond in enumerate(self.conds):
            i = bi * self.batch
            n = cond[0][0].shape[0]
            latent = torch.zeros((n, 4, 8, 8))
            noise = self.cs.noise_for(latent, self._seeds(regime, i, n))
            t0 = time.perf_counter()
            out = run(m, cond, latent, noise, self.key_conds[bi])
            wall += time.perf_counter() - t0
            imgs.append(self._decode(out))
        return np.concatenate(imgs), wall, counter.calls

    def full(self, steps: int, sampler: str = SAMPLER):
        def run(m, cond, latent, noise, _key_cond):
            return self.cs.Phases(m, steps, CFG, sampler, SCHEDULER, self.negative, preview=False).full(cond, latent, noise, SEED).float().cpu()

        return run

    def redi(self, kb, k: int, v: int, h: int, space: str, content_key: bool = False):
        params = self.ReDiParams(k, v, h, space)

        def run(m, cond, latent, noise, key_cond):
            ph = self.cs.Phases(m, STEPS, CFG, SAMPLER, SCHEDULER, self.negative, preview=False)
            state = ph.key_phase(key_cond if content_key else cond, latent, noise, SEED, k)
            levels = self.cs.noise_levels_of(m, ph.sigmas, k, v)
            ret = self.retrieve(kb, state, params, float(ph.sigmas[v]), noise=levels if self.noise_guard else None)
            out = torch.zeros(latent.shape)

            def finish(start, idx, src, landing):
                out[idx] = ph.finish(cond, src, start, SEED, rows=idx, landing=landing).float().cpu()
                return ph.last_finish.landed

            finish_groups(finish, list(ret.starts(state, params)), ret, state, params)  # the guard's landing check too
            self.items.extend({"key_ratio": levels.key, "value_ratio": levels.value, "distance": r.distances[0], "accepted": r.accepted,
                               "reason": r.reason, "landing": r.landing} for r in ret.reports)
            return out

        return run

    # --- scoring ----------------------------------------------------------------------
    def record(self, group: str, name: str, imgs: np.ndarray, wall: float, nfe: int, regime: str, ref_key: str,
               base: dict | None = None, **extra) -> dict:
        acc = evaluator.accuracy(self.net, imgs, self.samples)
        _, feats = evaluator.predict(self.net, imgs)
        ref = self.refs.get(ref_key)
        row = {
            "group": group, "name": name, "regime": regime, "nfe": nfe, "wall_s": round(wall, 2),
            "acc_mean": float(np.mean(list(acc.values()))), **{f"acc_{k}": v for k, v in acc.items()},
            "acc_content": float(np.mean([acc[k] for k in ("shape", "colour", "position", "size", "background")])),
            "frechet": evaluator.frechet_distance(feats, self.real_feats),
            "psnr": float(np.mean(evaluator.psnr(imgs, ref))) if ref is not None else float("nan"),
            "ssim": float(np.mean(evaluator.ssim(imgs, ref))) if ref is not None else float("nan"),
            **extra,
        }
        base = base or next((r for r in self.rows if r["name"] == f"full {STEPS} steps" and r["regime"] == regime), row)
        row["wall_ratio"] = row["wall_s"] / base["wall_s"]
        row["nfe_ratio"] = row["nfe"] / base["nfe"]
        self.rows.append(row)
        print(f"  {group:12s} {name:40s} nfe {nfe:6d} ({row['nfe_ratio']:.2f}) wall {row['wall_ratio']:.2f} "
              f"acc {row['acc_mean']:.3f} FD {row['frechet']:.3f} PSNR {row['psnr']:.1f} SSIM {row['ssim']:.3f}", flush=True)
        return row

    def build_kb(self, name: str, n: int, seed_mode: str, plain: bool = False,
                 steps: tuple[int, ...] = (3, 4, 5, 6, 8, 10, 12, 14)) -> object:
        from kb_tools.storage.knowledge_base import KnowledgeBase

        path = self.out / "kb" / name
        styles = ("plain",) if plain else dataset.STYLES
        prompts = [s.prompt() for s in dataset.random_samples(n, 12345, styles=styles)]
        t0 = time.perf_counter()
        self.kb_nodes.build_kb(self.model, self.clip, path, prompts, "", SAMPLER, SCHEDULER, STEPS, CFG, 64, 64, 64,
                               seed_mode, SEED, steps, progress=lambda d, t: None)
        print(f"KB {name}: {n} trajectories ({time.perf_counter() - t0:.0f}s, resumed if it existed)", flush=True)
        return KnowledgeBase.load(path, check_hash=False)


def faiss_timing(kb, sizes: list[int], step: int = 4, queries: int = 64) -> list[dict]:
    rows = []
    for n in sizes:
        sub = kb.subset(n)
        q = sub.keys("latent", step)[:queries] + 0.01
        sub.search("latent", step, q, 1)
        t0 = time.perf_counter()
        for _ in range(5):
            sub.search("latent", step, q, 4)
        rows.append({"kb_size": n, "ms_per_query": (time.perf_counter() - t0) / (5 * queries) * 1000})
    return rows


def sd15_patcher():
    """An SD1.5-architecture UNet with random weights, for the speed rows only."""
    import comfy.model_patcher
    import comfy.supported_models

    cfg = comfy.supported_models.SD15({
        "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False, "adm_in_channels": None,
        "in_channels": 4, "out_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
        "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768,
        "use_temporal_resblock": False, "use_temporal_attention": False,
    })
    torch.manual_seed(0)
    base = cfg.get_model({})
    init_weights(base.diffusion_model)
    return comfy.model_patcher.ModelPatcher(base, torch.device("cpu"), torch.device("cpu"))


def sd15_speed(fr_module, steps: int = 8, size: int = 256) -> list[dict]:
    """Wall time of FeatureReuse vs unpatched on an SD1.5-size UNet (random weights)."""
    import comfy.sample

    patcher = sd15_patcher()
    ctx = [[torch.randn(1, 77, 768) * 0.1, {}]]
    lat = torch.zeros(1, 4, size // 8, size // 8)
    noise = comfy.sample.prepare_noise(lat, 0)

    def timed(m):
        comfy.sample.sample(m, noise, 2, CFG, "euler", "normal", ctx, ctx, lat, disable_pbar=True)  # warm-up
        t0 = time.perf_counter()
        comfy.sample.sample(m, noise, steps, CFG, "euler", "normal", ctx, ctx, lat, disable_pbar=True)
        return time.perf_counter() - t0

    rows = [{"name": "unpatched", "seconds": timed(patcher)}]
    for interval, mixing in ((2, False), (2, True), (3, True)):
        m = fr_module.ReDiFeatureReuse.execute(patcher, interval, 0.0, 1.0, "all", "input,middle,output", mixing, 0.5, 0, "fixed").result[0]
        rows.append({"name": f"FeatureReuse interval {interval}, mixing {'on' if mixing else 'off'}", "seconds": timed(m)})
    for r in rows:
        r["speedup"] = rows[0]["seconds"] / r["seconds"]
    return rows


def picture_grid(columns: list[np.ndarray], titles: list[str], prompts: list[str], path: Path, scale: int = 2) -> None:
    from PIL import Image, ImageDraw

    s = dataset.IMAGE_SIZE * scale
    w, h = len(columns) * (s + 8) + 380, 24 + len(prompts) * (s + 8)
    fig = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(fig)
    for c, (col, title) in enumerate(zip(columns, titles)):
        d.text((8 + c * (s + 8), 6), title, fill="black")
        for r in range(len(prompts)):
            fig.paste(Image.fromarray(col[r]).resize((s, s), Image.NEAREST), (8 + c * (s + 8), 24 + r * (s + 8)))
    for r, p in enumerate(prompts):
        d.text((16 + len(columns) * (s + 8), 24 + r * (s + 8) + s // 2 - 6), p[:60], fill="black")
    fig.save(path)


def write_plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    colours = {"baseline": "black", "fewer steps": "tab:gray", "ReDi": "tab:blue", "ReDi KB size": "tab:cyan",
               "ReDi seeds": "tab:purple", "FeatureReuse": "tab:orange", "EasyCache": "tab:green", "ReDi+FR": "tab:red"}
    for r in rows:
        if r["regime"] != "same" or r["group"] == "stylize":
            continue
        ax.scatter(r["wall_ratio"], r["frechet"], color=colours.get(r["group"], "k"), s=30)
        ax.annotate(r["name"], (r["wall_ratio"], r["frechet"]), fontsize=6, xytext=(3, 2), textcoords="offset points")
    for g, c in colours.items():
        ax.scatter([], [], color=c, label=g)
    ax.set_xlabel("wall time / full 20-step baseline (same run, CPU)")
    ax.set_ylabel("Frechet distance to real images (lower is better)")
    ax.set_title("ReDi Accelerate on the demo model: cost vs quality (same-seed queries)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def table(rows: list[dict]) -> str:
    head = "| group | setting | queries' seeds | UNet calls (x full) | wall (x full) | acc mean | content | shape | colour | position | style | Frechet | PSNR | SSIM |"
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        lines.append(
            f"| {r['group']} | {r['name']} | {r['regime']} | {r['nfe']} ({r['nfe_ratio']:.2f}) | {r['wall_ratio']:.2f} | "
            f"{r['acc_mean']:.3f} | {r['acc_content']:.3f} | {r['acc_shape']:.3f} | {r['acc_colour']:.3f} | {r['acc_position']:.3f} | {r['acc_style']:.3f} | "
            f"{r['frechet']:.3f} | {r['psnr']:.1f} | {r['ssim']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "out" / "bench"))
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--kb-size", type=int, default=10000)
    ap.add_argument("--range-kb-size", type=int, default=2000)
    ap.add_argument("--style-kb", type=int, default=1000, help="content-only KB for the stylization rows")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--quick", action="store_true", help="200 queries, KB of 1000: a smoke run")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.quick:
        args.queries, args.kb_size, args.range_kb_size, args.style_kb = 100, 300, 200, 200
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    b = Bench(out, args.queries, args.batch)
    kb = b.build_kb(f"fixed_{args.kb_size}", args.kb_size, "fixed")
    kb_range = b.build_kb(f"range_{args.range_kb_size}", args.range_kb_size, "range")
    print(f"\n{len(b.prompts)} queries; machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads\n")

    for regime in ("same", "new"):
        imgs, wall, nfe = b.generate(b.full(STEPS), regime)
        b.refs[regime] = imgs
        b.record("baseline", f"full {STEPS} steps", imgs, wall, nfe, regime, regime)
    configs = [(3, 10, 1), (4, 10, 1), (4, 12, 1), (4, 14, 1), (3, 14, 1), (4, 10, 4), (6, 14, 1)]
    for k, v, h in configs:
        imgs, wall, nfe = b.generate(b.redi(kb, k, v, h, "latent"), "same")
        b.record("ReDi", f"ReDi k={k} v={v} H={h}", imgs, wall, nfe, "same", "same", k=k, v=v, h=h)
    for n_steps in sorted({k + STEPS - v for k, v, _ in configs}):
        imgs, wall, nfe = b.generate(b.full(n_steps), "same")
        b.record("fewer steps", f"euler {n_steps} steps", imgs, wall, nfe, "same", "same")
    kb_sizes = sorted({n for n in (100, 1000) if n < len(kb)} | {len(kb)})
    for size in kb_sizes:
        imgs, wall, nfe = b.generate(b.redi(kb.subset(size), 4, 10, 1, "latent"), "same")
        b.record("ReDi KB size", f"ReDi k=4 v=10, KB {size}", imgs, wall, nfe, "same", "same", kb_size=size)
    for name, base_kb, space in (("fixed-seed KB, latent keys", kb, "latent"), ("fixed-seed KB, denoised keys", kb, "denoised"),
                                 ("range-seed KB, denoised keys", kb_range, "denoised")):
        imgs, wall, nfe = b.generate(b.redi(base_kb, 4, 10, 1, space), "new")
        b.record("ReDi seeds", f"ReDi k=4 v=10, {name}", imgs, wall, nfe, "new", "new")
    imgs, wall, nfe = b.generate(b.redi(kb, 4, 10, 1, "denoised"), "same")
    b.record("ReDi seeds", "ReDi k=4 v=10, denoised keys", imgs, wall, nfe, "same", "same")

    for interval, mixing in ((2, False), (2, True), (3, True), (4, True)):
        m = b.fr.ReDiFeatureReuse.execute(b.model, interval, 0.0, 1.0, "all", "input,middle,output", mixing, 0.5, 0, "fixed").result[0]
        imgs, wall, nfe = b.generate(b.full(STEPS), "same", model=m)
        b.record("FeatureReuse", f"FR interval {interval}, mixing {'on' if mixing else 'off'}", imgs, wall, nfe, "same", "same")
    from comfy_extras.nodes_easycache import EasyCacheNode

    for thr in (0.2, 0.5):
        m = EasyCacheNode.execute(b.model, thr, 0.15, 0.95, False).result[0]
        imgs, wall, nfe = b.generate(b.full(STEPS), "same", model=m)
        b.record("EasyCache", f"EasyCache threshold {thr}", imgs, wall, nfe, "same", "same")
    m = b.fr.ReDiFeatureReuse.execute(b.model, 2, 0.0, 1.0, "all", "input,middle,output", True, 0.5, 0, "fixed").result[0]
    imgs, wall, nfe = b.generate(b.redi(kb, 4, 10, 1, "latent"), "same", model=m)
    b.record("ReDi+FR", "ReDi k=4 v=10 + FR interval 2", imgs, wall, nfe, "same", "same")

    # zero-shot stylization: a KB of content-only prompts serves prompts with styles it never saw
    style_kb = b.build_kb(f"content_only_{args.style_kb}", args.style_kb, "fixed", plain=True)
    b.set_queries(dataset.random_samples(args.queries, 4321, styles=dataset.STYLES[1:]))
    imgs, wall, nfe = b.generate(b.full(STEPS), "same")
    b.refs["style"] = imgs
    style_rows = []
    style_rows.append(b.record("stylize", f"(a) full {STEPS} steps, full prompt", imgs, wall, nfe, "same", "style"))
    style_imgs = [imgs[:6]]
    for label, content_key in (("(b) ReDi k=4 v=10 + Style Split (content key)", True), ("(c) ReDi k=4 v=10, full prompt for the key", False)):
        imgs, wall, nfe = b.generate(b.redi(style_kb, 4, 10, 1, "latent", content_key=content_key), "same")
        style_rows.append(b.record("stylize", label, imgs, wall, nfe, "same", "style", base=style_rows[0]))
        style_imgs.append(imgs[:6])
    imgs, wall, nfe = b.generate(b.full(14), "same")
    style_rows.append(b.record("stylize", "(d) euler 14 steps (same NFE as ReDi)", imgs, wall, nfe, "same", "style", base=style_rows[0]))
    style_imgs.append(imgs[:6])
    picture_grid(style_imgs, ["(a) full", "(b) ReDi + Style Split", "(c) ReDi, full-prompt key", "(d) 14 steps"],
                 b.prompts[:6], out / "stylize_grid.png")

    faiss_rows = faiss_timing(kb, kb_sizes)
    speed_rows = sd15_speed(b.fr)
    md = [table(b.rows), "", "faiss query time (exact L2, latent keys of 256 floats):", "",
          "| KB size | ms per query |", "|---|---|"]
    md += [f"| {r['kb_size']} | {r['ms_per_query']:.4f} |" for r in faiss_rows]
    md += ["", "FeatureReuse speed on an SD1.5-size UNet (random weights, 256x256, 8 euler steps, cfg 6, CPU):", "",
           "| setting | seconds | speed-up |", "|---|---|---|"]
    md += [f"| {r['name']} | {r['seconds']:.2f} | {r['speedup']:.2f}x |" for r in speed_rows]
    text = "\n".join(md)
    print("\n" + text)
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps({"rows": b.rows, "faiss": faiss_rows, "sd15_speed": speed_rows,
                                                  "machine": platform.platform(), "threads": torch.get_num_threads()}, indent=1))
    write_plot(b.rows, out / "cost_quality.png")
    print(f"\nwrote {out / 'results.md'}, {out / 'results.json'}, {out / 'cost_quality.png'}, {out / 'stylize_grid.png'}")


if __name__ == "__main__":
    main()
