"""The pack in the real ComfyUI frontend (headless Chromium through Playwright): the first
start, the template browser, every example workflow loaded, queued, run and shown, the ReDi
reports readable on the nodes, and a readable error dialog. Screenshots go to out/browser/."""

import json
import re
from pathlib import Path

import pytest

from redi_demo import workflows

from .frontend import PACK

pytestmark = pytest.mark.browser
WF = Path(__file__).resolve().parents[2] / "example_workflows"
DEMO_CKPT = "redi_demo_shapes.safetensors"

# Every INT input of every ReDi node, and whether the frontend gives it a "control after
# generate" widget (randomize/increment after each run). Decided on purpose: only the sampling
# seed of ReDi KSampler changes between runs; a KB's seed must stay what it was built with.
# A new INT input fails test_int_inputs_decided until it is added here.
INT_CONTROLS = {
    ("ReDiKBBuilder", "steps"): False, ("ReDiKBBuilder", "width"): False, ("ReDiKBBuilder", "height"): False,
    ("ReDiKBBuilder", "batch_size"): False, ("ReDiKBBuilder", "seed"): False,
    ("ReDiKSampler", "seed"): True, ("ReDiKSampler", "steps"): False,
    ("ReDiKSampler", "key_step"): False, ("ReDiKSampler", "value_step"): False, ("ReDiKSampler", "neighbours"): False,
    ("ReDiSampler", "key_step"): False, ("ReDiSampler", "value_step"): False, ("ReDiSampler", "neighbours"): False,
    ("ReDiFeatureReuse", "interval"): False, ("ReDiFeatureReuse", "order"): False,
    ("ReDiKSampler", "max_trajectories"): False, ("ReDiRecord", "max_trajectories"): False, ("ReDiSampler", "max_trajectories"): False,
}


def _ui(name: str) -> dict:
    return json.loads((WF / f"{workflows.TITLES[name]}.json").read_text())


def _api(name: str) -> dict:
    return json.loads((WF / "api" / f"{name}.json").read_text())


def test_first_start_runs_the_default_workflow_on_the_demo_model(frontend):
    """A fresh browser on a fresh install. Where ComfyUI's default workflow (what "New" gives) loads a
    checkpoint with Load Checkpoint (frontend 1.32), it picks the first one offered: that must be the
    demo model, and Run must succeed. Where the default workflow needs other models (frontend 1.47's
    loads a diffusion model, a text encoder and a VAE by name), a new user starts from the template
    browser: the pack's entry there must list its workflows, and the demo one must open and run."""
    frontend.page.evaluate("async () => { if (!app.rootGraph.nodes.length) await app.loadGraphData(); }")
    types = {n["class_type"] for n in frontend.prompt().values()}
    if "CheckpointLoaderSimple" in types:
        ckpts = [n["inputs"]["ckpt_name"] for n in frontend.prompt().values() if n["class_type"] == "CheckpointLoaderSimple"]
        assert ckpts == [DEMO_CKPT], ckpts
    else:
        _open_from_template_browser(frontend, "demo_txt2img")
    # The default's 512x512 takes about 30 s a step on the demo model on a 2-core CPU: run it at
    # the demo model's own size (every other setting as ComfyUI made it).
    frontend.page.evaluate("""(size) => { for (const n of app.rootGraph.nodes) if (n.type === "EmptyLatentImage")
        for (const w of n.widgets) if (w.name === "width" || w.name === "height") w.value = size; }""", workflows.SIZE)
    prompt = frontend.prompt()
    result = frontend.run()
    assert result["end"]["type"] == "execution_success", json.dumps(result["end"])[:3000]
    saves = [k for k, n in prompt.items() if n["class_type"] == "SaveImage"]
    shown = frontend.wait_images(saves)
    assert all(shown.get(k, 0) > 0 for k in saves), shown
    frontend.frame(scale=0.8)
    frontend.screenshot("first_start")


def _open_from_template_browser(frontend, name: str) -> None:
    """As a user does: the Templates button, the pack's entry, the workflow's card (its thumbnail shown)."""
    page, title = frontend.page, workflows.TITLES[name]
    if frontend.dialogs().count() == 0:
        page.get_by_role("button", name="Templates").first.click()
    browser = frontend.dialogs().last
    browser.get_by_text(PACK, exact=True).first.click()
    thumbs = browser.get_by_role("img", name=title)
    thumbs.first.wait_for(state="visible", timeout=20000)
    # the grid renders the cards near its viewport: scroll through it, as a user does, collecting them
    seen: set[str] = set()
    for _ in range(12):
        seen |= {t for t in workflows.TITLES.values() if browser.get_by_role("img", name=t).count() >= 1}
        if len(seen) == len(workflows.TITLES):
            break
        browser.get_by_role("img").last.hover()
        page.mouse.wheel(0, 500)
        page.wait_for_timeout(300)
    missing = set(workflows.TITLES.values()) - seen
    assert not missing, f"{sorted(missing)} have no card with its thumbnail"
    for _ in range(12):  # and back up to the card to open
        if thumbs.count():
            break
        browser.get_by_role("img").first.hover()
        page.mouse.wheel(0, -500)
        page.wait_for_timeout(300)
    thumbs.first.wait_for(state="visible", timeout=20000)
    assert page.evaluate("(t) => [...document.querySelectorAll('[role=dialog] img')].some((i) => i.alt === t && i.naturalWidth > 0)", title)
    frontend.screenshot("template_browser")
    thumbs.first.click()
    frontend.wait_until("(n) => app.rootGraph.nodes.length === n", 20, arg=len(_ui(name)["nodes"]))
    assert frontend.dialogs().count() == 0, "the template browser stays open"


def test_int_inputs_decided(server, frontend):
    info = server.get("/object_info")
    ints = {(t, name) for t, node in info.items() if t.startswith("ReDi")
            for sec in ("required", "optional") for name, spec in node["input"].get(sec, {}).items() if spec[0] == "INT"}
    assert ints == set(INT_CONTROLS), f"decide control_after_generate for {sorted(ints ^ set(INT_CONTROLS))} (and list it in INT_CONTROLS)"
    # what the frontend really adds to a node fresh from the node menu
    got = frontend.page.evaluate("""(types) => Object.fromEntries(types.map((t) => {
        const n = LiteGraph.createNode(t);
        return [t, (n.widgets ?? []).filter((w) => w.name === "control_after_generate").length ? n.widgets.map((w) => [w.name, w.value]) : []];
    }))""", sorted({t for t, _ in INT_CONTROLS}))
    for (node, name), control in INT_CONTROLS.items():
        names = [w for w, _ in got[node]]
        followed = name in names and names.index(name) + 1 < len(names) and names[names.index(name) + 1] == "control_after_generate"
        assert followed == control, f"{node}.{name}: control after generate widget {'missing' if control else 'present'}: {got[node]}"
    assert not got["ReDiKBBuilder"], got["ReDiKBBuilder"]


def test_template_browser_lists_titled_workflows_with_thumbnails(server, frontend):
    listed = server.get("/workflow_templates").get(PACK, [])
    assert sorted(listed) == sorted(workflows.TITLES.values()), listed
    # fetched the way the template browser builds its URLs (names with spaces and commas)
    statuses = frontend.page.evaluate("""async ([pack, names]) => {
        const api = window.comfyAPI.api.api, out = {};
        for (const n of names) for (const ext of ["json", "jpg"]) {
            const r = await fetch(api.apiURL(`/workflow_templates/${pack}/${n}.${ext}`));
            out[`${n}.${ext}`] = [r.status, r.headers.get("content-type")];
        }
        return out;
    }""", [PACK, listed])
    for key, (status, ctype) in statuses.items():
        assert status == 200, (key, status)
        assert ("image/jpeg" if key.endswith(".jpg") else "json") in ctype, (key, ctype)


def _load(frontend, name: str) -> None:
    title = workflows.TITLES[name]
    if name == "demo_txt2img":
        frontend.drop_file((WF / f"{title}.json").read_text(), f"{title}.json")
    else:  # as the template browser opens it
        frontend.page.evaluate("""async ([pack, title]) => {
            const api = window.comfyAPI.api.api;
            const wf = await (await fetch(api.apiURL(`/workflow_templates/${pack}/${title}.json`))).json();
            await app.loadGraphData(wf, true, true, title, { openSource: "template" });
        }""", [PACK, title])
    frontend.wait_until("(n) => app.rootGraph.nodes.length === n", 20, arg=len(_ui(name)["nodes"]))


@pytest.mark.parametrize("name", list(workflows.EXAMPLES))
def test_example_workflow_in_the_frontend(frontend, name):
    _load(frontend, name)
    missing = frontend.page.evaluate("() => app.rootGraph.nodes.filter((n) => !LiteGraph.registered_node_types[n.type]).map((n) => n.type)")
    assert not missing, f"missing nodes: {missing}"
    assert frontend.prompt() == _api(name), "the frontend queues another graph than the API twin; run scripts/make_workflows.py"

    result = frontend.run()
    assert result["end"]["type"] == "execution_success", json.dumps(result["end"]["detail"])[:3000]
    api = _api(name)
    saves = [k for k, n in api.items() if n["class_type"] == "SaveImage"]
    if saves:
        frontend.frame(saves, scale=1.0)  # the page loads a node's images when it draws it
    shown = frontend.wait_images(saves)
    assert all(shown.get(k, 0) > 0 for k in saves), f"images not shown: {shown}"

    redi_nodes = sorted((k for k, n in api.items() if n["class_type"].startswith("ReDi")), key=int)
    for nid in redi_nodes:
        frontend.frame([nid], scale=1.0)
        reports = {r["id"]: r for r in frontend.reports()}  # node ids as strings (1.47 has strings, 1.32 numbers)
        assert nid in reports, f"{api[nid]['class_type']} shows no report"
        r = reports[nid]
        assert r["visible"] and r["text"].strip(), r
        assert r["scrollHeight"] <= r["clientHeight"] + 1 and r["scrollWidth"] <= r["clientWidth"] + 1, f"report cut off: {r}"
    if name == "redi_sampler_custom":  # the KB Loader shows every fingerprinted setting, the negative prompt's text too
        loader = {r["id"]: r for r in frontend.reports()}["6"]["text"]
        for needle in (f"KB {workflows.KB_NAME}:", "euler/normal, 20 steps, cfg 6.0", "seed fixed 1024", "model ", "sampling: ",
                       "negative prompt: empty", "negative conditioning: "):
            assert needle in loader, (needle, loader)
    if name == "redi_feature_reuse":  # FeatureReuse counts ReDi KSampler's key phase and finish, not only the last pass
        texts = {r["id"]: r["text"] for r in frontend.reports()}
        redi_calls = int(re.search(r"UNet calls: (\d+)", texts["7"]).group(1))
        m = re.match(r"(\d+) UNet calls in (\d+) sampling passes", texts["14"])
        assert m and int(m.group(2)) >= 2 and int(m.group(1)) == redi_calls, (texts["14"], texts["7"])
    if name == "redi_build_kb":
        values = [e["detail"]["value"] for e in result["events"] if e["type"] == "progress" and e["detail"].get("node") == "6"]
        prompts, steps, batch = 48, workflows.STEPS, 16
        assert max(values, default=0) == prompts * steps, values[-5:]
        assert len(set(values)) > prompts // batch + 1, f"progress moves only per batch: {sorted(set(values))}"
    frontend.frame(scale=0.75)
    frontend.screenshot(name)
    if name == "redi_ksampler":
        frontend.frame(["4", "6", "7"], scale=1.0)
        frontend.screenshot("redi_ksampler_report")
    assert not frontend.pack_errors(), frontend.pack_errors()


def test_mismatched_steps_show_a_readable_dialog(frontend):
    _load(frontend, "redi_ksampler")
    frontend.page.evaluate("() => { app.rootGraph.nodes.find((n) => String(n.id) === '7').widgets.find((w) => w.name === 'steps').value = 12; }")
    result = frontend.run()
    assert result["end"]["type"] == "execution_error", result["end"]
    text = frontend.error_text()
    frontend.screenshot("error_dialog")
    frontend.close_dialogs()
    first = text.strip().splitlines()[0]
    assert first.removesuffix(" failed") == "ReDi KSampler", text[:500]  # 1.32: the dialog's title; 1.47: "<node> failed"
    assert "steps" in text and "12" in text and "20" in text, text[:1000]
    assert "custom_nodes" not in text and "ReDiKSampler" not in text, text[:1000]  # no loader module path, no node id
    assert "." not in result["end"]["detail"]["exception_type"], result["end"]["detail"]["exception_type"]
