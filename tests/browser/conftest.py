import urllib.request
from pathlib import Path

import pytest

from .frontend import Frontend, chromium_path

OUT = Path(__file__).resolve().parents[2] / "out" / "browser"


@pytest.fixture(scope="session")
def frontend(server):
    """One headless Chromium page on the real frontend of the shared server, opened once: the
    first test sees ComfyUI's first start (a fresh browser profile)."""
    from playwright.sync_api import sync_playwright

    try:
        executable = chromium_path()
    except RuntimeError as e:
        pytest.fail(str(e))
    # A new user's first start opens the template browser over an empty graph; marked as seen,
    # the first start shows ComfyUI's default workflow (what "New" gives), which the first test runs.
    req = urllib.request.Request(server.base + "/settings/Comfy.TutorialCompleted", data=b"true", method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 200
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox", "--disable-dev-shm-usage"])
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        fe = Frontend(page, server.base, OUT)
        fe.open()
        yield fe
        browser.close()
