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
