"""log.jsonl, the commit log of a v2 KB: its lines, their schema, and reading it with bounds.

One definition of a valid log serves every reader and writer: `read_state` (readers and
validate: the whole log, line by line) and `checked_tail` (writers: the same checks, done
incrementally per process, so a commit parses only the lines added since the last one and
hashes the rest to make sure it is unchanged).

Every line is self-checksummed and chained to the previous one, and repeats the cumulative
state (entry count, shard count, prompt chain, index files). An index record is rewritten by
every commit that adds entries once the KB is large enough for an IVF index, so every index
record names exactly the entry count of the line it appears on: `rows` cannot disagree with
the KB it indexes (faiss would abort the process on lists shorter than the keys).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import threading
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import KBError
from .disk_format import (
    IVF_RE,
    KEY_RE,
    LOG,
    MANIFEST,
    SHA_RE,
    Header,
    IndexRec,
    ShardRec,
    State,
    _check_dir,
    _is_int,
    key_list,
    key_name,
    read_header,
    rkeys_file,
)

MAX_LOG_LINE_BYTES = 1 << 20
# One line per commit. A KB that records every generation commits often: past this many
# commits (an open then parses for seconds), merge it into a new KB (one line per source).
MAX_LOG_LINES = 100_000
MAX_LOG_BYTES = 256 << 20
_COMPACT = "merge it into a new KB with `python -m kb_tools merge NEW_FOLDER OLD_FOLDER` (one log line per source KB)"


def line_sha(obj: dict[str, Any]) -> str:
    body = {k: v for k, v in obj.items() if k != "sha"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def encode_line(obj: dict[str, Any]) -> bytes:
    obj = dict(obj)
    obj["sha"] = line_sha(obj)
    data = (json.dumps(obj, sort_keys=True, separators=(",", ":")) + "\n").encode()
    if len(data) > MAX_LOG_LINE_BYTES:
        raise KBError(f"a log line of {len(data)} bytes exceeds the limit {MAX_LOG_LINE_BYTES}; append fewer shards per step")
    return data


def _sha_ok(v: Any, empty: bool = False) -> bool:
    return isinstance(v, str) and (bool(SHA_RE.match(v)) or (empty and v == ""))


def _shard_problems(shards: list, header: Header, prev: State) -> tuple[list[str], int, int]:
    p, count, nshards = [], prev.count, prev.nshards
    for rec in shards:
        if not isinstance(rec, dict) or set(rec) != {"file", "count", "first", "sha256", "head_sha"}:
            p.append(f"a shard record must have exactly file, count, first, sha256, head_sha: {str(rec)[:80]}")
            continue
        if rec["file"] != f"shard_{nshards:06d}.safetensors":
            p.append(f"shard file {rec['file']!r:.80} is not a plain shard name like shard_{nshards:06d}.safetensors (the next shard)")
        if not _is_int(rec["count"]) or not 1 <= rec["count"] <= header.shard_rows:
            p.append(f"shard count {rec['count']!r:.40} must be an integer in 1..{header.shard_rows}")
        elif not _is_int(rec["first"]) or rec["first"] != count:  # 4.0 == 4 in Python: the type first
            p.append(f"shard {rec['file']!r:.80} starts at row {rec['first']!r:.40}, expected {count}")
        else:
            count += rec["count"]
        nshards += 1
        for h in ("sha256", "head_sha"):
            if not _sha_ok(rec[h]):
                p.append(f"shard {h} must be a sha256 hex string")
    return p, count, nshards


def _index_problems(indexes: dict, header: Header, count: int) -> list[str]:
    names = {key_name(space, s) for space, s in key_list(header.fingerprint)}
    p = []
    for k, v in indexes.items():
        if k not in names:
            p.append(f"index record {k!r:.40} names no reduced key of this KB (keys: {sorted(names)})")
        elif not isinstance(v, dict) or set(v) != {"file", "rows", "sha256"} or not _is_int(v["rows"]) or not _sha_ok(v["sha256"]):
            p.append(f"index record {k!r:.40} is invalid: {str(v)[:100]}")
        elif v["rows"] != count:
            p.append(f"index record {k} covers {v['rows']!r:.20} rows, but the line holds {count} entries (every commit rewrites its indexes)")
        elif v["file"] != f"ivf_{k}_{count}.safetensors" or not IVF_RE.match(v["file"]):
            p.append(f"index record {k} names the file {v['file']!r:.80}, expected ivf_{k}_{count}.safetensors")
    return p


def line_problems(obj: Any, header: Header, prev: State) -> list[str]:
    """Every problem of log line `obj` following the state `prev` (empty: the line is valid)."""
    if not isinstance(obj, dict):
        return ["a log line must be a JSON object"]
    p = []
    for name in ("seq", "count", "nshards"):
        if not _is_int(obj.get(name)) or obj[name] < 0:
            p.append(f"{name} must be a non-negative integer, not {obj.get(name)!r:.40}")
    for name in ("sha", "prev", "chain"):
        if not _sha_ok(obj.get(name), empty=name != "sha"):
            p.append(f"{name} must be a sha256 hex string, not {obj.get(name)!r:.40}")
    if obj.get("op") not in ("add", "index"):
        p.append(f"op must be 'add' or 'index', not {obj.get('op')!r:.40}")
    if p:
        return p
    if obj["seq"] != prev.seq + 1 or obj["prev"] != prev.last_sha:
        p.append(f"line {obj['seq']} does not follow line {prev.seq} (lines were removed, reordered or edited)")
    if line_sha(obj) != obj["sha"]:
        p.append(f"line {obj['seq']} does not match its checksum (edited or damaged)")
    unit = obj.get("unit")
    if unit is not None and not (isinstance(unit, str) and 0 < len(unit) <= 256):
        p.append(f"unit must be null or a string of 1..256 characters, not {unit!r:.40}")
    shards, keys, indexes = obj.get("shards", []), obj.get("keys", {}), obj.get("indexes", {})
    if not isinstance(shards, list) or not isinstance(keys, dict) or not isinstance(indexes, dict):
        return p + ["shards must be a list, keys and indexes objects"]
    sp, count, nshards = _shard_problems(shards, header, prev)
    p += sp
    if obj["count"] != count or obj["nshards"] != nshards:
        p.append(f"line {obj['seq']} claims {obj['count']} entries in {obj['nshards']} shards, its records add up to {count} in {nshards}")
    names = {key_name(space, s) for space, s in key_list(header.fingerprint)}
    for k, v in keys.items():
        if not (isinstance(k, str) and KEY_RE.match(k)) or not _sha_ok(v):
            p.append(f"reduced-key chunk {k!r:.40}: {v!r:.40} is not a key name with a sha256")
    if set(keys) != (names if shards else set()):
        p.append(f"line {obj['seq']} has reduced-key checksums for {sorted(map(str, keys))[:6]}, expected {sorted(names) if shards else []}")
    if not p:
        p += _index_problems(indexes, header, count)
    if not shards and not p and indexes != {k: {"file": r.file, "rows": r.rows, "sha256": r.sha256} for k, r in prev.indexes.items()}:
        p.append(f"line {obj['seq']} adds no entries but changes the index records")
    return p


def apply_line(st: State, obj: dict[str, Any], keep_shards: bool) -> None:
    if keep_shards:
        st.shards.extend(ShardRec(**r) for r in obj.get("shards", []))
        for k, sha in obj.get("keys", {}).items():
            st.key_chunks.setdefault(k, []).append((obj["count"], sha))
    if obj.get("unit") is not None:
        st.units.add(obj["unit"])
    st.count, st.nshards, st.chain = obj["count"], obj["nshards"], obj["chain"]
    st.seq, st.last_sha = obj["seq"], obj["sha"]
    st.indexes = {k: IndexRec(**v) for k, v in obj.get("indexes", {}).items()}


def _open_log(kb_dir: Path) -> tuple[BinaryIO, os.stat_result] | None:
    """The log opened without following a symlink, or None when the KB has none yet."""
    path = kb_dir / LOG
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return None
    except OSError as e:
        raise KBError(f"{LOG} of KB {kb_dir.name} cannot be opened ({e.strerror}): it must be a regular file, not a link or "
                      "folder; the KB is corrupt or hostile, do not use it") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):  # O_NOFOLLOW opens a folder or a device all the same
        os.close(fd)
        raise KBError(f"{LOG} of KB {kb_dir.name} is not a regular file; the KB is corrupt or hostile, do not use it")
    if st.st_size > MAX_LOG_BYTES:
        os.close(fd)
        raise KBError(f"{LOG} of KB {kb_dir.name} is {st.st_size} bytes, more than the {MAX_LOG_BYTES} a log may have; "
                      f"if the KB is yours, {_COMPACT}; otherwise it is corrupt or hostile, do not use it")
    return os.fdopen(fd, "rb"), st


def _scan(kb_dir: Path, f: BinaryIO, size: int, st: State, start: int, keep_shards: bool) -> tuple[int, int]:
    """Check and apply the committed lines from byte `start` on; returns where the last
    committed line starts and where it ends."""
    f.seek(start)
    pos, end, last = start, start, -1
    while pos < size:
        raw = f.readline(MAX_LOG_LINE_BYTES + 1)
        if not raw.endswith(b"\n"):
            if len(raw) > MAX_LOG_LINE_BYTES:
                raise KBError(f"{LOG} of KB {kb_dir.name}: line {st.seq + 1} is longer than {MAX_LOG_LINE_BYTES} bytes; "
                              "the KB is corrupt or hostile, do not use it")
            break  # a trailing line without its newline was never committed
        line_start, pos = pos, pos + len(raw)
        if st.seq + 1 >= MAX_LOG_LINES:
            raise KBError(f"{LOG} of KB {kb_dir.name} has more than {MAX_LOG_LINES} lines (commits); if the KB is yours, {_COMPACT}; "
                          "otherwise it is corrupt or hostile, do not use it")
        try:
            obj = json.loads(raw)
        except (ValueError, RecursionError) as e:  # JSON, UTF-8, huge integers
            raise KBError(f"{LOG} of KB {kb_dir.name}: line {st.seq + 1} is not JSON ({str(e)[:80]}); the KB is corrupt, rebuild it") from None
        problems = line_problems(obj, st.header, st)
        if problems:
            raise KBError(f"{LOG} of KB {kb_dir.name}, line {st.seq + 1}, is invalid:\n- " + "\n- ".join(problems))
        apply_line(st, obj, keep_shards)
        last, end = line_start, pos
    return last, end


def read_state(kb_dir: Path, header: Header | None = None) -> State:
    """The whole committed log (shards, units, chunk checksums), validated line by line,
    read line by line with bounds on its size, its line count and each line."""
    kb_dir = _check_dir(kb_dir)
    header = header or read_header(kb_dir)
    st = State(header)
    opened = _open_log(kb_dir)
    if opened is None:
        return st
    f, fst = opened
    with f:
        st.log_bytes = _scan(kb_dir, f, fst.st_size, st, 0, keep_shards=True)[1]
    return st


class _Verified:
    """What one process has already checked of a KB's log (for writers): the state after it
    and the sha256 of the bytes checked."""

    def __init__(self, header: Header, state: State, prefix_sha: str) -> None:
        self.header, self.state, self.prefix_sha = header, state, prefix_sha


def _prefix_sha(f: BinaryIO, n: int) -> str:
    """sha256 of the first n bytes (hashing is ~50x faster than parsing the lines again)."""
    h = hashlib.sha256()
    f.seek(0)
    while n > 0:
        chunk = f.read(min(n, 1 << 20))
        if not chunk:
            break
        h.update(chunk)
        n -= len(chunk)
    return h.hexdigest()


_verified: dict[str, _Verified] = {}
_verified_lock = threading.Lock()


def checked_tail(kb_dir: Path, header: Header) -> State:
    """The committed state after checking the WHOLE log exactly as `read_state` does (the same
    definition of a valid log for readers, validate and writers), incrementally: a process
    parses only the lines added since its last call, after confirming by their sha256 that the
    bytes it checked before are unchanged. Carries shards and chunk checksums like `read_state`."""
    kb_dir = _check_dir(kb_dir)
    key = os.path.realpath(kb_dir)
    opened = _open_log(kb_dir)
    if opened is None:
        with _verified_lock:
            _verified.pop(key, None)
        return State(header)
    f, fst = opened
    with f, _verified_lock:
        try:
            return _continue(kb_dir, key, f, fst, header)
        except BaseException:
            _verified.pop(key, None)  # a half-applied check must not be continued
            raise


def _continue(kb_dir: Path, key: str, f: BinaryIO, fst: os.stat_result, header: Header) -> State:
    """Continue this process's check of the log from where it stopped (the caller holds the lock)."""
    v = _verified.get(key)
    if v is None or v.header != header or fst.st_size < v.state.log_bytes or _prefix_sha(f, v.state.log_bytes) != v.prefix_sha:
        v = _Verified(header, State(header), _prefix_sha(f, 0))  # new, or rewritten under us: check it all
    st = v.state
    end = _scan(kb_dir, f, fst.st_size, st, st.log_bytes, keep_shards=True)[1]
    if end != st.log_bytes:
        st.log_bytes = end
        v.prefix_sha = _prefix_sha(f, end)
    _verified[key] = v
    return _copy_state(st)


def _copy_state(st: State) -> State:
    return State(st.header, st.count, st.nshards, st.chain, st.seq, st.last_sha, st.log_bytes, list(st.shards), set(st.units),
                 {k: list(v) for k, v in st.key_chunks.items()}, dict(st.indexes))


def read_tail_state(kb_dir: Path, header: Header) -> State:
    """The committed state a writer continues from: `checked_tail`."""
    return checked_tail(kb_dir, header)


def read_units(kb_dir: Path) -> frozenset[str]:
    """Unit ids already committed to the KB (an empty set when it does not exist yet)."""
    if not os.path.lexists(Path(kb_dir) / MANIFEST):
        return frozenset()
    return frozenset(read_state(kb_dir).units)


def listed_files(kb_dir: Path) -> list[str]:
    """Exactly the files that make up the KB now (what a read-only file route may serve)."""
    st = read_state(kb_dir)
    files = [MANIFEST]
    if st.seq >= 0:
        files.append(LOG)
    files += [s.file for s in st.shards]
    for space, step in sorted(key_list(st.fingerprint), key=lambda k: key_name(*k)):
        if key_name(space, step) in st.key_chunks:
            files.append(rkeys_file(space, step))
    files += sorted(r.file for r in st.indexes.values())
    return files

