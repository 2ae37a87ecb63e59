"""The real ComfyUI frontend in headless Chromium, driven through Playwright: load a
workflow, read what Run would queue, run it and read what the page shows."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

PACK = "ComfyUI-ReDi-Accelerate"

# Page-side log of the server's messages, set up once the app has started.
LISTEN = """() => {
  window.__redi = [];
  const api = window.comfyAPI.api.api;
  for (const type of ["execution_start", "execution_success", "execution_error", "execution_interrupted", "executed", "progress", "redi.report", "redi.kbs"]) {
    api.addEventListener(type, (e) => window.__redi.push({ type, detail: e.detail }));
  }
}"""

# Every ReDi report box on the canvas: is it shown, and does its text fit without scrolling?
MEASURE_REPORTS = """() => app.rootGraph.nodes.filter((n) => n.widgets?.some((w) => w.name === "redi_report")).map((n) => {
  const el = n.widgets.find((w) => w.name === "redi_report").element;
  const r = el.getBoundingClientRect();
  return { id: String(n.id), type: n.type, text: el.value, visible: el.offsetParent !== null && r.height > 0,
           scrollHeight: el.scrollHeight, clientHeight: el.clientHeight,
           scrollWidth: el.scrollWidth, clientWidth: el.clientWidth };
})"""


def chromium_path() -> str:
    """Debian's chromium (scripts/bootstrap.sh installs it); Playwright's own browser download is blocked here."""
    for cand in (os.environ.get("REDI_CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser")):
        if cand and Path(cand).is_file():
            return cand
    raise RuntimeError("no chromium found: run `bash scripts/bootstrap.sh` (installs Debian's chromium) or set REDI_CHROMIUM")


class Frontend:
    def __init__(self, page, base: str, out: Path) -> None:
        self.page, self.base, self.out = page, base, out
        self.console: list[str] = []  # console errors and page errors
        self.failed: list[str] = []  # responses with status >= 400
        self.start_dialogs: list[str] = []
        page.on("console", lambda m: self.console.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.console.append(f"pageerror: {e}"))
        page.on("response", lambda r: self.failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)

    def open(self, timeout_s: float = 120) -> None:
        self.page.goto(self.base + "/")
        self.wait_until("() => !!window.app?.rootGraph && !!window.app?.canvas && !!window.comfyAPI?.api?.api", timeout_s)
        self.page.evaluate(LISTEN)
        # the start settles on a workflow (frontend 1.32's default) or a dialog over an empty graph (1.47's template browser)
        self.wait_until("() => app.rootGraph.nodes.length > 0 || !!document.querySelector('[role=dialog]')", timeout_s)
        self.page.wait_for_timeout(2000)  # more dialogs a start may open
        self.start_dialogs = [d.inner_text() for d in self.dialogs().all()]  # what the first start showed
        self.close_dialogs()
        assert self.dialogs().count() == 0, "a dialog stays open over the canvas"

    def dialogs(self):
        """The dialogs the user sees (PrimeVue's in frontend 1.32, reka-ui's in 1.47: both are role=dialog)."""
        return self.page.locator("[role=dialog]:visible")

    def wait_until(self, js: str, timeout_s: float = 30, arg=None):
        """Poll a page-side predicate (Playwright's wait_for_function did not see this app's state)."""
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            value = self.page.evaluate(js, arg)
            if value:
                return value
            time.sleep(0.25)
        raise AssertionError(f"timed out after {timeout_s}s waiting for {js}; console errors: {self.console[-8:]}")

    def pack_errors(self) -> list[str]:
        """Console errors and failed requests that come from this pack."""
        ours = ("redi", PACK.lower())
        # the frontend itself asks api.comfy.org about every custom node (blocked: no network here)
        return [m for m in self.console + self.failed
                if any(k in m.lower() for k in ours) and "api.comfy.org" not in m]

    def load(self, ui: dict, name: str = "workflow") -> None:
        self.page.evaluate("([wf, name]) => app.loadGraphData(wf, true, true, name)", [ui, name])

    def drop_file(self, text: str, filename: str) -> None:
        """Drop a workflow file on the canvas, as a user drags it from the file manager."""
        dt = self.page.evaluate_handle(
            "([text, name]) => { const dt = new DataTransfer(); dt.items.add(new File([text], name, {type: 'application/json'})); return dt; }",
            [text, filename])
        self.page.dispatch_event("#graph-canvas", "drop", {"dataTransfer": dt})

    def prompt(self) -> dict:
        """The API-format graph that Run would queue, without the frontend's `_meta` titles."""
        out = self.page.evaluate("async () => (await app.graphToPrompt()).output")
        return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in out.items()}

    def run(self, timeout_s: float = 900) -> dict:
        """Queue the open workflow like the Run button and wait until it finished; returns the
        execution_success, execution_error or execution_interrupted message and every message since queueing."""
        self.page.evaluate("() => { window.__redi.length = 0; }")
        self.page.evaluate("() => app.queuePrompt(0, 1)")
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            events = self.page.evaluate("() => window.__redi")
            if os.environ.get("REDI_BROWSER_DEBUG"):
                print(time.strftime("%X"), [e["type"] for e in events][-5:], flush=True)
            done = [e for e in events if e["type"] in ("execution_success", "execution_error", "execution_interrupted")]
            if done:
                self.page.wait_for_timeout(300)  # let the page show the outputs
                return {"end": done[-1], "events": self.page.evaluate("() => window.__redi")}
            time.sleep(0.5)
        raise AssertionError(f"the workflow did not finish within {timeout_s}s")

    def shown_images(self) -> dict[str, int]:
        """node id -> how many output images the page shows (loaded <img> elements) on it."""
        return self.page.evaluate("""() => Object.fromEntries(app.rootGraph.nodes
            .filter((n) => n.imgs?.length)
            .map((n) => [String(n.id), n.imgs.filter((i) => i.complete && i.naturalWidth > 0).length]))""")

    def wait_images(self, node_ids: list[str], timeout_s: float = 20) -> dict[str, int]:
        deadline = time.time() + timeout_s
        shown: dict[str, int] = {}
        while time.time() < deadline:
            shown = self.shown_images()
            if all(shown.get(i, 0) > 0 for i in node_ids):
                break
            time.sleep(0.3)
        return shown

    def frame(self, node_ids: list[str] | None = None, scale: float = 1.0) -> None:
        """Show the given nodes (default: the whole graph) at `scale`, from the top left of the canvas."""
        self.page.evaluate("""([ids, scale]) => {
            const nodes = app.rootGraph.nodes.filter((n) => !ids || ids.map(String).includes(String(n.id)));
            const x = Math.min(...nodes.map((n) => n.pos[0])), y = Math.min(...nodes.map((n) => n.pos[1]));
            const ds = app.canvas.ds; ds.scale = scale; ds.offset[0] = 40 / scale - x; ds.offset[1] = 150 / scale - y;
            app.canvas.setDirty(true, true); app.canvas.draw(true, true);
        }""", [node_ids, scale])
        self.page.wait_for_timeout(500)  # DOM widgets follow the canvas on the next frames

    def reports(self) -> list[dict]:
        return self.page.evaluate(MEASURE_REPORTS)

    def screenshot(self, name: str) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / f"{name}.png"
        self.page.screenshot(path=str(path))
        return path

    def error_text(self, timeout_s: float = 30) -> str:
        """An execution error as the user reads it, without its stack trace: frontend 1.32's error dialog, or
        1.47's notice ("<node> failed") and the error report that its "View details" opens in the side panel."""
        notice = self.page.get_by_role("status").filter(has=self.page.get_by_role("button", name="View details"))
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.dialogs().count():
                return self.dialogs().last.inner_text()
            if notice.count():
                head = notice.first.inner_text()
                notice.first.get_by_role("button", name="View details").click()
                report = self.page.get_by_text("ComfyUI Error Report").last
                report.wait_for(state="visible", timeout=timeout_s * 1000)
                return head + "\n" + report.inner_text().split("## Stack Trace")[0]
            time.sleep(0.25)
        raise AssertionError(f"no error dialog or notice within {timeout_s}s")

    def close_dialogs(self) -> None:
        """Close every open dialog with its close button (the template browser of a first start too)."""
        for _ in range(4):
            if self.dialogs().count() == 0:
                return
            close = self.dialogs().last.get_by_role("button", name="Close", exact=True)
            if close.count():
                close.last.click(timeout=5000)
            else:
                self.page.keyboard.press("Escape")
            self.page.wait_for_timeout(400)

    def active_workflow(self) -> str | None:
        return self.page.evaluate("() => app.extensionManager?.workflow?.activeWorkflow?.path ?? null")

    def switch_tab_and_back(self) -> None:
        """Open a new blank workflow in its own tab, then go back to this one (the frontend reloads
        its graph from the tab's saved state, as a click on its tab does)."""
        path = self.active_workflow()
        assert path, "no active workflow tab"
        self.page.evaluate("() => app.extensionManager.command.execute('Comfy.NewBlankWorkflow')")
        self.wait_until("(p) => app.extensionManager.workflow.activeWorkflow?.path !== p", 20, arg=path)
        self.page.wait_for_timeout(300)
        self.page.evaluate("() => app.extensionManager.command.execute('Workspace.PreviousOpenedWorkflow')")
        self.wait_until("(p) => app.extensionManager.workflow.activeWorkflow?.path === p && app.rootGraph.nodes.length > 0", 20, arg=path)
        self.page.wait_for_timeout(500)

    def saved_workflow(self) -> str:
        """The workflow file as Save and Export write it (JSON text)."""
        return self.page.evaluate("async () => JSON.stringify((await app.graphToPrompt()).workflow, null, 2)")

    def watch_title(self) -> None:
        """Record the tab title (the frontend's overall progress, "[NN%]" first while a job runs) every 50 ms."""
        self.page.evaluate("""() => { window.__rediTitles = []; clearInterval(window.__rediTitleTimer);
            window.__rediTitleTimer = setInterval(() => window.__rediTitles.push(document.title), 50); }""")

    def watched_titles(self) -> list[str]:
        return self.page.evaluate("() => { clearInterval(window.__rediTitleTimer); return window.__rediTitles; }")
