// ReDi Accelerate in the ComfyUI frontend:
// - each ReDi node's report (what it retrieved, skipped, reused, how it split a prompt) is shown in a
//   read-only text box on the node, and the node grows so that the whole report is readable;
// - ReDi Sampler and FeatureReuse report after the sampling they take part in (a "redi.report" message);
// - error dialogs of ReDi nodes are titled with the node's display name and name the exception
//   by its class, not by the loader's absolute module path.
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

/** Shows `lines` on `node` and grows the node so that the report fits without scrolling. */
export function showReport(node, lines) {
  if (!node || !Array.isArray(lines)) return;
  let widget = node.widgets?.find((w) => w.name === REPORT_WIDGET);
  if (!widget) widget = addReportWidget(node);
  widget.element.rediExtraPx = 0;
  widget.value = lines.join("\n");
  const need = node.computeSize(); // takes an out-array, not a width
  node.setSize([node.size[0], Math.max(node.size[1], need[1])]);
  node.setDirtyCanvas(true, true);
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
    api.addEventListener("redi.report", ({ detail }) => showReport(nodeOf(detail?.node), detail?.lines));
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData?.name?.startsWith("ReDi")) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      if (message?.[REPORT_WIDGET]) showReport(this, message[REPORT_WIDGET]);
    };
  },
});
