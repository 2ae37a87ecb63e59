"""Regenerate example_workflows/ (UI format) and example_workflows/api/ (API format)
from redi_demo/workflows.py, using a real ComfyUI's /object_info for widget order.

    .venv/bin/python scripts/make_workflows.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from redi_demo.comfy_server import ComfyServer  # noqa: E402
from redi_demo.workflow_format import api_to_ui  # noqa: E402
from redi_demo.workflows import EXAMPLES  # noqa: E402


def main() -> None:
    out = ROOT / "example_workflows"
    (out / "api").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        srv = ComfyServer(Path(tmp), sys.executable)
        srv.start()
        try:
            info = srv.get("/object_info")
        finally:
            srv.stop()
    for name, make in EXAMPLES.items():
        api = make()
        (out / "api" / f"{name}.json").write_text(json.dumps(api, indent=1) + "\n")
        (out / f"{name}.json").write_text(json.dumps(api_to_ui(api, info), indent=1) + "\n")
        print("wrote", name)


if __name__ == "__main__":
    main()
