"""Full validation of a v2 KB: every file, checksum, row, value and index (reads everything).

Opening a KB checks only what it reads; `python -m kb_tools validate` and append_kb (for
KBs that come from elsewhere) use this to check the rest. Peak RAM: one shard.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from ..errors import KBError
from . import index as kb_index
from .commit_log import read_state
from .disk_format import (
    IVF_RE,
    RKEYS_RE,
    SHARD_RE,
    Header,
    ShardRec,
    key_list,
    key_name,
    read_header,
    rkeys_file,
    safe_file,
    sha256_file,
)
from .reduced_keys import read_reduced_keys
from .shard import ShardFile, check_values, tensor_names
from .structure import structure_problems

MAX_PROBLEMS = 30


def validate_kb(kb_dir: Path) -> int:
    """Check everything; return the entry count or raise KBError listing every problem found."""
    kb_dir = Path(kb_dir)
    header = read_header(kb_dir)  # structural problems raise at once: nothing else can be read
    st = read_state(kb_dir, header)
    fp, dims = header.fingerprint, header.key_dims
    problems: list[str] = structure_problems(kb_dir, st)
    keys = key_list(fp)
    rk_files, rk_hash, rk_rows, chunk_i = {}, {}, {}, {}
    for space, s in keys:
        k = key_name(space, s)
        try:
            rk_files[k] = open(safe_file(kb_dir, rkeys_file(space, s), RKEYS_RE), "rb") if st.count else None
        except KBError as e:
            problems.append(str(e))
            rk_files[k] = None
        rk_hash[k], rk_rows[k], chunk_i[k] = hashlib.sha256(), 0, 0
    try:
        for rec in st.shards:
            if len(problems) >= MAX_PROBLEMS:
                break
            rows = _check_shard(kb_dir, rec, header, problems)  # the shard's reduced keys, None when it is bad
            for space, s in keys:
                k = key_name(space, s)
                f = rk_files[k]
                if f is None:
                    continue
                raw = f.read(rec.count * dims * 4)
                if len(raw) != rec.count * dims * 4:
                    problems.append(f"{rkeys_file(space, s)} ends before row {rec.first + rec.count - 1}; the KB is damaged, re-copy or rebuild it")
                    rk_files[k] = None
                    continue
                if rows is not None:  # a bad shard says nothing about its reduced keys: their checksum below still does
                    stored = np.frombuffer(raw, dtype="<f4").reshape(-1, dims)
                    if not np.allclose(stored, rows[k], rtol=1e-5, atol=1e-5):
                        problems.append(f"{rkeys_file(space, s)} rows {rec.first}..{rec.first + rec.count - 1} are not the reduced keys of {rec.file} (damaged or swapped); rebuild the KB")
                rk_hash[k].update(raw)
                rk_rows[k] += rec.count
                chunks = st.key_chunks.get(k, [])
                if chunk_i[k] < len(chunks) and chunks[chunk_i[k]][0] == rk_rows[k]:
                    if rk_hash[k].hexdigest() != chunks[chunk_i[k]][1]:
                        problems.append(f"{rkeys_file(space, s)} rows up to {rk_rows[k]} do not match their checksum in the log (damaged or swapped); rebuild the KB")
                    rk_hash[k], chunk_i[k] = hashlib.sha256(), chunk_i[k] + 1
    finally:
        for f in rk_files.values():
            if f is not None:
                f.close()
    for k, rec in st.indexes.items():
        try:
            centroids, lists = kb_index.load_ivf(safe_file(kb_dir, rec.file, IVF_RE), rec.rows, dims, rec.sha256)
            space, step = k.rsplit("_", 1)  # a key name the log checked (KEY_RE, one of this KB's keys)
            red = read_reduced_keys(kb_dir, st, space, int(step), st.count)[: rec.rows]
            check_values(centroids, rec.file)
            best = kb_index.assign(centroids, red)
            d_best = ((red - centroids[best]) ** 2).sum(1)
            d_list = ((red - centroids[lists]) ** 2).sum(1)
            if (d_list > d_best * (1 + 1e-4) + 1e-6).any():
                problems.append(f"{rec.file} assigns keys to the wrong lists (damaged or from another KB); rebuild the KB")
        except KBError as e:
            problems.append(str(e))
    if problems:
        raise KBError(f"KB {kb_dir.name} failed validation ({len(problems)} problem(s)):\n- " + "\n- ".join(problems[:MAX_PROBLEMS]))
    return st.count


def _check_shard(kb_dir: Path, rec: ShardRec, header: Header, problems: list[str]) -> dict[str, np.ndarray] | None:
    """Check one shard whole: file checksum, header, entries, and every row of every stored
    tensor (x and d of every stored step: row crc32, NaN, infinities, magnitudes). Returns the
    reduced keys its rows give (by key name), or None after appending its problem."""
    try:
        path = safe_file(kb_dir, rec.file, SHARD_RE)
        if sha256_file(path) != rec.sha256:
            problems.append(f"{rec.file} does not match its checksum in the log: the file is damaged or was changed; rebuild the KB or re-copy it")
            return None
        sf = ShardFile(path, rec, header)
    except KBError as e:
        problems.append(str(e))
        return None
    fp = header.fingerprint
    try:
        sf.read_entries()  # raises KBError naming the shard
        full = {t: sf.all_rows(t) for t in tensor_names(header)}
        return {key_name(space, s): kb_index.reduce_keys(full[("x" if space == "latent" else "d") + f".{s}"], fp.latent_shape, header.pool)
                for space, s in key_list(fp)}
    except KBError as e:
        problems.append(str(e))
        return None
    finally:
        sf.close()
