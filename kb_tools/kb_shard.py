"""One v2 shard: writing it, and reading single rows from it with their checksums.

A shard is a plain safetensors file; its header is parsed here with every size bounded
before anything is allocated (it may come from a shared, hostile KB), and rows are read
with `os.pread`, so a query touches only the rows it blends.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from .atomic import write_atomic
from .errors import KBError
from .kb_format import MAX_ABS_VALUE, SHARD_RE, Entry, Header, ShardRec, safe_file, sha256_file

MAX_SHARD_HEADER = 64 << 20  # entry metadata of a bounded shard stays far below
_ST_DTYPES = {"float16": ("F16", np.float16), "float32": ("F32", np.float32)}


def tensor_names(header: Header) -> list[str]:
    return [f"{k}.{s}" for s in header.fingerprint.stored_steps for k in ("x", "d")]


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


def write_shard(kb_dir: Path, name: str, header: Header, x: dict[int, np.ndarray], d: dict[int, np.ndarray],
                entries: list[Entry]) -> ShardRec:
    """Write rows [0, len(entries)) of x/d as shard `name`; returns its record (first=-1, set by the caller)."""
    fp = header.fingerprint
    n = len(entries)
    st_dtype = _ST_DTYPES[header.dtype][1]
    tensors: dict[str, np.ndarray] = {}
    for s in fp.stored_steps:
        for key, src in (("x", x), ("d", d)):
            arr = np.asarray(src[s])
            if arr.shape != (n, *fp.latent_shape):
                raise KBError(f"{key}.{s} has shape {arr.shape}, expected {(n, *fp.latent_shape)}")
            check_values(arr, f"the trajectories at step {s}")
            stored = np.ascontiguousarray(arr, dtype=st_dtype)
            tensors[f"{key}.{s}"] = stored
            tensors[f"crc.{key}.{s}"] = row_crcs(stored)
    meta = {"entries": json.dumps([{"prompt": e.prompt, "seed": int(e.seed), "pos": int(e.pos)} for e in entries])}
    path = Path(kb_dir) / name
    write_atomic(path, lambda p: save_file(tensors, str(p), metadata=meta))
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
            self._parse(header, check_head)
        except Exception:
            self.close()  # and forget the number: a second close could hit a file or socket that reused it
            raise

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
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise self._bad(f"its header is not JSON ({e})") from e
        if not isinstance(meta, dict):
            raise self._bad("its header is not a JSON object")
        self.base, data_size, count = 8 + n, size - 8 - n, self.rec.count
        st_name, st_dtype = _ST_DTYPES[header.dtype]
        self.row_shape = tuple(fp.latent_shape)
        self.row_bytes = int(np.prod(self.row_shape)) * np.dtype(st_dtype).itemsize
        self.dtype = st_dtype
        self.offsets: dict[str, int] = {}
        expected = {}
        for t in tensor_names(header):
            expected[t] = (st_name, [count, *fp.latent_shape], np.dtype(st_dtype).itemsize)
            expected[f"crc.{t}"] = ("U32", [count], 4)
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
        self.head_sha = hashlib.sha256(head + crc_bytes).hexdigest()
        if check_head and self.head_sha != self.rec.head_sha:
            raise self._bad("its header or row checksums do not match the KB's log (the file was changed or swapped)")
        md = meta.get("__metadata__")
        if not isinstance(md, dict) or not isinstance(md.get("entries"), str):
            raise self._bad("its entry metadata is missing")
        self._entries_json: str | None = md["entries"]
        self._entries: list[Entry] | None = None

    @property
    def entries(self) -> list[Entry]:
        """The shard's entries, parsed on first use (queries need only their neighbours' prompts)."""
        if self._entries is None:
            count = self.rec.count
            try:
                ents = json.loads(self._entries_json)
                assert isinstance(ents, list) and len(ents) == count
                assert all(isinstance(e["prompt"], str) and type(e["seed"]) is int and type(e.get("pos", -1)) is int for e in ents)
                self._entries = [Entry(e["prompt"], e["seed"], e.get("pos", -1)) for e in ents]
            except (KeyError, TypeError, ValueError, AssertionError, json.JSONDecodeError) as e:
                raise self._bad(f"its entry metadata is malformed (need {count} entries with prompt, seed, pos)") from e
            self._entries_json = None
        return self._entries

    def rows(self, tensor: str, idx: np.ndarray | list[int]) -> np.ndarray:
        """Rows `idx` (local) of tensor "x.{s}"/"d.{s}" as float32, each checked against its crc."""
        base, rb, crcs = self.offsets[tensor], self.row_bytes, self.crcs[tensor]
        buf = bytearray(rb * len(idx))
        for j, i in enumerate(idx):
            i = int(i)
            raw = os.pread(self.fd, rb, base + i * rb)
            if len(raw) != rb or zlib.crc32(raw) != int(crcs[i]):
                raise KBError(f"{self.name}: row {i} of {tensor} does not match its checksum (the file is damaged); "
                              f"rebuild the KB or re-copy {self.name}")
            buf[j * rb : (j + 1) * rb] = raw
        out = np.frombuffer(buf, dtype=self.dtype).astype(np.float32).reshape(len(idx), *self.row_shape)
        check_values(out, f"{self.name}, tensor {tensor}")
        return out

    def all_rows(self, tensor: str) -> np.ndarray:
        """Every row of a tensor (checked); for validate, upgrade and merge."""
        count = self.rec.count
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
    """At most `size` open shards, least recently used closed first."""

    def __init__(self, kb_dir: Path, header: Header, size: int = 64):
        self.kb_dir, self.header, self.size = Path(kb_dir), header, size
        self._open: OrderedDict[str, ShardFile] = OrderedDict()

    def get(self, rec: ShardRec) -> ShardFile:
        sf = self._open.get(rec.file)
        if sf is not None:
            self._open.move_to_end(rec.file)
            return sf
        sf = ShardFile(safe_file(self.kb_dir, rec.file, SHARD_RE), rec, self.header)
        self._open[rec.file] = sf
        while len(self._open) > self.size:
            self._open.popitem(last=False)[1].close()
        return sf

    def close(self) -> None:
        for sf in self._open.values():
            sf.close()
        self._open.clear()
