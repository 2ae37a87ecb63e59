"""Confining user-given file names to one folder (the Builder's prompts_file)."""

from __future__ import annotations

import os

from ..errors import KBError

MAX_PROMPTS_FILE_BYTES = 64 << 20


def confined_file(name: str, root: str, what: str = "prompts file", folder: str = "ComfyUI's input folder") -> str:
    """The real path of `name` (relative to `root`, or absolute) when it is a regular file
    inside `root` after resolving every symlink; KBError otherwise (like LoadImage)."""
    root = os.path.realpath(root)
    path = os.path.realpath(os.path.join(root, name))
    if os.path.commonpath([root, path]) != root:
        raise KBError(f"{what} {name!r} is outside {folder}; copy it into {root} and give its name (e.g. prompts.txt)")
    if not os.path.isfile(path):
        raise KBError(f"{what} {name!r} not found in {folder} {root}; put a text file with one prompt per line there and give its name")
    if os.path.getsize(path) > MAX_PROMPTS_FILE_BYTES:
        raise KBError(f"{what} {name!r} is larger than {MAX_PROMPTS_FILE_BYTES >> 20} MB; split it")
    return path


def read_text_lines(path: str, name: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().splitlines()
    except UnicodeDecodeError as e:
        raise KBError(f"{name!r} is not UTF-8 text ({e.reason}); save it as UTF-8") from e


def kb_folder(root: str, name: str) -> str:
    """`root/name` when it is not a symbolic link and resolves to a folder inside `root` (or
    does not exist yet); KBError otherwise. A KB folder that links elsewhere would let a KB
    (or a shared models folder) make the server read or write outside its KB folder."""
    path = os.path.join(root, name)
    if os.path.islink(path):
        raise KBError(f"KB folder {name!r} in {root} is a symbolic link (to {os.readlink(path)!r:.120}); a KB must be a real "
                      f"folder inside {root}: move or copy the KB there instead of linking it")
    real_root = os.path.realpath(root)
    if os.path.lexists(path) and os.path.commonpath([real_root, os.path.realpath(path)]) != real_root:
        raise KBError(f"KB folder {name!r} resolves outside {root}; move or copy the KB into {root}")
    return path
