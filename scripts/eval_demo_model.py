"""Quality of a shipped demo model at its default settings, scored by the evaluator.

    .venv/bin/python scripts/eval_demo_model.py [--ckpt models/redi_demo_shapes.safetensors] [--n 1000] [--out out/eval]

--ckpt picks either demo model (the SD1.x UNet or the Flux DiT, redi_demo/demo_models.py); each is
sampled at its own defaults (SD1.x: euler, normal, 20 steps, cfg 6; DiT: euler, simple, 20 steps,
cfg 3). Generates N images (seed 5000+i) for N random dataset prompts,
prints the evaluator's table (attribute accuracy, Frechet distance to real images, the
evaluator's own accuracy on real images) and writes a sample grid with prompts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import benchmark  # noqa: E402

from redi_demo import dataset, demo_models, evaluator  # noqa: E402


def grid(images: np.ndarray, prompts: list[str], path: Path, cols: int = 4, rows: int = 4, scale: int = 3) -> None:
    s = dataset.IMAGE_SIZE * scale
    cell_w, cell_h = 250, s + 44
    fig = Image.new("RGB", (cols * cell_w, rows * cell_h), "white")
    d = ImageDraw.Draw(fig)
    for i in range(min(len(images), cols * rows)):
        x, y = (i % cols) * cell_w, (i // cols) * cell_h
        fig.paste(Image.fromarray(images[i]).resize((s, s), Image.NEAREST), (x + (cell_w - s) // 2, y + 2))
        words = prompts[i].split()
        lines, cur = [], ""
        for w in words:
            if len(cur) + len(w) > 40:
                lines.append(cur)
                cur = w
            else:
                cur = (cur + " " + w).strip()
        lines.append(cur)
        for j, ln in enumerate(lines[:3]):
            d.text((x + 4, y + s + 4 + 12 * j), ln, fill="black")
    fig.save(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default=str(ROOT / "models" / demo_models.MODELS["sd1"].ckpt), help="a demo model's checkpoint")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--out", default=str(ROOT / "out" / "eval"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = demo_models.by_checkpoint(args.ckpt)
    benchmark.use_model(model.name)
    b = benchmark.Bench(out, args.n, 100)
    setting = f"{model.sampler} {model.scheduler} {model.steps} steps, cfg {model.cfg:g}"
    imgs, wall, nfe = b.generate(b.full(model.steps), "new")
    acc = evaluator.accuracy(b.net, imgs, b.samples)
    _, feats = evaluator.predict(b.net, imgs)
    real, real_samples = evaluator.real_images(args.n, 777)
    _, real_feats = evaluator.predict(b.net, real)
    self_acc = evaluator.accuracy(b.net, real, real_samples)
    fd = evaluator.frechet_distance(feats, b.real_feats)
    fd_real = evaluator.frechet_distance(real_feats, b.real_feats)
    lines = [
        f"| images | {' | '.join(dataset.ATTRIBUTES)} | Frechet distance to real |",
        "|---|" + "---|" * (len(dataset.ATTRIBUTES) + 1),
        f"| {model.title}, {args.n} generated ({setting}) | " + " | ".join(f"{acc[k]:.1%}" for k in dataset.ATTRIBUTES) + f" | {fd:.3f} |",
        f"| real dataset images, {args.n} (the evaluator's own accuracy) | " + " | ".join(f"{self_acc[k]:.1%}" for k in dataset.ATTRIBUTES) + f" | {fd_real:.3f} |",
    ]
    text = "\n".join(lines)
    print(text)
    print(f"\ngeneration: {wall:.1f}s for {args.n} images, {nfe} network calls")
    (out / "model_eval.md").write_text(text + "\n")
    (out / "model_eval.json").write_text(json.dumps({"accuracy": acc, "evaluator_self_accuracy": self_acc, "frechet": fd,
                                                     "frechet_real_vs_real": fd_real, "n": args.n,
                                                     "model": model.name, "checkpoint": model.ckpt, "setting": setting}, indent=1))
    grid(imgs, b.prompts, out / "demo_samples.png")
    print(f"wrote {out / 'model_eval.md'} and {out / 'demo_samples.png'}")


if __name__ == "__main__":
    main()
