"""Conversion between ComfyUI's two workflow formats, using /object_info.

API format: {node_id: {"class_type": ..., "inputs": {name: value | [src_id, slot]}}}.
UI format (what the frontend saves and loads): nodes with positions, `widgets_values`
in the node's widget order, and a link table. Example workflows ship in both.
"""

from __future__ import annotations

from typing import Any

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


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


def api_to_ui(api: dict[str, dict], object_info: dict[str, dict]) -> dict[str, Any]:
    """Lay the API graph out left to right by dependency depth."""
    ids = sorted(api, key=int)
    depth: dict[str, int] = {}

    def d(nid: str) -> int:
        if nid not in depth:
            srcs = [v[0] for v in api[nid]["inputs"].values() if isinstance(v, list)]
            depth[nid] = 1 + max((d(s) for s in srcs), default=-1)
        return depth[nid]

    rows: dict[int, int] = {}
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
        col = d(nid)
        row = rows.get(col, 0)
        rows[col] = row + 1
        nodes.append({
            "id": int(nid), "type": node["class_type"], "pos": [40 + 360 * col, 40 + 300 * row], "size": [320, 260],
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
    return {
        "last_node_id": max(int(i) for i in ids), "last_link_id": len(links), "nodes": nodes, "links": links,
        "groups": [], "config": {}, "extra": {}, "version": 0.4,
    }


def ui_to_api(ui: dict[str, Any], object_info: dict[str, dict]) -> dict[str, dict]:
    """What the frontend would queue for this UI workflow."""
    link_src = {lk[0]: (str(lk[1]), lk[2]) for lk in ui["links"]}
    api = {}
    for n in ui["nodes"]:
        if n.get("mode", 0) != 0:
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
