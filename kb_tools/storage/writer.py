"""Writing v2 KBs: create, append a batch, append a whole finished KB as one unit, merge.

Every write happens under the KB's writer lock (an exclusive `flock` on NAME/.lock), so
concurrent builders, nodes and coordinators all land their batches one after another.
A commit writes its shards (atomically, new names), appends its reduced keys to the
rkeys files, updates the IVF list file when the KB is large, and then appends ONE line
to log.jsonl: that line (with its newline) is the commit. Readers take no lock; they see
the log up to its last complete line and never read rows or files it does not name.
Cost of a commit: the batch itself, plus (above the flat-search size only) rewriting the
IVF list numbers, 4 bytes per entry.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..errors import KBError
from . import index as kb_index
from .commit_log import encode_line, read_state, read_tail_state
from .compat import incompatible
from .disk_format import (
    DEFAULT_SHARD_BYTES,
    IVF_RE,
    LOCK,
    LOG,
    MANIFEST,
    RKEYS_RE,
    SHARD_RE,
    Entry,
    Fingerprint,
    Header,
    IndexRec,
    State,
    chain_step,
    key_list,
    key_name,
    read_header,
    rkeys_file,
    safe_file,
    sha256_file,
    write_header,
)
from .shard import ShardFile, write_shard

Batch = tuple[dict[int, np.ndarray], dict[int, np.ndarray], list[Entry]]


@contextmanager
def kb_lock(kb_dir: Path) -> Iterator[None]:
    """The KB's writer lock (blocks until no other writer holds it)."""
    kb_dir = Path(kb_dir)
    kb_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(kb_dir / LOCK, os.O_CREAT | os.O_RDWR | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def check_compatible(header: Header, fp: Fingerprint, kb_name: str) -> None:
    bad = incompatible(header.fingerprint, fp)
    if bad:
        diffs = ", ".join(f"{f}: KB has {getattr(header.fingerprint, f)!r}, request has {getattr(fp, f)!r}" for f in bad)
        raise KBError(f"KB {kb_name} already exists with other settings ({diffs}); choose another KB name or match its settings")


def default_shard_rows(fp: Fingerprint, dtype: str) -> int:
    item = 2 if dtype == "float16" else 4
    row = 2 * len(fp.stored_steps) * int(np.prod(fp.latent_shape)) * item
    return int(np.clip(DEFAULT_SHARD_BYTES // row, 1, 4096))


def create_kb(kb_dir: Path, fp: Fingerprint, dtype: str = "float16", key_dims: int = kb_index.DEFAULT_KEY_DIMS,
              shard_rows: int | None = None) -> Header:
    """Create an empty KB, or return the header of the compatible KB already there."""
    kb_dir = Path(kb_dir)
    with kb_lock(kb_dir):
        if os.path.lexists(kb_dir / MANIFEST):
            try:
                header = read_header(kb_dir)
            except KBError as e:
                if "format-1" not in str(e):
                    raise
                raise KBError(f"KB {kb_dir.name} already exists with other settings (format version 1; this pack writes "
                              f"version 2): convert it with `python -m kb_tools upgrade {kb_dir} NEW_FOLDER` or choose another KB name") from None
            check_compatible(header, fp, kb_dir.name)
            return header
        header = Header(fp, dtype, kb_index.pool_factor(fp.latent_shape, key_dims), shard_rows or default_shard_rows(fp, dtype))
        write_header(kb_dir, header)
        return header


def _keys(header: Header) -> list[tuple[str, int]]:
    return key_list(header.fingerprint)


def _split(x: dict[int, np.ndarray], d: dict[int, np.ndarray], entries: list[Entry], rows: int) -> Iterator[Batch]:
    for a in range(0, len(entries), rows):
        yield ({s: v[a : a + rows] for s, v in x.items()}, {s: v[a : a + rows] for s, v in d.items()}, entries[a : a + rows])


def remove_orphans(kb_dir: Path) -> None:
    """Files a killed writer left behind (shards it never committed, temp files)."""
    kb_dir = Path(kb_dir)
    with kb_lock(kb_dir):
        tail = read_tail_state(kb_dir, read_header(kb_dir))
        for f in kb_dir.iterdir():
            if f.name.endswith(".tmp") and f.name.startswith("."):
                f.unlink()
            elif SHARD_RE.match(f.name) and int(f.name[6:12]) >= tail.nshards and not f.is_symlink():
                f.unlink()


def _update_ivf(kb_dir: Path, header: Header, tail: State, key: str, new_keys: np.ndarray, count: int) -> IndexRec | None:
    """The IVF list file after this commit (None while the KB is small enough for flat search)."""
    dims = header.key_dims
    if not kb_index.wants_ivf(count, dims):
        return None
    old = tail.indexes.get(key)
    centroids = lists = None
    if old is not None:
        path = safe_file(kb_dir, old.file, IVF_RE)
        if sha256_file(path) != old.sha256:
            raise KBError(f"{old.file} does not match its checksum; run `python -m kb_tools validate` and rebuild the KB")
        centroids, lists = kb_index.load_ivf(path, old.rows, dims)
        if kb_index.nlist_for(count) >= kb_index.RETRAIN_GROWTH * len(centroids):
            centroids = lists = None
    if centroids is None:
        space, step = key.rsplit("_", 1)
        all_keys = _read_rkeys(kb_dir, rkeys_file(space, int(step)), count, dims)
        centroids = kb_index.train_centroids(all_keys)
        lists = kb_index.assign(centroids, all_keys)
    else:
        lists = np.concatenate([lists, kb_index.assign(centroids, new_keys)])
    name = f"ivf_{key}_{count}.safetensors"
    kb_index.save_ivf(kb_dir / name, centroids, lists)
    return IndexRec(name, count, sha256_file(kb_dir / name))


def _read_rkeys(kb_dir: Path, name: str, rows: int, dims: int) -> np.ndarray:
    path = safe_file(kb_dir, name, RKEYS_RE)
    with open(path, "rb") as f:
        raw = f.read(rows * dims * 4)
    if len(raw) != rows * dims * 4:
        raise KBError(f"{name} holds fewer than the {rows} committed keys; the KB is damaged, rebuild it")
    return np.frombuffer(raw, dtype="<f4").reshape(rows, dims)


def _commit(kb_dir: Path, header: Header, batches: Iterable[Batch], unit: str | None) -> State:
    """Write `batches` as new shards and commit them with one log line. Call under the lock."""
    tail = read_tail_state(kb_dir, header)
    fp, dims = header.fingerprint, header.key_dims
    count, nshards, chain = tail.count, tail.nshards, tail.chain
    keys = _keys(header)
    files, hashes, added = {}, {}, {}
    shards = []
    try:
        for (space, s) in keys:
            k = key_name(space, s)
            path = safe_file(kb_dir, rkeys_file(space, s), RKEYS_RE, must_exist=False)
            f = open(path, "r+b" if path.exists() else "w+b")
            f.truncate(count * dims * 4)  # rows a killed writer appended but never committed
            f.seek(count * dims * 4)
            files[k], hashes[k], added[k] = f, hashlib.sha256(), []
        for x, d, entries in batches:
            if not entries:
                continue
            for part in _split(x, d, entries, header.shard_rows):
                name = f"shard_{nshards:06d}.safetensors"
                rec = replace(write_shard(kb_dir, name, header, *part), first=count)
                sf = ShardFile(kb_dir / name, rec, header)  # the stored (rounded) rows give the reduced keys
                for (space, s) in keys:
                    k = key_name(space, s)
                    full = sf.all_rows(("x" if space == "latent" else "d") + f".{s}")
                    red = kb_index.reduce_keys(full, fp.latent_shape, header.pool)
                    raw = red.astype("<f4").tobytes()
                    files[k].write(raw)
                    hashes[k].update(raw)
                    added[k].append(red)
                sf.close()
                for e in part[2]:
                    chain = chain_step(chain, e.prompt)
                count += rec.count
                nshards += 1
                shards.append(rec)
        for f in files.values():
            f.flush()
            os.fsync(f.fileno())
    finally:
        for f in files.values():
            f.close()
    if not shards:
        return tail
    indexes = {k: v for k, v in tail.indexes.items()}
    for (space, s) in keys:
        k = key_name(space, s)
        rec = _update_ivf(kb_dir, header, tail, k, np.concatenate(added[k]), count)
        if rec is not None:
            indexes[k] = rec
    line = encode_line({
        "seq": tail.seq + 1, "op": "add", "unit": unit, "prev": tail.last_sha, "count": count, "nshards": nshards,
        "chain": chain, "shards": [r.to_json() for r in shards], "keys": {k: h.hexdigest() for k, h in hashes.items()},
        "indexes": {k: {"file": r.file, "rows": r.rows, "sha256": r.sha256} for k, r in indexes.items()},
    })
    log = safe_file(kb_dir, LOG, must_exist=False)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        os.ftruncate(fd, tail.log_bytes)  # a line a killed writer left without its newline
        os.lseek(fd, tail.log_bytes, os.SEEK_SET)
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
    _drop_old_indexes(kb_dir, tail, indexes)
    return read_tail_state(kb_dir, header)


def _drop_old_indexes(kb_dir: Path, tail: State, indexes: dict[str, IndexRec]) -> None:
    """Keep the current and the previous IVF file of each key (a reader may still use that one)."""
    keep = {r.file for r in indexes.values()} | {r.file for r in tail.indexes.values()}
    for f in kb_dir.iterdir():
        if IVF_RE.match(f.name) and f.name not in keep and not f.is_symlink():
            f.unlink()


def append_batch(kb_dir: Path, x: dict[int, np.ndarray], d: dict[int, np.ndarray], entries: list[Entry],
                 unit: str | None = None) -> State:
    """Commit one batch of trajectories (any size: split into bounded shards) to an existing KB."""
    kb_dir = Path(kb_dir)
    header = read_header(kb_dir)
    with kb_lock(kb_dir):
        return _commit(kb_dir, header, [(x, d, entries)], unit)


def _source_batches(src_dir: Path, src_state: State, first_pos: int | None) -> Iterator[Batch]:
    from .shard import ShardCache

    cache = ShardCache(src_dir, src_state.header, size=1)
    steps = src_state.fingerprint.stored_steps
    for rec in src_state.shards:
        sf = cache.get(rec)
        x = {s: sf.all_rows(f"x.{s}") for s in steps}
        d = {s: sf.all_rows(f"d.{s}") for s in steps}
        entries = list(sf.entries)
        if first_pos is not None:
            entries = [Entry(e.prompt, e.seed, first_pos + rec.first + j) for j, e in enumerate(entries)]
        yield x, d, entries
    cache.close()


def append_kb(target: Path, source: Path, unit: str | None, first_pos: int | None = None) -> bool:
    """Copy every entry of the finished KB `source` into `target` as one atomic step tagged
    `unit`; False (nothing written) when `target` already holds that unit. The source is
    validated fully first (treat it as untrusted). Creates `target` if it has no manifest."""
    from .validate import validate_kb

    target, source = Path(target), Path(source)
    if unit is not None and not (isinstance(unit, str) and 0 < len(unit) <= 256):
        raise KBError(f"a unit id must be a string of 1..256 characters, not {unit!r:.40}")
    validate_kb(source)
    src_state = read_state(source)
    if src_state.count == 0:
        raise KBError(f"KB {source.name} is empty; nothing to append")
    header = create_kb(target, src_state.fingerprint, dtype=src_state.header.dtype)
    with kb_lock(target):
        if unit is not None and unit in read_state(target, header).units:
            return False
        _commit(target, header, _source_batches(source, src_state, first_pos), unit)
    return True


def merge(out_dir: Path, sources: list[Path]) -> State:
    """Merge KBs built elsewhere into one new KB (bounded shards, one source shard in RAM at a time)."""
    if not sources:
        raise KBError("merge needs at least one source KB")
    out_dir = Path(out_dir)
    if os.path.lexists(out_dir / MANIFEST):
        raise KBError(f"{out_dir} already holds a KB; merge into a new name")
    headers = [read_header(s) for s in sources]
    for src, h in zip(sources[1:], headers[1:]):
        bad = incompatible(h.fingerprint, headers[0].fingerprint)
        if bad:
            raise KBError(f"cannot merge {Path(src).name} into {Path(sources[0]).name}: they differ in {', '.join(bad)}")
    create_kb(out_dir, headers[0].fingerprint, dtype=headers[0].dtype)
    for src in sources:
        append_kb(out_dir, src, unit=None)
    return read_tail_state(out_dir, read_header(out_dir))
