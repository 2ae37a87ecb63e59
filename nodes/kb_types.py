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


def list_kbs() -> list[str]:
    names = set()
    for root in kb_roots():
        if os.path.isdir(root):
            names.update(d for d in os.listdir(root) if not os.path.islink(os.path.join(root, d))
                         and os.path.isfile(os.path.join(root, d, MANIFEST)))
    return sorted(names)


def check_name(name: str) -> str:
    name = name.strip()
    if not NAME_RE.match(name):
        raise KBError(f"KB name {name!r} is not allowed: use 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit")
    return name


def kb_path_for_read(name: str) -> str:
    name = check_name(name)
    for root in kb_roots():
        p = os.path.join(root, name)
        if os.path.lexists(p) and os.path.isfile(os.path.join(p, MANIFEST)):
            return kb_folder(root, name)  # refuses a linked folder, or one that resolves outside the root
    raise KBError(f"no knowledge base named {name!r} in models/redi_kb; build it with the ReDi KB Builder node first "
                  "(template 2 of this pack builds demo_shapes_kb), then press R so that the KB Loader lists it")


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


def send_report(node_id: str | None, lines: list[str]) -> None:
    """Show `lines` on a node after it ran, from code that runs later than the node's execute
    (a SAMPLER or model patch reports once sampling is done). web/redi.js listens for it."""
    if not node_id or not lines:
        return
    server_module = sys.modules.get("server")  # ComfyUI's server.py; not imported in headless tools
    server = getattr(getattr(server_module, "PromptServer", None), "instance", None)
    if server is not None:
        server.send_sync("redi.report", {"node": node_id, "lines": list(lines)}, server.client_id)


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
