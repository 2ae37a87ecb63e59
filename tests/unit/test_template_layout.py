"""The shipped templates open clean: no node (with its title bar and the room its report or image
grows into after a run) overlaps another, and each opens at a zoom that shows the whole graph."""

import json
from itertools import combinations
from pathlib import Path

import pytest

from redi_demo import workflows
from redi_demo.workflow_format import MARGIN, NOTE_TYPES, REPORT_ROOM, VIEW_H, VIEW_W, footprint

WF = Path(__file__).resolve().parents[2] / "example_workflows"
TEMPLATES = sorted(WF.glob("*.json"))


def overlaps(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_every_template_is_checked():
    assert {p.stem for p in TEMPLATES} == set(workflows.TITLES.values())


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.stem)
def test_no_overlap(path):
    nodes = json.loads(path.read_text())["nodes"]
    boxes = {n["id"]: (n["type"], footprint(n)) for n in nodes}
    hits = [(boxes[a][0], boxes[b][0]) for a, b in combinations(boxes, 2) if overlaps(boxes[a][1], boxes[b][1])]
    assert not hits, f"{path.stem}: overlapping nodes {hits}"


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.stem)
def test_opening_view_shows_the_whole_graph(path):
    ui = json.loads(path.read_text())
    ds = ui["extra"]["ds"]
    assert 0.8 <= ds["scale"] <= 1.0  # below about 0.6 the frontend draws nodes as blank boxes
    boxes = [footprint(n) for n in ui["nodes"]]
    (ox, oy), s = ds["offset"], ds["scale"]
    left, top = (min(b[0] for b in boxes) + ox) * s, (min(b[1] for b in boxes) + oy) * s
    right, bottom = (max(b[2] for b in boxes) + ox) * s, (max(b[3] for b in boxes) + oy) * s
    assert left >= 0 and top >= 0
    assert right <= VIEW_W + 2 * MARGIN and bottom <= VIEW_H + 2 * MARGIN, (right, bottom)


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.stem)
def test_template_says_what_it_shows(path):
    notes = [n for n in json.loads(path.read_text())["nodes"] if n["type"] in NOTE_TYPES]
    assert len(notes) == 1 and "Run" in notes[0]["widgets_values"][0]


def test_titles_list_in_order_and_stay_short():
    titles = list(workflows.TITLES.values())
    assert [t.split(" ")[0] for t in titles] == [str(i) for i in range(1, len(titles) + 1)]
    assert sorted(titles, key=lambda t: int(t.split(" ")[0])) == titles  # the server lists them by number (10 after 9)
    assert all(len(t) <= 28 for t in titles), titles


def test_report_room_counts_as_overlap():
    """The check is not vacuous: a node placed in the room below a ReDi node overlaps it."""
    redi = {"type": "ReDiKSampler", "pos": [0, 0], "size": [300, 200]}
    below = {"type": "VAEDecode", "pos": [0, 200 + REPORT_ROOM // 2], "size": [300, 60]}
    assert overlaps(footprint(redi), footprint(below))
    below["type"], redi["type"] = "VAEDecode", "KSampler"  # stock nodes do not grow
    assert not overlaps(footprint(redi), footprint(below))
