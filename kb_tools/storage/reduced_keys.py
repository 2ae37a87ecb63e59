"""Reading a KB's reduced keys (the pooled keys its faiss indexes are built on), checked
chunk by chunk against the checksums its log records."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from ..errors import KBError
from .disk_format import RKEYS_RE, State, key_name, key_steps, rkeys_file, safe_file
from .shard import check_values


def read_reduced_keys(kb_dir: Path, state: State, space: str, step: int, count: int) -> np.ndarray:
    """The first `count` reduced keys (count x key_dims, float32) of key `space`/`step`."""
    fp, kb_name = state.fingerprint, Path(kb_dir).name
    if step not in key_steps(fp):
        raise KBError(f"key step {step} must lie below a stored value step of KB {kb_name} (stored steps {list(fp.stored_steps)})")
    dims, n = state.header.key_dims, count
    name = rkeys_file(space, step)
    chunks = state.key_chunks.get(key_name(space, step), [])
    need = next((i for i, (rows, _) in enumerate(chunks) if rows >= n), None)
    if need is None:
        raise KBError(f"the log of KB {kb_name} has no checksums for {name}; the KB is damaged, rebuild it")
    path = safe_file(Path(kb_dir), name, RKEYS_RE)
    end_rows = chunks[need][0]
    if os.stat(path).st_size < end_rows * dims * 4:
        raise KBError(f"{name} holds fewer than the {end_rows} committed keys; the KB is damaged, rebuild it")
    with open(path, "rb") as f:
        buf = np.fromfile(f, dtype="<f4", count=end_rows * dims)
    mv = memoryview(buf).cast("B")
    prev = 0
    for rows, sha in chunks[: need + 1]:
        if hashlib.sha256(mv[prev * dims * 4 : rows * dims * 4]).hexdigest() != sha:
            raise KBError(f"{name} rows {prev}..{rows - 1} do not match their checksum in the log (damaged or swapped); rebuild the KB")
        prev = rows
    out = buf.reshape(end_rows, dims)[:n]
    check_values(out, name)
    return out
