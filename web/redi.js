// Shows each ReDi node's report (what it retrieved, what it skipped, how it split a
// prompt) in a read-only text box on the node, after the node runs.
import { app } from "../../scripts/app.js";

const REPORT_WIDGET = "redi_report";

app.registerExtension({
  name: "ReDi.Accelerate.Report",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData?.name?.startsWith("ReDi")) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const lines = message?.[REPORT_WIDGET];
      if (!lines) return;
      let widget = this.widgets?.find((w) => w.name === REPORT_WIDGET);
      if (!widget) {
        widget = ComfyWidgets_addText(this);
      }
      widget.value = lines.join("\n");
      this.setDirtyCanvas(true, true);
    };
  },
});

function ComfyWidgets_addText(node) {
  const el = document.createElement("textarea");
  el.readOnly = true;
  el.style.opacity = "0.85";
  el.style.fontSize = "11px";
  const widget = node.addDOMWidget(REPORT_WIDGET, "customtext", el, {
    getValue: () => el.value,
    setValue: (v) => {
      el.value = v;
    },
    serialize: false,
  });
  widget.serialize = false;
  return widget;
}
