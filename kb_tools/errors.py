"""The one exception type of knowledge-base refusals.

The pack's modules can be imported under two package names at once: `kb_tools.errors`
(the CLI, `python -m kb_tools`) and `redi_accelerate.kb_tools.errors` (the pack's nodes,
which the headless `build` loads through ComfyUI's loader). Two copies of the module must
not mean two `KBError` classes, or an `except KBError` in one copy misses a refusal raised
by the other (a traceback instead of a one-line message): the second copy to load reuses
the first copy's class, so both names are the same class.
"""

from __future__ import annotations

import sys


def _loaded_class() -> type | None:
    """KBError of a copy of this module already loaded under another package name."""
    for name, module in list(sys.modules.items()):
        if name != __name__ and (name == "kb_tools.errors" or name.endswith(".kb_tools.errors")):
            cls = getattr(module, "KBError", None)
            if isinstance(cls, type) and issubclass(cls, ValueError) and getattr(cls, "_redi_kb_error", False):
                return cls
    return None


class _KBError(ValueError):
    """A knowledge base is missing, corrupt, or does not fit the request.

    The message says what is wrong and how to fix it; nodes show it as is."""

    _redi_kb_error = True


_KBError.__name__ = _KBError.__qualname__ = "KBError"
KBError: type[_KBError] = _loaded_class() or _KBError  # type: ignore[assignment]


def is_kb_error(exc: BaseException) -> bool:
    """True for a KBError of any copy of this module (the shared marker)."""
    return getattr(type(exc), "_redi_kb_error", False) is True
