// ReDi Accelerate in the ComfyUI frontend:
// - each ReDi node's report (what it retrieved, skipped, reused, how it split a prompt) is shown in a
//   read-only text box on the node, and the node grows so that the whole report is readable;
// - ReDi Sampler and FeatureReuse report after the sampling they take part in (a "redi.report" message);
// - error dialogs of ReDi nodes are titled with the node's display name and name the exception
//   by its class, not by the loader's absolute module path;
// - a report is kept in the node's properties: it comes back after a workflow tab switch and is
//   saved and restored with the workflow;
// - every ReDi KB Loader lists the KBs the server has now (a build's start and end, a poll of
//   GET /redi/kbs for KBs written by other tools), and a Loader added from search starts on one;
// - during a KB build, the frontend's overall progress ("Total", the tab title) follows the build.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const REPORT_WIDGET = "redi_report";
const FONT_PX = 11;
const LINE_PX = 15; // line height of the report box (FONT_PX * ~1.35)
const PAD_PX = 10; // the textarea's padding and border, top + bottom
const SIDE_PX = 30; // node margins plus the textarea's padding, left + right

let measureCtx = null;

function textWidth(text) {
  measureCtx ??= document.createElement("canvas").getContext("2d");
  measureCtx.font = `${FONT_PX}px monospace`;
  return measureCtx.measureText(text).width;
}

// Visual lines of `text` wrapped at `width` px (a textarea breaks long lines at spaces).
function wrappedLines(text, width) {
  let count = 0;
  for (const line of text.split("\n")) {
    let rows = 1;
    let used = 0;
    for (const word of line.split(/(?<= )/)) {
      const w = textWidth(word);
      if (used > 0 && used + w > width) {
        rows += 1;
        used = 0;
      }
      used += w;
      while (used > width) {
        rows += 1;
        used -= width;
      }
    }
    count += rows;
  }
  return count;
}

function reportHeight(node, text) {
  const width = Math.max(60, node.size[0] - SIDE_PX);
  return wrappedLines(text, width) * LINE_PX + PAD_PX;
}

function addReportWidget(node) {
  const el = document.createElement("textarea");
  el.readOnly = true;
  el.className = "redi-report";
  Object.assign(el.style, {
    opacity: "0.9",
    fontSize: `${FONT_PX}px`,
    lineHeight: `${LINE_PX}px`,
    fontFamily: "monospace",
    padding: "4px",
    resize: "none",
    overflow: "hidden",
    boxSizing: "border-box",
    whiteSpace: "pre-wrap",
    overflowWrap: "anywhere",
  });
  const widget = node.addDOMWidget(REPORT_WIDGET, "customtext", el, {
    getValue: () => el.value,
    setValue: (v) => {
      el.value = v;
    },
    getMinHeight: () => reportHeight(node, el.value) + (el.rediExtraPx ?? 0),
    serialize: false,
  });
  widget.serialize = false;
  // The estimate above can miss the browser's real line breaks (fonts, long paths): whenever the
  // node is drawn with its report scrolled, grow the box by what is hidden.
  const onDrawForeground = node.onDrawForeground;
  node.onDrawForeground = function () {
    onDrawForeground?.apply(this, arguments);
    const hidden = el.scrollHeight - el.clientHeight;
    if (el.clientHeight > 0 && hidden > 1) {
      el.rediExtraPx = (el.rediExtraPx ?? 0) + hidden;
      this.setSize([this.size[0], Math.max(this.size[1] + hidden, this.computeSize()[1])]);
      this.setDirtyCanvas(true, true);
    }
  };
  const onResize = node.onResize;
  node.onResize = function (size) {
    onResize?.apply(this, arguments);
    // a narrower node wraps the report into more lines: keep it tall enough
    const need = this.computeSize()[1];
    if (size[1] < need) size[1] = need;
  };
  return widget;
}

/** Shows `lines` on `node` and grows the node so that the report fits without scrolling. The
 * report is also kept in `node.properties`, so that it is serialized with the node: a workflow tab
 * switch (which reloads the graph) and a saved workflow bring it back. */
export function showReport(node, lines) {
  if (!node || !Array.isArray(lines)) return;
  lines = lines.filter((l) => typeof l === "string");
  node.properties ??= {};
  node.properties[REPORT_WIDGET] = lines;
  let widget = node.widgets?.find((w) => w.name === REPORT_WIDGET);
  if (!widget) widget = addReportWidget(node);
  widget.element.rediExtraPx = 0;
  widget.value = lines.join("\n");
  const need = node.computeSize(); // takes an out-array, not a width
  node.setSize([node.size[0], Math.max(node.size[1], need[1])]);
  node.setDirtyCanvas(true, true);
}

// A report that arrives from the server changes the node's properties without a user action: let
// the workflow's change tracker see it now, or a tab switch would reload the graph as it was before.
let trackPending = false;
function liveReport(node, lines) {
  showReport(node, lines);
  if (!node || trackPending) return;
  trackPending = true;
  setTimeout(() => {
    trackPending = false;
    try {
      app.extensionManager?.workflow?.activeWorkflow?.changeTracker?.checkState?.();
    } catch {
      // an older frontend without a change tracker: the report is still in the node's properties
    }
  }, 0);
}

function restoreReport(node) {
  const lines = node?.properties?.[REPORT_WIDGET];
  if (Array.isArray(lines) && lines.length) showReport(node, lines);
}

// ---- KB lists that stay current -------------------------------------------------------------

const LOADER = "ReDiKBLoader";
const BUILDER = "ReDiKBBuilder";
const KB_WIDGET = "kb_name";
const POLL_MS = 10000;
let kbNames = null; // the KB names the server listed last

function graphs() {
  const root = app.rootGraph ?? app.graph;
  if (!root) return [];
  const subs = root.subgraphs instanceof Map ? [...root.subgraphs.values()] : [];
  return [root, ...subs];
}

function updateLoader(node) {
  const widget = node.widgets?.find((w) => w.name === KB_WIDGET);
  if (!widget || !kbNames) return;
  widget.options ??= {};
  widget.options.values = [...kbNames];
  if (kbNames.includes(widget.value)) {
    node.rediFresh = false;
  } else if (node.rediFresh && kbNames.length) {
    // a Loader just added (not loaded from a workflow, whose choice stays as saved) starts on a KB that exists
    widget.value = kbNames[0];
    widget.callback?.(widget.value);
    node.rediFresh = false;
  }
  node.setDirtyCanvas?.(true, true);
}

// The Loader's node definition (the frontend builds a new node's widgets from it), so that a Loader
// created later gets the current list too: its V2 form ("inputs") and its V1 form ("input").
function updateLoaderDef() {
  const def = LiteGraph.registered_node_types?.[LOADER]?.nodeData;
  const v2 = def?.inputs?.[KB_WIDGET];
  if (v2 && Array.isArray(v2.options)) v2.options = [...kbNames];
  const v1 = def?.input?.required?.[KB_WIDGET];
  if (!Array.isArray(v1)) return;
  if (Array.isArray(v1[0])) v1[0] = [...kbNames];
  else if (v1[1] && Array.isArray(v1[1].options)) v1[1].options = [...kbNames];
}

function applyKbList(names) {
  if (!Array.isArray(names)) return;
  kbNames = names.filter((n) => typeof n === "string");
  updateLoaderDef();
  for (const graph of graphs()) for (const node of graph.nodes ?? []) if (node.type === LOADER) updateLoader(node);
}

let fetching = null;
function fetchKbs() {
  fetching ??= (async () => {
    try {
      const r = await api.fetchApi("/redi/kbs", { cache: "no-store" });
      if (r.ok) applyKbList((await r.json())?.kbs);
    } catch {
      // server restarting: the next poll or build message updates the lists
    } finally {
      fetching = null;
    }
  })();
  return fetching;
}

// ---- the overall progress of a KB build -----------------------------------------------------
// The frontend's "Total" (queue overlay, tab title) is the share of the job's nodes that have run,
// so a workflow whose time is all in the KB Builder sits at 1 of 2 nodes (50%) for the whole build.
// While a build runs, the job gets BUILD_SLOTS placeholder entries that fill as the build advances
// (the build then carries most of the Total); they are dropped with the job when it ends.
const BUILD_SLOTS = 100;

function executionJob() {
  try {
    const pinia = document.getElementById("vue-app")?.__vue_app__?.config?.globalProperties?.$pinia;
    const store = pinia?._s?.get?.("execution");
    const job = store?.activeJob ?? store?.activePrompt; // frontend 1.47 / 1.32
    return job && job.nodes && typeof job.nodes === "object" ? job : null;
  } catch {
    return null;
  }
}

function trackBuildProgress(detail) {
  if (!detail || !(detail.max > 0) || nodeOf(detail.node)?.type !== BUILDER) return;
  const job = executionJob();
  if (!job) return;
  const done = Math.floor((BUILD_SLOTS * Math.min(detail.value, detail.max)) / detail.max);
  for (let i = 0; i < BUILD_SLOTS; i++) {
    const key = `redi-build:${detail.node}:${i}`;
    if (job.nodes[key] !== i < done) job.nodes[key] = i < done;
  }
}

// The node a server message names: ids are numbers in frontend 1.32 and strings in 1.47, and a
// node inside a subgraph is named "outer:inner" (its top-level node carries the report).
function nodeOf(id) {
  if (id == null) return null;
  const top = String(id).split(":")[0];
  const graph = app.rootGraph ?? app.graph;
  if (!graph) return null;
  return graph.getNodeById(top) ?? graph.getNodeById(Number(top)) ?? graph.nodes?.find((n) => String(n.id) === top) ?? null;
}

function displayName(type, id) {
  const node = id == null ? null : nodeOf(id);
  return node?.title || app.nodeDefs?.[type]?.display_name || LiteGraph.registered_node_types?.[type]?.title || type;
}

// Rewrites a ReDi node's execution_error before the frontend's own handler builds its dialog,
// which then shows "ReDi KSampler" and "KBError" instead of "ReDiKSampler" and
// "/abs/path/custom_nodes/ComfyUI-ReDi-Accelerate.kb_tools.errors.KBError". (A capture listener
// did not run before the frontend's handler, so the api's dispatch of that one event is wrapped.)
function readableError(d) {
  if (!d || typeof d.node_type !== "string" || !d.node_type.startsWith("ReDi")) return;
  d.node_type = displayName(d.node_type, d.node_id);
  if (typeof d.exception_type === "string") d.exception_type = d.exception_type.split(".").pop();
}

app.registerExtension({
  name: "ReDi.Accelerate.Report",
  setup() {
    const dispatch = api.dispatchCustomEvent.bind(api);
    api.dispatchCustomEvent = (type, detail) => {
      if (type === "execution_error") readableError(detail);
      return dispatch(type, detail);
    };
    api.addEventListener("redi.report", ({ detail }) => liveReport(nodeOf(detail?.node), detail?.lines));
    api.addEventListener("redi.kbs", ({ detail }) => applyKbList(detail?.kbs));
    api.addEventListener("progress", ({ detail }) => trackBuildProgress(detail));
    fetchKbs();
    setInterval(() => {
      if (document.visibilityState === "visible") fetchKbs();
    }, POLL_MS);
    document.addEventListener("visibilitychange", () => {
      if (document.visibilityState === "visible") fetchKbs();
    });
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData?.name?.startsWith("ReDi")) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      if (message?.[REPORT_WIDGET]) liveReport(this, message[REPORT_WIDGET]);
    };
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const r = onConfigure?.apply(this, arguments);
      this.rediFresh = false; // loaded from a workflow (or pasted): its KB choice stays as saved
      restoreReport(this);
      if (this.type === LOADER) updateLoader(this);
      return r;
    };
    if (nodeData.name === LOADER) {
      const onNodeCreated = nodeType.prototype.onNodeCreated;
      nodeType.prototype.onNodeCreated = function () {
        const r = onNodeCreated?.apply(this, arguments);
        this.rediFresh = true;
        updateLoader(this);
        fetchKbs();
        return r;
      };
    }
  },
});
