"""`python -m kb_tools upgrade OLD NEW`: convert a format-1 KB into a new format-2 KB.

Lossless by default (the v2 KB stores float32 like v1 did); `dtype="float16"` halves
the size. The v1 KB is read one shard at a time, each checked against its checksum, with
the same untrusted-input rules as v2 (plain shard names, no symlinks, bounded sizes).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
from safetensors import safe_open

from ..errors import KBError
from . import writer as kb_writer
from .commit_log import read_tail_state
from .disk_format import MANIFEST, MAX_MANIFEST_BYTES, Entry, Fingerprint, State, safe_file, sha256_file

V1_SHARD_RE = re.compile(r"^shard_[0-9]{5}\.safetensors$")


def upgrade(old: Path, new: Path, dtype: str = "float32") -> State:
    old, new = Path(old), Path(new)
    path = safe_file(old, MANIFEST)
    if os.stat(path).st_size > 64 * MAX_MANIFEST_BYTES:
        raise KBError(f"{path} is too large for a KB manifest")
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KBError(f"{path} is not valid JSON ({e}); the KB is corrupt") from e
    if not isinstance(data, dict) or data.get("format") != "redi-kb" or data.get("format_version") != 1:
        raise KBError(f"{old.name} is not a format-1 ReDi KB (upgrade converts version 1 only)")
    if os.path.lexists(new / MANIFEST):
        raise KBError(f"{new} already holds a KB; upgrade into a new folder")
    fp = Fingerprint.from_json(data.get("fingerprint"), where=str(path))
    shards = data.get("shards")
    if not isinstance(shards, list) or not shards:
        raise KBError(f"{old.name} lists no shards; nothing to upgrade")
    kb_writer.create_kb(new, fp, dtype=dtype)
    pos = 0
    for rec in shards:
        if not isinstance(rec, dict) or not isinstance(rec.get("count"), int) or not isinstance(rec.get("sha256"), str):
            raise KBError(f"{old.name}: shard record {str(rec)[:80]} needs file, count and sha256")
        shard = safe_file(old, rec.get("file"), V1_SHARD_RE)
        if sha256_file(shard) != rec["sha256"]:
            raise KBError(f"{shard.name} does not match its checksum in the v1 manifest; the KB is corrupt, rebuild it")
        n = rec["count"]
        try:
            with safe_open(str(shard), "np") as f:
                meta = f.metadata() or {}
                x = {s: f.get_tensor(f"x.{s}") for s in fp.stored_steps}
                d = {s: f.get_tensor(f"d.{s}") for s in fp.stored_steps}
        except Exception as e:  # safetensors raises several types for damaged files
            raise KBError(f"{shard.name} cannot be read as safetensors ({str(e)[:100]})") from e
        try:
            ents = json.loads(meta["entries"])
            entries = [Entry(str(e["prompt"]), int(e["seed"]), pos + j) for j, e in enumerate(ents)]
        except (KeyError, TypeError, ValueError) as e:
            raise KBError(f"{shard.name} has no valid entry metadata") from e
        for s in fp.stored_steps:
            if x[s].shape != (n, *fp.latent_shape) or d[s].shape != (n, *fp.latent_shape) or len(entries) != n:
                raise KBError(f"{shard.name}: step {s} has shape {x[s].shape}, expected {(n, *fp.latent_shape)}")
        kb_writer.append_batch(new, {s: np.asarray(v, np.float32) for s, v in x.items()},
                               {s: np.asarray(v, np.float32) for s, v in d.items()}, entries)
        pos += n
    return read_tail_state(new, kb_writer.read_header(new))
