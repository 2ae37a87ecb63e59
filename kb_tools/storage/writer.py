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
    text_hash,
    write_header,
)
from .reduced_keys import read_reduced_keys
from .shard import ShardFile, check_batch, write_shard
from .structure import TEMP_RE, structure_problems

Batch = tuple[dict[int, np.ndarray], dict[int, np.ndarray], list[Entry]]


# IVF files kept per key besides the current one: a reader that opened the KB a few commits
# ago may still load its generation (and retries on the newest one when even that is gone)
KEEP_IVF_GENERATIONS = 8


@contextmanager
def kb_lock(kb_dir: Path) -> Iterator[None]:
    """The KB's writer lock (blocks until no other writer holds it)."""
    kb_dir = Path(kb_dir)
    try:
        kb_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(kb_dir / LOCK, os.O_CREAT | os.O_RDWR | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as e:
        kind = "a symbolic link" if os.path.islink(kb_dir / LOCK) else "a folder" if os.path.isdir(kb_dir / LOCK) else "unusable"
        raise KBError(f"cannot take the writer lock {kb_dir.name}/{LOCK}: it is {kind} ({e.strerror}); it must be a regular "
                      "file (or absent): remove it, then append again") from None
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
              shard_rows: int | None = None, negative_prompt: str | None = None) -> Header:
    """Create an empty KB, or return the header of the compatible KB already there. A new KB's
    manifest keeps `negative_prompt`'s text when it is the one the fingerprint's negative_hash names."""
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
        if negative_prompt is not None and text_hash(negative_prompt) != fp.negative_hash:
            negative_prompt = None
        header = Header(fp, dtype, kb_index.pool_factor(fp.latent_shape, key_dims), shard_rows or default_shard_rows(fp, dtype),
                        negative_prompt)
        write_header(kb_dir, header)
        return header


def _keys(header: Header) -> list[tuple[str, int]]:
    return key_list(header.fingerprint)


def _split(x: dict[int, np.ndarray], d: dict[int, np.ndarray], entries: list[Entry], rows: int) -> Iterator[Batch]:
    for a in range(0, len(entries), rows):
        yield ({s: v[a : a + rows] for s, v in x.items()}, {s: v[a : a + rows] for s, v in d.items()}, entries[a : a + rows])


def writable_state(kb_dir: Path, header: Header) -> State:
    """The committed state a writer continues from, after the checks `validate` makes that
    cost no more than the log and a folder listing (the whole log, line by line, and
    `structure_problems`); KBError, before any byte is written, for a KB that fails them."""
    tail = read_tail_state(kb_dir, header)
    problems = structure_problems(kb_dir, tail)
    if not problems:
        problems = _last_commit_problems(kb_dir, tail)
    if problems:
        raise KBError(f"KB {Path(kb_dir).name} is damaged; nothing was written to it. Run `python -m kb_tools validate` on it, "
                      "re-copy or rebuild it, or write to a new KB name:\n- " + "\n- ".join(problems[:10]))
    return tail


def _last_commit_problems(kb_dir: Path, tail: State) -> list[str]:
    """The last commit's files against the log (one shard header, one chunk of reduced keys per
    key): a manifest edited after the build (another latent shape, pool or dtype) or a swapped
    file shows here, before the writer continues the files with the wrong sizes."""
    problems = []
    if tail.shards:
        rec = tail.shards[-1]
        try:
            ShardFile(safe_file(kb_dir, rec.file, SHARD_RE), rec, tail.header).close()
        except KBError as e:
            problems.append(str(e))
    dims = tail.header.key_dims
    for k, chunks in tail.key_chunks.items():
        start = chunks[-2][0] if len(chunks) > 1 else 0
        rows, sha = chunks[-1]
        space, step = k.rsplit("_", 1)  # a key name the log checked
        with open(safe_file(kb_dir, rkeys_file(space, int(step)), RKEYS_RE), "rb") as f:
            f.seek(start * dims * 4)
            raw = f.read((rows - start) * dims * 4)
        if hashlib.sha256(raw).hexdigest() != sha:
            problems.append(f"{rkeys_file(space, int(step))} rows {start}..{rows - 1} do not match their checksum in the log "
                            "(damaged, swapped, or the manifest was changed)")
    return problems


def remove_orphans(kb_dir: Path) -> None:
    """Files a killed writer left behind (shards it never committed, temp files)."""
    kb_dir = Path(kb_dir)
    with kb_lock(kb_dir):
        tail = writable_state(kb_dir, read_header(kb_dir))
        for f in kb_dir.iterdir():
            if not f.is_file() or f.is_symlink():
                continue  # writable_state refused any link or folder under a name the writer uses
            if TEMP_RE.match(f.name) or (SHARD_RE.match(f.name) and int(f.name[6:12]) >= tail.nshards):
                f.unlink()


def _load_old_ivf(kb_dir: Path, header: Header, tail: State) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The committed IVF files (centroids, lists), checked before the commit writes anything."""
    out = {}
    for key, rec in tail.indexes.items():
        out[key] = kb_index.load_ivf(safe_file(kb_dir, rec.file, IVF_RE), rec.rows, header.key_dims, rec.sha256)
    return out


def _retrain_keys(kb_dir: Path, header: Header, tail: State, old_ivf: dict[str, tuple[np.ndarray, np.ndarray]],
                  count: int) -> dict[str, np.ndarray]:
    """The committed reduced keys (checked on their chunk checksums) of every key whose IVF
    centroids a commit reaching `count` entries will train, read before the commit writes
    anything: damage there refuses the append with no byte changed."""
    out = {}
    dims = header.key_dims
    for space, step in key_list(header.fingerprint):
        k = key_name(space, step)
        old = old_ivf.get(k)
        if kb_index.wants_ivf(count, dims) and (old is None or kb_index.nlist_for(count) >= kb_index.RETRAIN_GROWTH * len(old[0])):
            out[k] = read_reduced_keys(kb_dir, tail, space, step, tail.count) if tail.count else np.empty((0, dims), np.float32)
    return out


def _update_ivf(kb_dir: Path, header: Header, tail: State, old_ivf: dict[str, tuple[np.ndarray, np.ndarray]], key: str,
                new_keys: np.ndarray, count: int, committed_keys: dict[str, np.ndarray]) -> IndexRec | None:
    """The IVF list file after this commit (None while the KB is small enough for flat search)."""
    dims = header.key_dims
    if not kb_index.wants_ivf(count, dims):
        return None
    old = old_ivf.get(key)
    centroids = lists = None
    if old is not None:
        centroids, lists = old
        if kb_index.nlist_for(count) >= kb_index.RETRAIN_GROWTH * len(centroids):
            centroids = lists = None
    if centroids is None:
        committed = committed_keys.get(key)
        if committed is None:  # a commit of another size than announced
            space, step = key.rsplit("_", 1)
            committed = read_reduced_keys(kb_dir, tail, space, int(step), tail.count) if tail.count else np.empty((0, dims), np.float32)
        all_keys = np.concatenate([committed, new_keys])
        centroids = kb_index.train_centroids(all_keys)
        lists = kb_index.assign(centroids, all_keys)
    else:
        lists = np.concatenate([lists, kb_index.assign(centroids, new_keys)])
    name = f"ivf_{key}_{count}.safetensors"
    kb_index.save_ivf(kb_dir / name, centroids, lists)
    return IndexRec(name, count, sha256_file(kb_dir / name))


def _commit(kb_dir: Path, header: Header, batches: Iterable[Batch], unit: str | None, number: bool = False,
            adding: int = 0) -> State:
    """Write `batches` (`adding` entries in all) as new shards and commit them with one log
    line. Call under the lock. Everything that can refuse the commit is read and checked
    before its first write. With `number`, each entry's pos is its row in the KB (given here,
    under the lock, so concurrent builders never share a pos)."""
    tail = writable_state(kb_dir, header)
    old_ivf = _load_old_ivf(kb_dir, header, tail)
    committed_keys = _retrain_keys(kb_dir, header, tail, old_ivf, tail.count + adding)
    fp, dims = header.fingerprint, header.key_dims
    count, nshards, chain = tail.count, tail.nshards, tail.chain
    keys = _keys(header)
    files, hashes, added = {}, {}, {}
    shards = []
    try:
        for x, d, entries in batches:
            if not entries:
                continue
            check_batch(header, x, d, len(entries))  # a refused batch: not a byte written yet (the first one)
            if not files:
                for (space, s) in keys:
                    k = key_name(space, s)
                    path = safe_file(kb_dir, rkeys_file(space, s), RKEYS_RE, must_exist=False)
                    f = open(path, "r+b" if path.exists() else "w+b")
                    files[k], hashes[k], added[k] = f, hashlib.sha256(), []
                    f.truncate(count * dims * 4)  # rows a killed writer appended but never committed
                    f.seek(count * dims * 4)
            if number:
                entries = [Entry(e.prompt, e.seed, count + j) for j, e in enumerate(entries)]
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
        rec = _update_ivf(kb_dir, header, tail, old_ivf, k, np.concatenate(added[k]), count, committed_keys)
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
    _drop_old_indexes(kb_dir, indexes)
    return read_tail_state(kb_dir, header)


def _drop_old_indexes(kb_dir: Path, indexes: dict[str, IndexRec]) -> None:
    """Keep the current IVF file of each key and the KEEP_IVF_GENERATIONS before it (readers
    that opened the KB a few commits ago may still load theirs; see KnowledgeBase.index)."""
    gens: dict[str, list[tuple[int, Path]]] = {}
    for f in kb_dir.iterdir():
        if IVF_RE.match(f.name) and f.is_file() and not f.is_symlink():
            key, rows = f.name[4:-12].rsplit("_", 1)
            gens.setdefault(key, []).append((int(rows), f))
    for key, files in gens.items():
        current = indexes.get(key)
        older = sorted((r, f) for r, f in files if current is None or r < current.rows)
        for _, f in older[: max(0, len(older) - KEEP_IVF_GENERATIONS)]:
            f.unlink()


def append_batch(kb_dir: Path, x: dict[int, np.ndarray], d: dict[int, np.ndarray], entries: list[Entry],
                 unit: str | None = None, number: bool = False) -> State:
    """Commit one batch of trajectories (any size: split into bounded shards) to an existing KB.
    With `number`, the entries' pos is set to their rows in the KB at commit time."""
    kb_dir = Path(kb_dir)
    header = read_header(kb_dir)
    with kb_lock(kb_dir):
        return append_batch_locked(kb_dir, header, x, d, entries, unit, number)


def append_batch_locked(kb_dir: Path, header: Header, x: dict[int, np.ndarray], d: dict[int, np.ndarray],
                        entries: list[Entry], unit: str | None = None, number: bool = False) -> State:
    """`append_batch` for a caller that already holds `kb_lock(kb_dir)` (the lock is not re-entrant:
    taking it again from the same process would wait forever), so that it can read the KB, decide
    what to write and commit it as one step no other writer can interleave with (the library's
    dedup, for one). `header` is the KB's (`read_header`). Returns the committed state."""
    if not entries:
        return read_tail_state(Path(kb_dir), header)
    return _commit(Path(kb_dir), header, [(x, d, entries)], unit, number, adding=len(entries))


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
        if unit is not None and unit in writable_state(target, header).units:
            return False
        _commit(target, header, _source_batches(source, src_state, first_pos), unit, adding=src_state.count)
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
    create_kb(out_dir, headers[0].fingerprint, dtype=headers[0].dtype, negative_prompt=headers[0].negative_prompt)
    for src in sources:
        append_kb(out_dir, src, unit=None)
    return read_tail_state(out_dir, read_header(out_dir))
