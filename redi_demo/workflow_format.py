"""Conversion between ComfyUI's two workflow formats, using /object_info.

API format: {node_id: {"class_type": ..., "inputs": {name: value | [src_id, slot]}}}.
UI format (what the frontend saves and loads): nodes with positions, `widgets_values`
in the node's widget order, and a link table. Example workflows ship in both.
"""

from __future__ import annotations

from typing import Any

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}

# Layout, in graph units (the frontend's litegraph, 1.32.9): a node's title bar sits above its `pos`,
# slots take 20 each, a widget row 24 and a multiline text box about 100. Nodes that show a report
# (the pack's) or an image (SaveImage) grow after a run: REPORT_ROOM is kept free below them.
TITLE_H, SLOT_H, WIDGET_H, MULTILINE_H, NODE_W = 30, 20, 24, 100, 300
REPORT_ROOM = 250
GAP_X, GAP_Y, MARGIN = 50, 30, 40
COLUMN_H = 1100  # a column is this tall at most (unless one node is taller): wide graphs, not tall ones
NOTE_TYPES = ("MarkdownNote", "Note")  # frontend-only nodes: never queued
NOTE_SIZE = [NODE_W, 260]
VIEW_W, VIEW_H, VIEW_MIN_SCALE = 1500, 850, 0.8  # the canvas a template should fit at its opening zoom


def _inputs_in_order(info: dict) -> list[tuple[str, list]]:
    order = info.get("input_order", {})
    out = []
    for section in ("required", "optional"):
        specs = info["input"].get(section, {})
        for name in order.get(section, list(specs)):
            out.append((name, specs[name]))
    return out


def _is_widget(spec: list) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


SEED_NAMES = ("seed", "noise_seed")


def has_control(name: str, spec: list) -> bool:
    """Whether the frontend adds a "control after generate" widget after this input (its value
    then takes the next slot of `widgets_values`). The frontend's rule (comfyui-frontend-package
    1.32.9): an INT input's `control_after_generate`, or when the input does not set it, whether
    it is named seed or noise_seed; a combo's `control_after_generate`."""
    opts = spec[1] if len(spec) > 1 else {}
    declared = opts.get("control_after_generate")
    if _input_type(spec) == "COMBO":
        return bool(declared)
    if _input_type(spec) != "INT":
        return False
    return bool(declared) if declared is not None else name in SEED_NAMES


def _input_type(spec: list) -> str:
    return "COMBO" if isinstance(spec[0], list) else spec[0]


def grows(class_type: str) -> bool:
    """Whether a node grows after a run (a report of the pack's nodes, SaveImage's image)."""
    return class_type.startswith("ReDi") or class_type == "SaveImage"


def node_size(info: dict) -> list[int]:
    """The size the frontend gives a fresh node of this kind, a little generous."""
    widgets, slots_in = 0, 0
    for name, spec in _inputs_in_order(info):
        if _is_widget(spec):
            multiline = _input_type(spec) == "STRING" and (spec[1] if len(spec) > 1 else {}).get("multiline")
            widgets += MULTILINE_H if multiline else WIDGET_H
            widgets += WIDGET_H if has_control(name, spec) else 0
        else:
            slots_in += 1
    return [NODE_W, max(slots_in, len(info["output"])) * SLOT_H + widgets + 16]


def footprint(node: dict) -> tuple[float, float, float, float]:
    """A UI node's box (x0, y0, x1, y1) with its title bar and the room its report grows into."""
    (x, y), (w, h) = node["pos"], node["size"]
    return x, y - TITLE_H, x + w, y + h + (REPORT_ROOM if grows(node["type"]) else 0)


def view_for(nodes: list[dict]) -> dict:
    """extra.ds: the zoom and offset at which the frontend opens the workflow, showing all of it
    (screen = (graph + offset) * scale)."""
    boxes = [footprint(n) for n in nodes]
    x0, y0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
    x1, y1 = max(b[2] for b in boxes), max(b[3] for b in boxes)
    scale = round(max(VIEW_MIN_SCALE, min(1.0, VIEW_W / (x1 - x0 + 2 * MARGIN), VIEW_H / (y1 - y0 + 2 * MARGIN))), 3)
    return {"scale": scale, "offset": [round(MARGIN / scale - x0, 1), round(MARGIN / scale - y0, 1)]}


def api_to_ui(api: dict[str, dict], object_info: dict[str, dict], note: str | None = None) -> dict[str, Any]:
    """Lay the API graph out left to right in dependency order: a node goes into the current column
    below the nodes there, with room for its report, unless the column is full or holds one of its
    inputs' sources (then into a new column; a node fed only by the node just above it stays under
    it). `note` (markdown) becomes a note node where a column has the most room left."""
    ids = sorted(api, key=int)
    depth: dict[str, int] = {}

    def d(nid: str) -> int:
        if nid not in depth:
            srcs = [v[0] for v in api[nid]["inputs"].values() if isinstance(v, list)]
            depth[nid] = 1 + max((d(s) for s in srcs), default=-1)
        return depth[nid]

    sizes = {nid: node_size(object_info[api[nid]["class_type"]]) for nid in ids}
    col_of: dict[str, int] = {}
    col_x, next_y, last_in_col = [MARGIN], [MARGIN + TITLE_H], [None]
    placed: dict[str, list[int]] = {}
    for nid in sorted(ids, key=lambda n: (d(n), int(n))):
        srcs = {v[0] for v in api[nid]["inputs"].values() if isinstance(v, list)}
        tall = sizes[nid][1] + (REPORT_ROOM if grows(api[nid]["class_type"]) else 0) + TITLE_H
        lo = 1 + max((col_of[s] for s in srcs), default=-1)
        one_link = sum(isinstance(v, list) for v in api[nid]["inputs"].values()) == 1
        if one_link and lo > 0 and last_in_col[lo - 1] in srcs and next_y[lo - 1] + tall <= COLUMN_H:
            c = lo - 1  # fed only by the node just above it: stays under it
        else:
            c = next((c for c in range(lo, len(col_x)) if next_y[c] + tall <= COLUMN_H or last_in_col[c] is None), len(col_x))
            while c >= len(col_x):  # a new column right of the last
                col_x.append(col_x[-1] + max((sizes[n][0] for n in col_of if col_of[n] == len(col_x) - 1), default=NODE_W) + GAP_X)
                next_y.append(MARGIN + TITLE_H)
                last_in_col.append(None)
        col_of[nid], last_in_col[c] = c, nid
        placed[nid] = [col_x[c], next_y[c]]
        next_y[c] += tall + GAP_Y
    nodes, links = [], []
    out_links: dict[tuple[str, int], list[int]] = {}
    for nid in ids:
        node = api[nid]
        info = object_info[node["class_type"]]
        ui_inputs, widgets = [], []
        for name, spec in _inputs_in_order(info):
            val = node["inputs"].get(name)
            linked = isinstance(val, list)
            if _is_widget(spec):
                default = (spec[1] if len(spec) > 1 else {}).get("default")
                widgets.append(default if linked or val is None else val)
                if has_control(name, spec):
                    widgets.append("fixed")
                if linked:
                    ui_inputs.append({"name": name, "type": _input_type(spec), "widget": {"name": name}, "link": None})
            else:
                ui_inputs.append({"name": name, "type": spec[0], "link": None})
            if linked:
                link_id = len(links) + 1
                src, slot = val
                src_type = object_info[api[src]["class_type"]]["output"][slot]
                links.append([link_id, int(src), slot, int(nid), len(ui_inputs) - 1, src_type])
                ui_inputs[-1]["link"] = link_id
                out_links.setdefault((src, slot), []).append(link_id)
        nodes.append({
            "id": int(nid), "type": node["class_type"], "pos": placed[nid], "size": sizes[nid],
            "flags": {}, "order": 0, "mode": 0, "inputs": ui_inputs, "outputs": [],
            "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": widgets,
        })
    for n in nodes:
        info = object_info[n["type"]]
        n["outputs"] = [
            {"name": name, "type": typ, "links": out_links.get((str(n["id"]), i), []), "slot_index": i}
            for i, (name, typ) in enumerate(zip(info["output_name"], info["output"]))
        ]
    for order, n in enumerate(sorted(nodes, key=lambda n: (d(str(n["id"])), n["id"]))):
        n["order"] = order
    last_id = max(int(i) for i in ids)
    if note is not None:
        roomy = min(range(len(col_x)), key=lambda c: (next_y[c], c))
        if next_y[roomy] + NOTE_SIZE[1] + TITLE_H > COLUMN_H:  # no column has room: a column of its own
            roomy = len(col_x)
            col_x.append(col_x[-1] + max(sizes[n][0] for n in col_of if col_of[n] == roomy - 1) + GAP_X)
            next_y.append(MARGIN + TITLE_H)
        last_id += 1
        nodes.append({
            "id": last_id, "type": NOTE_TYPES[0], "pos": [col_x[roomy], next_y[roomy]], "size": list(NOTE_SIZE),
            "flags": {}, "order": len(nodes), "mode": 0, "inputs": [], "outputs": [], "properties": {},
            "widgets_values": [note],
        })
    return {
        "last_node_id": last_id, "last_link_id": len(links), "nodes": nodes, "links": links,
        "groups": [], "config": {}, "extra": {"ds": view_for(nodes)}, "version": 0.4,
    }


def ui_to_api(ui: dict[str, Any], object_info: dict[str, dict]) -> dict[str, dict]:
    """What the frontend would queue for this UI workflow."""
    link_src = {lk[0]: (str(lk[1]), lk[2]) for lk in ui["links"]}
    api = {}
    for n in ui["nodes"]:
        if n.get("mode", 0) != 0 or n["type"] in NOTE_TYPES:
            continue
        info = object_info[n["type"]]
        inputs: dict[str, Any] = {}
        values = list(n.get("widgets_values", []))
        for name, spec in _inputs_in_order(info):
            if _is_widget(spec):
                inputs[name] = values.pop(0)
                if has_control(name, spec):
                    values.pop(0)
        for inp in n.get("inputs", []):
            if inp.get("link") is not None:
                src, slot = link_src[inp["link"]]
                inputs[inp["name"]] = [src, slot]
        api[str(n["id"])] = {"class_type": n["type"], "inputs": inputs}
    return api
