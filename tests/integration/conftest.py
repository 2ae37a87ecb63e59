import sys

import pytest

from redi_demo.comfy_server import COMFY_DIR, ComfyServer


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    if not (COMFY_DIR / "main.py").is_file():
        pytest.fail("ComfyUI is not installed: run `bash scripts/bootstrap.sh` (scripts/test.sh does it)")
    srv = ComfyServer(tmp_path_factory.mktemp("comfy"), sys.executable)
    srv.start()
    yield srv
    srv.stop()
