import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the pure packages (kb_tools, redi_core, redi_demo.dataset/evaluator) import from the repo root
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from redi_demo.comfy_server import COMFY_DIR, ComfyServer  # noqa: E402


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """One real ComfyUI server for the whole run, shared by the browser and integration tiers
    (so the demo KB that the example workflows build is built once)."""
    if not (COMFY_DIR / "main.py").is_file():
        pytest.fail("ComfyUI is not installed: run `bash scripts/bootstrap.sh` (scripts/test.sh does it)")
    srv = ComfyServer(tmp_path_factory.mktemp("comfy"), sys.executable, extra_paths={"loras": "loras"})
    srv.start()
    yield srv
    srv.stop()
