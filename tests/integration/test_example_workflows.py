"""Every example workflow runs through a real server, as a user's client would send it."""

import json
from pathlib import Path

import pytest

from redi_demo.workflow_format import ui_to_api
from redi_demo.workflows import EXAMPLES, TITLES

pytestmark = pytest.mark.integration
WF = Path(__file__).resolve().parents[2] / "example_workflows"


def test_every_example_is_listed():
    assert set(TITLES) == set(EXAMPLES)
    on_disk = {p.stem for p in WF.glob("*.json")}
    assert on_disk == set(TITLES.values()), "example_workflows/ and redi_demo/workflows.py disagree; run scripts/make_workflows.py"
    assert {p.stem for p in (WF / "api").glob("*.json")} == set(EXAMPLES)
    thumbs = {p.stem for p in WF.glob("*.jpg")}
    assert thumbs == on_disk, "a workflow has no thumbnail: run scripts/make_workflows.py --thumbnails"


def test_template_browser_lists_them_in_order(server):
    """The server answers the frontend's template list with the pack's templates as 1 to 12 (the
    file system's order otherwise; the frontend keeps the order it gets)."""
    listing = server.get("/api/workflow_templates")
    ours = [names for names in listing.values() if set(names) == set(TITLES.values())]
    assert ours == [list(TITLES.values())], listing


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_example_workflow_runs(server, name):
    api = json.loads((WF / "api" / f"{name}.json").read_text())
    ui = json.loads((WF / f"{TITLES[name]}.json").read_text())
    info = server.get("/object_info")
    assert ui_to_api(ui, info) == api, "the UI file does not queue the same graph as the API file; run scripts/make_workflows.py"
    entry = server.run(api)
    assert entry["status"]["status_str"] == "success", json.dumps(server.error_of(entry), indent=1)[:4000]
    images = server.images(entry)
    if any(n["class_type"] == "SaveImage" for n in api.values()):
        assert images, entry["outputs"]
        for path in images:
            assert path.is_file()
