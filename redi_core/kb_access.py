"""What ReDi's retrieval needs from a knowledge base, and the one place `redi_core` imports
the KB storage layer (`kb_tools`).

`KBView` is the narrow interface: `retrieve()` searches the reduced keys, reads full keys
and values of the candidates, and reads the entries' prompts and seeds for its report.
`kb_tools.storage.knowledge_base.KnowledgeBase` implements it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

try:  # inside the pack, as ComfyUI imports it
    from ..kb_tools.errors import KBError
    from ..kb_tools.storage.disk_format import KEY_SPACES, Entry, Fingerprint
except ImportError:  # the repository root on sys.path (CLI, scripts, tests)
    from kb_tools.errors import KBError
    from kb_tools.storage.disk_format import KEY_SPACES, Entry, Fingerprint

__all__ = ["KEY_SPACES", "KBError", "KBView"]


class KBView(Protocol):
    """The part of a knowledge base that a retrieval reads."""

    name: str
    fingerprint: Fingerprint

    @property
    def entries(self) -> Sequence[Entry]: ...

    def require_step(self, step: int, what: str) -> None: ...

    def search(self, space: str, step: int, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]: ...

    def full_keys(self, space: str, step: int, ids) -> np.ndarray: ...

    def values(self, space: str, step: int, ids) -> np.ndarray: ...
