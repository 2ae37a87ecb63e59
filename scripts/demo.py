"""The main job: accelerated generation in a real ComfyUI on the bundled demo model.

Starts ComfyUI on 127.0.0.1, builds a knowledge base with the ReDi KB Builder node
(kept in OUT/models/redi_kb, so a second run reuses it), then generates each demo
prompt with the stock KSampler (20 steps) and with ReDi KSampler through the HTTP
API, and writes the images, a side-by-side figure and a summary to OUT.

    .venv/bin/python scripts/demo.py [--out out/demo]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from redi_demo import dataset, workflows  # noqa: E402
from redi_demo.comfy_server import ComfyServer  # noqa: E402

DEMO_PROMPTS = [
    "a large red circle at the center on a white background",
    "a small blue square at the top left on a gray background",
    "a large yellow triangle at the bottom right on a black background",
    "a large green cross at the center on a pink background",
    "a small orange circle at the bottom left on a white background",
    "a large purple square at the top right on a gray background",
]


def run_image(srv: ComfyServer, graph: dict) -> tuple[np.ndarray, float, list[str]]:
    t0 = time.perf_counter()
    entry = srv.run(graph)
    wall = time.perf_counter() - t0
    if entry["status"]["status_str"] != "success":
        raise SystemExit(f"workflow failed: {json.dumps(srv.error_of(entry), indent=1)}")
    report = []
    for out in entry["outputs"].values():
        report += out.get("redi_report", [])
    arr = np.asarray(Image.open(srv.images(entry)[0]).convert("RGB"))
    return arr, wall, report


def figure(rows: list[tuple[str, np.ndarray, np.ndarray]], path: Path, scale: int = 3) -> None:
    s = dataset.IMAGE_SIZE * scale
    w, h = 2 * s + 460, 30 + len(rows) * (s + 8)
    fig = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(fig)
    d.text((8, 8), "full (KSampler, 20 steps)", fill="black")
    d.text((s + 16, 8), "ReDi KSampler (k=4, v=10)", fill="black")
    for r, (prompt, a, b) in enumerate(rows):
        y = 30 + r * (s + 8)
        fig.paste(Image.fromarray(a).resize((s, s), Image.NEAREST), (8, y))
        fig.paste(Image.fromarray(b).resize((s, s), Image.NEAREST), (s + 16, y))
        d.text((2 * s + 28, y + s // 2 - 6), prompt, fill="black")
    fig.save(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "out" / "demo"))
    ap.add_argument("--kb-prompts", type=int, default=128, help="trajectories in the demo KB")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    (out / "images").mkdir(parents=True, exist_ok=True)
    srv = ComfyServer(out / "comfy", sys.executable)
    print(f"starting ComfyUI (log: {srv.log_path})", flush=True)
    srv.start()
    try:
        prompts = workflows.kb_prompts(args.kb_prompts, seed=7)
        t0 = time.perf_counter()
        run_entry = srv.run(workflows.redi_build_kb(prompts), timeout=3600)
        if "already exists with other settings" in str(srv.error_of(run_entry)):
            # the demo's own KB, left by a run on an earlier demo model: rebuild it for this one
            print(f"KB {workflows.KB_NAME} was built for another model version; rebuilding it", flush=True)
            shutil.rmtree(srv.kb_dir / workflows.KB_NAME)
            run_entry = srv.run(workflows.redi_build_kb(prompts), timeout=3600)
        if run_entry["status"]["status_str"] != "success":
            raise SystemExit(f"KB build failed: {json.dumps(srv.error_of(run_entry), indent=1)}")
        print(f"KB {workflows.KB_NAME}: {args.kb_prompts} trajectories ready ({time.perf_counter() - t0:.0f}s)", flush=True)
        rows, summary = [], []
        for i, prompt in enumerate(DEMO_PROMPTS):
            full, t_full, _ = run_image(srv, workflows.demo_txt2img(prompt))
            redi, t_redi, report = run_image(srv, workflows.redi_ksampler(prompt, prompts=prompts))
            Image.fromarray(full).save(out / "images" / f"{i:02d}_full.png")
            Image.fromarray(redi).save(out / "images" / f"{i:02d}_redi.png")
            rows.append((prompt, full, redi))
            summary.append({"prompt": prompt, "full_seconds": round(t_full, 2), "redi_seconds": round(t_redi, 2), "redi_report": report})
            print(f"[{i + 1}/{len(DEMO_PROMPTS)}] {prompt}\n    full {t_full:.2f}s, ReDi {t_redi:.2f}s; " + (report[-1] if report else ""), flush=True)
        figure(rows, out / "full_vs_redi.png")
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        print(f"wrote {out / 'full_vs_redi.png'}, {out / 'images'}/ and {out / 'summary.json'}")
    finally:
        srv.stop()


if __name__ == "__main__":
    main()
