"""The REDI_KB link type and where knowledge bases live on disk."""

from __future__ import annotations

import os
import re
import sys

import folder_paths
from comfy_api.latest import io

from ..kb_tools.errors import KBError
from ..kb_tools.storage.disk_format import MANIFEST
from ..kb_tools.storage.paths import kb_folder

KB_FOLDER = "redi_kb"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

KBType = io.Custom("REDI_KB")


def register_folder() -> None:
    folder_paths.add_model_folder_path(KB_FOLDER, os.path.join(folder_paths.models_dir, KB_FOLDER))


def kb_roots() -> list[str]:
    return folder_paths.get_folder_paths(KB_FOLDER)


def _is_kb(path: str) -> bool:
    return not os.path.islink(path) and os.path.isfile(os.path.join(path, MANIFEST))


def list_kbs() -> list[str]:
    """The KBs under models/redi_kb: NAME for a KB folder there, LIBRARY/NAME for a KB of a KB library
    (a folder of KBs that ReDi KSampler's `library` and ReDi Record fill)."""
    names = set()
    for root in kb_roots():
        if not os.path.isdir(root):
            continue
        for d in os.listdir(root):
            path = os.path.join(root, d)
            if not NAME_RE.match(d) or os.path.islink(path) or not os.path.isdir(path):
                continue
            if os.path.isfile(os.path.join(path, MANIFEST)):
                names.add(d)
            else:  # a library: its KBs, one level down
                names.update(f"{d}/{k}" for k in os.listdir(path) if NAME_RE.match(k) and _is_kb(os.path.join(path, k)))
    return sorted(names)


def check_name(name: str, library: bool = False) -> str:
    """A KB name: one plain folder name, or (`library`) LIBRARY/NAME, two of them."""
    name = name.strip()
    parts = name.split("/") if library else [name]
    if len(parts) > 2 or not all(NAME_RE.match(p) for p in parts):
        raise KBError(f"KB name {name!r} is not allowed: use 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit"
                      + (" (or LIBRARY/NAME for a KB of a library)" if library else ""))
    return name


def kb_path_for_read(name: str) -> str:
    name = check_name(name, library=True)
    lib, _, kb = name.rpartition("/")
    for root in kb_roots():
        base = root
        if lib:
            if not os.path.isdir(os.path.join(root, lib)):
                continue
            base = kb_folder(root, lib)  # refuses a linked library folder, or one that resolves outside the root
        p = os.path.join(base, kb)
        if os.path.lexists(p) and os.path.isfile(os.path.join(p, MANIFEST)):
            return kb_folder(base, kb)  # refuses a linked folder, or one that resolves outside the root
    raise KBError(f"no knowledge base named {name!r} in models/redi_kb; build it with the ReDi KB Builder node first "
                  "(template 2 of this pack builds demo_shapes_kb); the KB Loader lists it as soon as its build starts")


def kb_path_for_write(name: str) -> str:
    name = check_name(name)
    for root in kb_roots():
        p = os.path.join(root, name)
        if os.path.lexists(p):
            return kb_folder(root, name)
    return kb_folder(kb_roots()[0], name)


def report(lines: list[str]) -> dict:
    """UI payload shown on the node by web/redi.js (and kept in /history)."""
    return {"redi_report": lines}


def prompt_server():
    """ComfyUI's running PromptServer, or None (headless tools import the nodes without a server)."""
    server_module = sys.modules.get("server")  # ComfyUI's server.py
    return getattr(getattr(server_module, "PromptServer", None), "instance", None)


def send_report(node_id: str | None, lines: list[str]) -> None:
    """Show `lines` on a node after it ran, from code that runs later than the node's execute
    (a SAMPLER or model patch reports once sampling is done). web/redi.js listens for it."""
    if not node_id or not lines:
        return
    server = prompt_server()
    if server is not None:
        server.send_sync("redi.report", {"node": node_id, "lines": list(lines)}, server.client_id)


def send_kb_list() -> None:
    """Tell every open frontend which KBs exist now (web/redi.js updates each ReDi KB Loader's list)."""
    server = prompt_server()
    if server is not None:
        try:
            server.send_sync("redi.kbs", {"kbs": list_kbs()})  # no client id: to every client
        except Exception:  # a list the frontend misses is fetched again by its poll (GET /redi/kbs)
            pass


def current_prompt_id() -> str | None:
    """The id of the prompt the server is executing (None outside a ComfyUI server)."""
    server = prompt_server()
    return getattr(server, "last_prompt_id", None) if server is not None else None


def node_id_of(node_cls) -> str | None:
    """The executing node's id, or None when the node is called outside ComfyUI's executor (in-process tests)."""
    hidden = getattr(node_cls, "hidden", None)
    return getattr(hidden, "unique_id", None) if hidden is not None else None


def prompt_text_of(node_cls, input_name: str) -> str | None:
    """The text of the CLIPTextEncode node wired into `input_name` of the executing node, when the
    graph has one with a literal text (None otherwise: the sampler itself sees only conditioning)."""
    hidden = getattr(node_cls, "hidden", None)
    prompt, uid = getattr(hidden, "prompt", None), getattr(hidden, "unique_id", None)
    if not isinstance(prompt, dict) or uid is None:
        return None
    link = prompt.get(str(uid), {}).get("inputs", {}).get(input_name)
    if not (isinstance(link, list) and link):
        return None
    src = prompt.get(str(link[0]), {})
    text = src.get("inputs", {}).get("text")
    return text if src.get("class_type") == "CLIPTextEncode" and isinstance(text, str) else None
