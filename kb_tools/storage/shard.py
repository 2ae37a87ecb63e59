"""One v2 shard: writing it, and reading single rows from it with their checksums.

A shard is a plain safetensors file; its header is parsed here with every size bounded
before anything is allocated (it may come from a shared, hostile KB), and rows are read
with `os.pread`, so a query touches only the rows it blends.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from ..errors import KBError
from .atomic import write_atomic
from .disk_format import MAX_ABS_VALUE, SHARD_RE, Entry, Header, ShardRec, safe_file, sha256_file

MAX_SHARD_HEADER = 64 << 20  # entry metadata of a bounded shard stays far below
MAX_ENTRY_BYTES = 1 << 20  # one entry's JSON (a prompt of a million characters is not a prompt)
# Entries are stored as tensors (ENTRY_LAYOUT in the header's metadata); shards written before
# that hold them as one JSON string in the header and are still read (parsed whole on first use).
ENTRY_LAYOUT = "tensors-1"
ENTRY_DATA, ENTRY_OFFSETS, ENTRY_CRCS = "entries.json", "entries.offsets", "crc.entries"
_ST_DTYPES = {"float16": ("F16", np.float16), "float32": ("F32", np.float32)}


def tensor_names(header: Header) -> list[str]:
    return [f"{k}.{s}" for s in header.fingerprint.stored_steps for k in ("x", "d")]


def entry_tensors(entries: list[Entry]) -> dict[str, np.ndarray]:
    """The entries as one JSON object each, concatenated, with their offsets and a crc32 per
    entry, so a query reads and checks only its neighbours' entries."""
    blobs = [json.dumps({"prompt": e.prompt, "seed": int(e.seed), "pos": int(e.pos)}).encode() for e in entries]
    offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(b) for b in blobs])
    return {ENTRY_DATA: np.frombuffer(b"".join(blobs), dtype=np.uint8).copy(), ENTRY_OFFSETS: offsets,
            ENTRY_CRCS: np.array([zlib.crc32(b) for b in blobs], dtype=np.uint32)}


def row_crcs(arr: np.ndarray) -> np.ndarray:
    flat = arr.reshape(len(arr), -1)
    return np.array([zlib.crc32(r.tobytes()) for r in flat], dtype=np.uint32)


def check_values(arr: np.ndarray, what: str) -> None:
    """Refuse NaN, infinities and magnitudes no real latent has (they overflow the blend)."""
    if not arr.size:
        return
    peak = max(float(arr.max()), -float(arr.min()))  # NaN propagates through max/min
    if not np.isfinite(peak):
        raise KBError(f"{what} holds NaN or infinite values; the data is corrupt (rebuild it, or check the model and cfg)")
    if peak > MAX_ABS_VALUE:
        raise KBError(f"{what} holds values up to {peak:.3g}, beyond the {MAX_ABS_VALUE:g} a latent may have; the data is corrupt or hostile")


def check_batch(header: Header, x: dict[int, np.ndarray], d: dict[int, np.ndarray], n: int) -> None:
    """Refuse a batch of `n` trajectories that does not fit the KB (a step missing, a shape, a
    value), before anything of it is written."""
    fp = header.fingerprint
    for s in fp.stored_steps:
        for key, src in (("x", x), ("d", d)):
            if s not in src:
                raise KBError(f"the batch has no {key}.{s} (the KB stores steps {list(fp.stored_steps)})")
            arr = np.asarray(src[s])
            if arr.shape != (n, *fp.latent_shape):
                raise KBError(f"{key}.{s} has shape {arr.shape}, expected {(n, *fp.latent_shape)} (the KB's latent shape)")
            check_values(arr, f"the trajectories at step {s}")


def write_shard(kb_dir: Path, name: str, header: Header, x: dict[int, np.ndarray], d: dict[int, np.ndarray],
                entries: list[Entry]) -> ShardRec:
    """Write rows [0, len(entries)) of x/d as shard `name`; returns its record (first=-1, set by the caller)."""
    fp = header.fingerprint
    n = len(entries)
    st_dtype = _ST_DTYPES[header.dtype][1]
    tensors: dict[str, np.ndarray] = {}
    check_batch(header, x, d, n)
    for s in fp.stored_steps:
        for key, src in (("x", x), ("d", d)):
            arr = np.asarray(src[s])
            stored = np.ascontiguousarray(arr, dtype=st_dtype)
            tensors[f"{key}.{s}"] = stored
            tensors[f"crc.{key}.{s}"] = row_crcs(stored)
    tensors.update(entry_tensors(entries))
    path = Path(kb_dir) / name
    write_atomic(path, lambda p: save_file(tensors, str(p), metadata={"entries_layout": ENTRY_LAYOUT}))
    reader = ShardFile(path, ShardRec(name, n, -1, "", ""), header, check_head=False)
    head = reader.head_sha
    reader.close()
    return ShardRec(name, n, -1, sha256_file(path), head)


class ShardFile:
    """An open shard: its validated header, entries and row checksums; rows read on demand."""

    def __init__(self, path: Path, rec: ShardRec, header: Header, check_head: bool = True):
        self.path, self.rec, self.name = Path(path), rec, rec.file
        self.fd = -1
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
        try:
            self.fd = os.open(self.path, flags)
        except OSError as e:
            raise KBError(f"{self.name} cannot be opened ({e.strerror}); re-copy or rebuild the KB") from e
        try:
            if not stat.S_ISREG(os.fstat(self.fd).st_mode):
                raise self._bad("it is not a regular file")
            self._parse(header, check_head)
            st = os.fstat(self.fd)
            self._ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        except Exception:
            self.close()  # and forget the number: a second close could hit a file or socket that reused it
            raise

    def _ensure_open(self) -> None:
        """Reopen a shard whose descriptor the cache closed, refusing a file changed since its check."""
        if self.fd >= 0:
            return
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError as e:
            raise KBError(f"{self.name} cannot be opened ({e.strerror}); re-copy or rebuild the KB") from e
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != self._ident:
            os.close(fd)
            raise KBError(f"{self.name} was replaced or changed while the KB was open; run the graph again (the KB is reopened)")
        self.fd = fd

    def _bad(self, what: str) -> KBError:
        return KBError(f"{self.name}: {what}; the shard is corrupt or hostile, rebuild the KB (or re-copy this file)")

    def _parse(self, header: Header, check_head: bool) -> None:
        fp = header.fingerprint
        size = os.fstat(self.fd).st_size
        raw = os.pread(self.fd, 8, 0)
        if len(raw) < 8:
            raise self._bad("the file is shorter than a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, MAX_SHARD_HEADER):
            raise self._bad(f"its header claims {n} bytes (file {size} bytes, limit {MAX_SHARD_HEADER})")
        head = os.pread(self.fd, n, 8)
        try:
            meta = json.loads(head)
        except (ValueError, RecursionError) as e:  # JSON, UTF-8, huge integers
            raise self._bad(f"its header is not JSON ({e})") from e
        if not isinstance(meta, dict):
            raise self._bad("its header is not a JSON object")
        self.base, data_size, count = 8 + n, size - 8 - n, self.rec.count
        st_name, st_dtype = _ST_DTYPES[header.dtype]
        self.row_shape = tuple(fp.latent_shape)
        self.row_bytes = int(np.prod(self.row_shape)) * np.dtype(st_dtype).itemsize
        self.dtype = st_dtype
        self.offsets: dict[str, int] = {}
        md = meta.get("__metadata__")
        if not isinstance(md, dict):
            raise self._bad("its metadata is missing")
        self.entry_tensors = md.get("entries_layout") == ENTRY_LAYOUT
        if not self.entry_tensors and not isinstance(md.get("entries"), str):
            raise self._bad("its entry metadata is missing")
        expected = {}
        for t in tensor_names(header):
            expected[t] = (st_name, [count, *fp.latent_shape], np.dtype(st_dtype).itemsize)
            expected[f"crc.{t}"] = ("U32", [count], 4)
        if self.entry_tensors:
            info = meta.get(ENTRY_DATA)
            shape = info.get("shape") if isinstance(info, dict) else None
            nbytes = shape[0] if isinstance(shape, list) and len(shape) == 1 and type(shape[0]) is int else -1
            if not 0 < nbytes <= min(data_size, count * MAX_ENTRY_BYTES):
                raise self._bad(f"tensor {ENTRY_DATA} has shape {str(shape)[:40]}, not the bytes of {count} entries")
            expected[ENTRY_DATA] = ("U8", [nbytes], 1)
            expected[ENTRY_OFFSETS] = ("I64", [count + 1], 8)
            expected[ENTRY_CRCS] = ("U32", [count], 4)
        extra = set(meta) - set(expected) - {"__metadata__"}
        if extra:
            raise self._bad(f"it holds unexpected tensors {sorted(extra)[:5]}")
        for t, (dt, shape, item) in expected.items():
            info = meta.get(t)
            if not isinstance(info, dict) or info.get("dtype") != dt or info.get("shape") != shape:
                got = {k: info.get(k) for k in ("dtype", "shape")} if isinstance(info, dict) else None
                raise self._bad(f"tensor {t} is {got}, expected dtype {dt} shape {shape}")
            off = info.get("data_offsets")
            nbytes = item * int(np.prod(shape))
            if not (isinstance(off, list) and len(off) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in off)
                    and 0 <= off[0] and off[1] - off[0] == nbytes and off[1] <= data_size):
                raise self._bad(f"tensor {t} has data offsets {str(off)[:60]} outside the file or of the wrong size")
            self.offsets[t] = self.base + off[0]
        crc_bytes = b""
        self.crcs: dict[str, np.ndarray] = {}
        for t in tensor_names(header):
            b = os.pread(self.fd, 4 * count, self.offsets[f"crc.{t}"])
            crc_bytes += b
            self.crcs[t] = np.frombuffer(b, dtype="<u4")
        if self.entry_tensors:
            # the entry offsets and checksums are covered by the head checksum like the row checksums
            ob = os.pread(self.fd, 8 * (count + 1), self.offsets[ENTRY_OFFSETS])
            cb = os.pread(self.fd, 4 * count, self.offsets[ENTRY_CRCS])
            crc_bytes += ob + cb
            self.entry_offsets = np.frombuffer(ob, dtype="<i8")
            self.entry_crcs = np.frombuffer(cb, dtype="<u4")
            lens = np.diff(self.entry_offsets)
            if self.entry_offsets[0] != 0 or self.entry_offsets[-1] != expected[ENTRY_DATA][1][0] or (lens <= 0).any() \
                    or (lens > MAX_ENTRY_BYTES).any():
                raise self._bad("its entry offsets are not increasing within the entry data")
        self.head_sha = hashlib.sha256(head + crc_bytes).hexdigest()
        if check_head and self.head_sha != self.rec.head_sha:
            raise self._bad("its header or row checksums do not match the KB's log (the file was changed or swapped)")
        self._head = (8, n)  # where the header lies, to re-read header-held entries when needed
        self._entries: list[Entry] | None = None

    def _entry_from(self, raw: bytes, i: int) -> Entry:
        if zlib.crc32(raw) != int(self.entry_crcs[i]):
            raise KBError(f"{self.name}: entry {i} does not match its checksum (the file is damaged); rebuild the KB or re-copy {self.name}")
        try:
            e = json.loads(raw)
            assert isinstance(e, dict) and isinstance(e["prompt"], str) and type(e["seed"]) is int and type(e["pos"]) is int
        except (KeyError, TypeError, ValueError, AssertionError, RecursionError) as err:
            raise self._bad(f"entry {i} is not an object with prompt, seed and pos") from err
        return Entry(e["prompt"], e["seed"], e["pos"])

    def entry(self, i: int) -> Entry:
        """Entry `i` (local); with entry tensors only its own bytes are read."""
        if not self.entry_tensors:
            return self.entries[i]
        self._ensure_open()
        a, b = int(self.entry_offsets[i]), int(self.entry_offsets[i + 1])
        raw = os.pread(self.fd, b - a, self.offsets[ENTRY_DATA] + a)
        if len(raw) != b - a:
            raise self._bad(f"entry {i} is truncated")
        return self._entry_from(raw, i)

    @property
    def entries(self) -> list[Entry]:
        """Every entry of the shard, parsed on first use (queries need only their neighbours' prompts)."""
        if self._entries is None:
            self._entries = self.read_entries()
        return self._entries

    def read_entries(self) -> list[Entry]:
        """Every entry, parsed and checked now and not kept (validate reads each shard once)."""
        count = self.rec.count
        self._ensure_open()
        if self.entry_tensors:
            size = int(self.entry_offsets[-1])
            raw = os.pread(self.fd, size, self.offsets[ENTRY_DATA])
            if len(raw) != size:
                raise self._bad("its entry data is truncated")
            offs = self.entry_offsets
            return [self._entry_from(raw[offs[i] : offs[i + 1]], i) for i in range(count)]
        head = os.pread(self.fd, self._head[1], self._head[0])
        try:
            ents = json.loads(json.loads(head)["__metadata__"]["entries"])
            assert isinstance(ents, list) and len(ents) == count
            assert all(isinstance(e["prompt"], str) and type(e["seed"]) is int and type(e.get("pos", -1)) is int for e in ents)
            return [Entry(e["prompt"], e["seed"], e.get("pos", -1)) for e in ents]
        except (KeyError, TypeError, ValueError, AssertionError, RecursionError) as e:
            raise self._bad(f"its entry metadata is malformed (need {count} entries with prompt, seed, pos)") from e

    def drop_entries(self) -> None:
        self._entries = None

    def raw_row(self, tensor: str, i: int) -> bytes:
        """Row `i` (local) of tensor "x.{s}"/"d.{s}" as stored bytes, checked against its crc."""
        self._ensure_open()
        rb = self.row_bytes
        raw = os.pread(self.fd, rb, self.offsets[tensor] + i * rb)
        if len(raw) != rb or zlib.crc32(raw) != int(self.crcs[tensor][i]):
            raise KBError(f"{self.name}: row {i} of {tensor} does not match its checksum (the file is damaged); "
                          f"rebuild the KB or re-copy {self.name}")
        return raw

    def all_rows(self, tensor: str) -> np.ndarray:
        """Every row of a tensor (checked); for validate, upgrade and merge."""
        count = self.rec.count
        self._ensure_open()
        raw = os.pread(self.fd, self.row_bytes * count, self.offsets[tensor])
        if len(raw) != self.row_bytes * count:
            raise self._bad(f"tensor {tensor} is truncated")
        arr = np.frombuffer(raw, dtype=self.dtype).reshape(count, -1)
        bad = np.flatnonzero(row_crcs(arr) != self.crcs[tensor])
        if len(bad):
            raise KBError(f"{self.name}: rows {bad[:5].tolist()} of {tensor} do not match their checksums (the file is damaged); rebuild the KB or re-copy {self.name}")
        out = arr.astype(np.float32).reshape(count, *self.row_shape)
        check_values(out, f"{self.name}, tensor {tensor}")
        return out

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class ShardCache:
    """Every shard a KB has read stays parsed (offsets and row checksums: 4 bytes per row and
    tensor); at most `size` keep an open descriptor and at most `entry_size` their parsed entries,
    least recently used dropped first."""

    def __init__(self, kb_dir: Path, header: Header, size: int = 64, entry_size: int = 16):
        self.kb_dir, self.header, self.size, self.entry_size = Path(kb_dir), header, size, entry_size
        self._parsed: dict[str, ShardFile] = {}
        self._open: OrderedDict[str, None] = OrderedDict()
        self._with_entries: OrderedDict[str, None] = OrderedDict()

    def get(self, rec: ShardRec, keep_open: bool = True) -> ShardFile:
        sf = self._parsed.get(rec.file)
        if sf is None:
            sf = ShardFile(safe_file(self.kb_dir, rec.file, SHARD_RE), rec, self.header)
            self._parsed[rec.file] = sf
        if not keep_open:
            if rec.file not in self._open:
                sf.close()
            return sf
        sf._ensure_open()
        self._open[rec.file] = None
        self._open.move_to_end(rec.file)
        while len(self._open) > self.size:
            self._parsed[self._open.popitem(last=False)[0]].close()
        return sf

    def entry(self, rec: ShardRec, i: int) -> Entry:
        """Entry `i` (local) of a shard: read alone, or from the shard's parsed list (old layout)."""
        sf = self.get(rec)
        return sf.entry(i) if sf.entry_tensors else self.entries(rec)[i]

    def entries(self, rec: ShardRec) -> list[Entry]:
        sf = self.get(rec)
        out = sf.entries
        self._with_entries[rec.file] = None
        self._with_entries.move_to_end(rec.file)
        while len(self._with_entries) > self.entry_size:
            self._parsed[self._with_entries.popitem(last=False)[0]].drop_entries()
        return out

    def close(self) -> None:
        for sf in self._parsed.values():
            sf.close()
        self._parsed.clear()
        self._open.clear()
        self._with_entries.clear()
