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
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox", "--disable-dev-shm-usage"])
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        fe = Frontend(page, server.base, OUT)
        fe.open()
        yield fe
        browser.close()
