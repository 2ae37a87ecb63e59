import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the pure packages (kb_tools, redi_core, redi_demo.dataset/evaluator) import from the repo root
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from redi_demo.comfy_server import COMFY_DIR, ComfyServer  # noqa: E402
from redi_demo.host import host_python, host_version  # noqa: E402


def pytest_report_header(config) -> str:
    return f"ComfyUI host: {host_version()} at {COMFY_DIR} (REDI_COMFY selects it)"


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """One real ComfyUI server for the whole run, shared by the browser and integration tiers
    (so the demo KB that the example workflows build is built once)."""
    if not (COMFY_DIR / "main.py").is_file():
        pytest.fail("ComfyUI is not installed: run `bash scripts/bootstrap.sh` (scripts/test.sh does it)")
    venv = host_python().parents[1]
    if not os.environ.get("REDI_COMFY_DIR") and Path(sys.prefix).resolve() != venv.resolve():  # another host's packages (its frontend) would serve this host
        pytest.fail(f"ComfyUI {host_version()} runs from {venv.name}/bin/python, not {sys.executable} (see REDI_COMFY)")
    srv = ComfyServer(tmp_path_factory.mktemp("comfy"), sys.executable, extra_paths={"loras": "loras"})
    srv.start()
    yield srv
    srv.stop()
