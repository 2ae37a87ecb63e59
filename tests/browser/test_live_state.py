"""What the frontend keeps current and keeps (issue 29), in the real frontend: a KB built in this
session appears in every ReDi KB Loader's list without a refresh (R), a Loader added from the node
search starts on a KB that exists, a KB build moves the frontend's overall progress ("Total", shown
first in the tab title) across the whole build and says when it resumed after a cancel, and reports
survive a workflow tab switch and a save and reload. Screenshots go to out/browser/."""

import copy
import json
import re

import pytest

from kb_tools.storage.knowledge_base import KnowledgeBase
from redi_demo import workflows
from redi_demo.workflow_format import api_to_ui

pytestmark = pytest.mark.browser

KB = "session_kb"  # built by this test module only: the page started before it existed
PROMPTS, BATCH, BUILDER = 8, 2, "6"
NEGATIVE = "blurry, dark"

# A KB Loader added as from the node search (the search box adds the node the same way: createNode + add).
ADD_LOADER = """() => {
    const n = LiteGraph.createNode("ReDiKBLoader");
    const loaders = app.rootGraph.nodes.filter((m) => m.type === "ReDiKBLoader").length;
    n.pos = [700, 100 + 140 * loaders];
    app.rootGraph.add(n);
    return String(n.id);
}"""
LOADER_STATE = """(id) => {
    const n = app.rootGraph.nodes.find((n) => String(n.id) === id);
    const w = n.widgets.find((w) => w.name === "kb_name");
    return { value: w.value ?? null, values: [...(w.options?.values ?? [])] };
}"""
# Press Cancel (the api's interrupt) once the build's progress passes `at`, from the page itself so
# that the build has no time to finish first.
INTERRUPT_AT = """([node, at]) => {
    const api = window.comfyAPI.api.api;
    const once = (e) => {
        if (String(e.detail?.node) === node && e.detail.value >= at) { api.removeEventListener("progress", once); api.interrupt(); }
    };
    api.addEventListener("progress", once);
}"""
REPORT_OF = """(id) => {
    const n = app.rootGraph.nodes.find((n) => String(n.id) === id);
    const w = n?.widgets?.find((w) => w.name === "redi_report");
    return w ? w.element.value : null;
}"""


def _totals(titles: list[str]) -> list[int]:
    """The overall progress the tab title shows while a job runs ("[NN%]..." first)."""
    return [int(m.group(1)) for t in titles if (m := re.match(r"\[(\d+)%\]", t))]


def _build_ui(server) -> dict:
    g = workflows.redi_build_kb(workflows.kb_prompts(PROMPTS))
    g[BUILDER]["inputs"].update(kb_name=KB, batch_size=BATCH, negative=NEGATIVE)
    return api_to_ui(g, server.get("/object_info"))


def _wait_report(frontend, node: str, needle: str, timeout_s: float = 20) -> str:
    frontend.wait_until("([id, s]) => { const n = app.rootGraph.nodes.find((n) => String(n.id) === id);"
                        " const w = n?.widgets?.find((w) => w.name === 'redi_report'); return !!w && w.element.value.includes(s); }",
                        timeout_s, arg=[node, needle])
    return frontend.page.evaluate(REPORT_OF, node)


def _check_persists(frontend, node: str, text: str, name: str) -> None:
    """The report is back after a tab switch, is in the saved workflow, and is back after reloading that file."""
    frontend.switch_tab_and_back()
    assert frontend.page.evaluate(REPORT_OF, node) == text, "the report did not survive a workflow tab switch"
    frontend.frame([node], scale=1.0)
    r = {x["id"]: x for x in frontend.reports()}[node]
    assert r["visible"] and r["scrollHeight"] <= r["clientHeight"] + 1, f"report cut off after the tab switch: {r}"
    frontend.screenshot(f"{name}_after_tab_switch")

    text_file = frontend.saved_workflow()
    saved = json.loads(text_file)
    props = next(n for n in saved["nodes"] if str(n["id"]) == node).get("properties", {})
    assert props.get("redi_report") == text.split("\n"), props
    frontend.page.evaluate("() => app.extensionManager.command.execute('Comfy.NewBlankWorkflow')")
    frontend.wait_until("() => app.rootGraph.nodes.length === 0", 20)
    frontend.drop_file(text_file, f"{name}_saved.json")
    frontend.wait_until("(n) => app.rootGraph.nodes.length === n", 20, arg=len(saved["nodes"]))
    frontend.page.wait_for_timeout(300)
    assert frontend.page.evaluate(REPORT_OF, node) == text, "the report did not come back with the saved workflow"
    assert frontend.page.get_by_text("Invalid workflow").count() == 0, "the frontend refused the saved workflow's schema"
    frontend.frame([node], scale=1.0)
    r = {x["id"]: x for x in frontend.reports()}[node]
    assert r["visible"] and r["scrollHeight"] <= r["clientHeight"] + 1, f"report cut off after reloading: {r}"
    frontend.screenshot(f"{name}_reloaded")


def test_kb_build_resumes_with_overall_progress_and_every_loader_lists_it(server, frontend):
    assert not (server.kb_dir / KB).exists(), "this test starts from no KB of its name"
    frontend.load(_build_ui(server), "kb build, resumed")
    frontend.wait_until("() => app.rootGraph.nodes.length === 2", 20)
    early = frontend.page.evaluate(ADD_LOADER)  # a Loader on the canvas before the KB exists
    assert KB not in frontend.page.evaluate(LOADER_STATE, early)["values"]

    # Run, and cancel during the second batch: the first batch stays stored.
    steps = workflows.STEPS
    frontend.page.evaluate(INTERRUPT_AT, [BUILDER, BATCH * steps + 1])
    frontend.watch_title()
    first = frontend.run()
    titles = frontend.watched_titles()
    assert first["end"]["type"] == "execution_interrupted", first["end"]
    stored = len(KnowledgeBase.open(server.kb_dir / KB))
    assert 0 < stored < PROMPTS, stored

    # Every Loader lists the new KB without R; the one added before it existed now holds a KB that exists.
    frontend.wait_until("([id, kb]) => app.rootGraph.nodes.find((n) => String(n.id) === id)"
                        ".widgets.find((w) => w.name === 'kb_name').options.values.includes(kb)", 15, arg=[early, KB])
    state = frontend.page.evaluate(LOADER_STATE, early)
    assert state["value"] in state["values"], state
    late = frontend.page.evaluate(ADD_LOADER)  # added from search after the build: the list and a KB that exists
    state = frontend.page.evaluate(LOADER_STATE, late)
    assert KB in state["values"] and state["value"] in state["values"], state
    frontend.frame([early, late], scale=1.0)
    frontend.screenshot("kb_loader_lists_new_kb")

    # Run again: the build resumes, its progress starts from what is stored, and its report says so.
    frontend.watch_title()
    second = frontend.run()
    titles += frontend.watched_titles()
    assert second["end"]["type"] == "execution_success", str(second["end"])[:2000]
    values = [e["detail"]["value"] for e in second["events"] if e["type"] == "progress" and str(e["detail"].get("node")) == BUILDER]
    assert values and values[0] >= stored * steps and max(values) == PROMPTS * steps, values[:5]
    report = _wait_report(frontend, BUILDER, "resumed:")
    assert f"resumed: {stored} of {PROMPTS} trajectories already stored" in report, report
    assert f"KB {KB}: {PROMPTS} trajectories" in report, report

    # The overall progress follows the build (without the pack's help it sits at 1 of 2 nodes, 50%).
    totals = _totals(titles)
    assert any(50 < v < 100 for v in totals) and len({v for v in totals if v < 100}) >= 5, f"Total did not follow the build: {sorted(set(totals))}"

    # The KB keeps the negative prompt's text: the KB Loader's report can show it.
    assert KnowledgeBase.open(server.kb_dir / KB).header.negative_prompt == NEGATIVE
    frontend.frame([BUILDER], scale=1.0)
    frontend.screenshot("kb_build_resumed")
    _check_persists(frontend, BUILDER, report, "kb_build_report")
    assert not frontend.pack_errors(), frontend.pack_errors()


def _two_pass_graph() -> dict:
    """FeatureReuse feeding two KSamplers: two sampling passes in one prompt."""
    g = workflows.feature_reuse()
    g["16"] = copy.deepcopy(g["5"])
    g["16"]["inputs"]["seed"] = 7
    g["17"] = {"class_type": "VAEDecode", "inputs": {"samples": ["16", 0], "vae": ["1", 2]}}
    g["18"] = {"class_type": "SaveImage", "inputs": {"images": ["17", 0], "filename_prefix": "feature_reuse_two_pass"}}
    return g


def test_feature_reuse_reports_every_pass_and_the_report_persists(server, frontend):
    api = _two_pass_graph()
    frontend.load(api_to_ui(api, server.get("/object_info")), "feature reuse, two passes")
    frontend.wait_until("(n) => app.rootGraph.nodes.length === n", 20, arg=len(api))
    result = frontend.run()
    assert result["end"]["type"] == "execution_success", str(result["end"])[:2000]
    report = _wait_report(frontend, "14", "sampling passes")
    lines = report.split("\n")
    m = re.match(r"(\d+) UNet calls in 2 sampling passes", lines[0])
    passes = [int(re.match(r"pass \d: (\d+) calls", ln).group(1)) for ln in lines if ln.startswith("pass ")]
    assert m and len(passes) == 2 and sum(passes) == int(m.group(1)), report
    frontend.frame(["14"], scale=1.0)
    frontend.screenshot("feature_reuse_two_passes")
    _check_persists(frontend, "14", report, "feature_reuse_report")
    assert not frontend.pack_errors(), frontend.pack_errors()
