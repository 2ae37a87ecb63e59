"""Regenerate example_workflows/ from redi_demo/workflows.py, using a real ComfyUI's
/object_info for widget order:

- example_workflows/TITLE.json: UI format (what the frontend loads; TITLE from workflows.TITLES),
- example_workflows/api/NAME.json: its API-format twin (what the frontend must queue),
- with --thumbnails, example_workflows/TITLE.jpg: the template browser's thumbnail, an image
  the workflow produces, rendered by running it on the demo model (takes a few minutes: the
  KB workflows build the demo KB first).

    .venv/bin/python scripts/make_workflows.py [--thumbnails [--only NAME,NAME]]

tests/browser checks that the frontend queues exactly each API twin; run this script when a
node's inputs change (the test then says so).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from redi_demo import workflows  # noqa: E402
from redi_demo.comfy_server import ComfyServer  # noqa: E402
from redi_demo.workflow_format import api_to_ui  # noqa: E402

OUT = ROOT / "example_workflows"
THUMB_PX = 256


def write_workflows(info: dict) -> None:
    (OUT / "api").mkdir(parents=True, exist_ok=True)
    keep = set()
    for name, make in workflows.EXAMPLES.items():
        api = make()
        title = workflows.TITLES[name]
        (OUT / "api" / f"{name}.json").write_text(json.dumps(api, indent=1) + "\n")
        ui = api_to_ui(api, info, note=workflows.NOTES[name])
        (OUT / f"{title}.json").write_text(json.dumps(ui, indent=1) + "\n")
        keep |= {f"{title}.json", f"{title}.jpg"}
        print("wrote", title)
    for stale in [*OUT.glob("*.json"), *OUT.glob("*.jpg")]:
        if stale.name not in keep:
            stale.unlink()
            print("removed", stale.name)


def _tile(paths: list[Path]):
    from PIL import Image

    images = [Image.open(p).convert("RGB") for p in paths]
    cols = 1 if len(images) == 1 else 2
    rows = -(-len(images) // cols)
    cell = THUMB_PX // cols
    sheet = Image.new("RGB", (THUMB_PX, cell * rows), "white")
    for i, img in enumerate(images):
        sheet.paste(img.resize((cell, cell), Image.NEAREST), ((i % cols) * cell, (i // cols) * cell))
    return sheet


def write_thumbnails(srv: ComfyServer, only: set[str] | None = None) -> None:
    for name, make in workflows.EXAMPLES.items():
        if only and name not in only:
            continue
        entry = srv.run(make(), timeout=3600)
        if entry["status"]["status_str"] != "success":
            raise SystemExit(f"{name} failed: {json.dumps(srv.error_of(entry))[:2000]}")
        images = srv.images(entry)
        if not images:
            # the KB builder saves no image: show four of the images whose trajectories it stores
            prompts = workflows.kb_prompts().splitlines()[:4]
            images = [srv.images(srv.run(workflows.demo_txt2img(p)))[0] for p in prompts]
        _tile(images[:4]).save(OUT / f"{workflows.TITLES[name]}.jpg", quality=90)
        print("thumbnail", name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--thumbnails", action="store_true", help="also render the .jpg thumbnails (runs every workflow)")
    ap.add_argument("--only", default="", help="with --thumbnails: render only these workflows (comma-separated names, e.g. "
                    "redi_record,redi_library; run in the order of workflows.EXAMPLES)")
    args = ap.parse_args()
    only = {n.strip() for n in args.only.split(",") if n.strip()}
    if only - set(workflows.EXAMPLES):
        raise SystemExit(f"unknown workflows {sorted(only - set(workflows.EXAMPLES))}; choose from {list(workflows.EXAMPLES)}")
    with tempfile.TemporaryDirectory() as tmp:
        srv = ComfyServer(Path(tmp), sys.executable)
        srv.start()
        try:
            write_workflows(srv.get("/object_info"))
            if args.thumbnails:
                write_thumbnails(srv, only)
        finally:
            srv.stop()


if __name__ == "__main__":
    main()
