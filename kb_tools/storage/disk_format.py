"""The on-disk knowledge base, format version 2 (built to open in seconds at 100k+ entries).

    NAME/
      manifest.json   written once at creation, never rewritten: format, version,
                      fingerprint, storage dtype, key pooling factor, rows per shard, and
                      optionally the negative prompt's text (it must hash to the fingerprint's
                      negative_hash; older manifests lack it and stay valid)
      log.jsonl       append-only commit log, one JSON line per committed step; each line
                      is self-checksummed, chained to the previous one, and repeats the
                      cumulative state (entry count, shard count, prompt chain, index files)
                      so a writer reads only the last line. The trailing newline is the
                      commit point: a line without it (a killed writer) does not exist.
      shard_NNNNNN.safetensors
                      bounded batches: "x.{s}" (latent after s steps) and "d.{s}" (the
                      model's denoised estimate at step s-1) for every stored step, in the
                      manifest's dtype, a crc32 per row ("crc.x.{s}", "crc.d.{s}"), and the
                      entries ({prompt, seed, pos}) as JSON objects with offsets and a crc32
                      each ("entries.json", "entries.offsets", "crc.entries"), so a query reads
                      one entry alone (older shards hold them as JSON in the header)
      rkeys_{space}_{step}.f32
                      append-only float32 rows of the reduced (average-pooled) keys, one per
                      entry in commit order, checksummed per committed chunk in the log
      ivf_{space}_{step}_{rows}.safetensors
                      an IVF index over the first `rows` reduced keys, only for large KBs
      .lock           the writer lock (not part of the KB)

A KB folder is untrusted input: only files it lists, with plain names matching the
patterns below, regular files inside the folder (no symlinks), are ever opened; every
size read from a file is bounded before anything is allocated; the manifest and the log
are validated against a schema with one message per problem.
No pickle anywhere: tensors and IVF indexes are safetensors, metadata JSON.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import KBError
from .atomic import write_json_atomic

FORMAT = "redi-kb"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
LOG = "log.jsonl"
LOCK = ".lock"
KEY_SPACES = ("latent", "denoised")
DTYPES = ("float16", "float32")

SHARD_RE = re.compile(r"^shard_[0-9]{6}\.safetensors$")
RKEYS_RE = re.compile(r"^rkeys_(latent|denoised)_[0-9]{1,4}\.f32$")
IVF_RE = re.compile(r"^ivf_(latent|denoised)_[0-9]{1,4}_[0-9]{1,10}\.safetensors$")
KEY_RE = re.compile(r"^(latent|denoised)_[0-9]{1,4}$")
SHA_RE = re.compile(r"^[0-9a-f]{64}$")

MAX_MANIFEST_BYTES = 1 << 20
MAX_LATENT_ELEMENTS = 16 * 512 * 512  # a 4096x4096 image with 16 latent channels
MAX_SHARD_ROWS = 65536
MAX_ABS_VALUE = 1.0e4  # latents and denoised estimates of real models stay far below
MAX_NEGATIVE_CHARS = 65536  # the negative prompt's text, kept in the manifest for the KB Loader's report
DEFAULT_SHARD_BYTES = 256 << 20  # a shard's payload stays under this (and never above MAX_SHARD_ROWS rows)
DEFAULT_STORED_STEPS = "4,10"  # the node defaults' key and value steps


@dataclass(frozen=True)
class Fingerprint:
    """What a KB's trajectories depend on. A query must match it to use the KB."""

    model_hash: str
    model_name: str
    latent_shape: tuple[int, int, int]
    sampler: str
    scheduler: str
    steps: int
    cfg: float
    stored_steps: tuple[int, ...]
    seed_mode: str  # "fixed": every entry uses `seed`; "range": entry i of a build uses seed + i
    seed: int
    negative_hash: str = ""
    # what changes the trajectory beyond the weights (issue 15); "" in KBs built before these fields
    sampling: str = ""  # the model's model_sampling: prediction type, sigma range and table (zsnr, shift, v-pred patches)
    negative_cond: str = ""  # a numeric signature of the encoded negative prompt (the query only sees conditioning)

    def __post_init__(self) -> None:
        object.__setattr__(self, "latent_shape", tuple(int(v) for v in self.latent_shape))
        object.__setattr__(self, "stored_steps", tuple(sorted(int(v) for v in self.stored_steps)))
        if self.seed_mode not in ("fixed", "range"):
            raise KBError(f"seed_mode must be 'fixed' or 'range', not {self.seed_mode!r}")
        if not self.stored_steps or min(self.stored_steps) < 1 or max(self.stored_steps) > self.steps:
            raise KBError(f"stored steps {list(self.stored_steps)} must lie in 1..{self.steps} (the KB's step count)")
        if len(self.latent_shape) != 3 or min(self.latent_shape) < 1 or _prod(self.latent_shape) > MAX_LATENT_ELEMENTS:
            raise KBError(f"latent shape {list(self.latent_shape)} must be 3 positive sizes of at most {MAX_LATENT_ELEMENTS} elements")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["latent_shape"] = list(self.latent_shape)
        d["stored_steps"] = list(self.stored_steps)
        return d

    @classmethod
    def from_json(cls, d: Any, where: str = "manifest") -> Fingerprint:
        problems = fingerprint_problems(d)
        if problems:
            raise KBError(f"{where}: the fingerprint is invalid:\n- " + "\n- ".join(problems))
        return cls(**d)

    def mismatches(self, other: Fingerprint, fields: tuple[str, ...]) -> list[str]:
        return [f for f in fields if getattr(self, f) != getattr(other, f)]


def _prod(shape) -> int:
    n = 1
    for v in shape:
        n *= int(v)
    return n


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _type_ok(v: Any, annotation: str) -> bool:
    if annotation == "str":
        return isinstance(v, str) and len(v) <= 4096
    if annotation == "int":
        return _is_int(v)
    if annotation == "float":
        return (_is_int(v) or isinstance(v, float)) and abs(v) < 1e12
    if annotation == "bool":
        return isinstance(v, bool)
    if annotation.startswith("tuple"):
        return isinstance(v, list) and 0 < len(v) <= 1000 and all(_is_int(x) for x in v)
    return False


def fingerprint_problems(d: Any) -> list[str]:
    """One message per problem of a fingerprint read from JSON (fields may be added with defaults)."""
    if not isinstance(d, dict):
        return [f"fingerprint must be an object, not {type(d).__name__}"]
    problems = []
    fields = {f.name: f for f in dataclasses.fields(Fingerprint)}
    for name in d:
        if name not in fields:
            problems.append(f"unknown fingerprint field {name!r} (a KB from a newer pack? update the pack)")
    for name, f in fields.items():
        if name not in d:
            if f.default is dataclasses.MISSING:
                problems.append(f"fingerprint field {name!r} is missing")
        elif not _type_ok(d[name], str(f.type)):
            problems.append(f"fingerprint field {name!r} must be {f.type}, not {d[name]!r:.60}")
    if not problems:
        try:
            Fingerprint(**d)
        except KBError as e:
            problems.append(str(e))
    return problems


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Entry:
    prompt: str
    seed: int
    pos: int = -1  # the entry's position in the build's global prompt list (-1: unknown)


@dataclass(frozen=True)
class Header:
    """manifest.json: what never changes after a KB is created."""

    fingerprint: Fingerprint
    dtype: str = "float16"
    pool: int = 1  # average-pooling factor of the reduced keys (1: the full key)
    shard_rows: int = 4096
    # The negative prompt's text, for people reading the KB (the KB Loader's report); optional, absent
    # from older manifests. Matching uses the fingerprint's negative_hash, which this text must hash to.
    negative_prompt: str | None = None

    @property
    def key_dims(self) -> int:
        c, h, w = self.fingerprint.latent_shape
        return c * (h // self.pool) * (w // self.pool)

    def to_json(self) -> dict[str, Any]:
        d = {"format": FORMAT, "format_version": FORMAT_VERSION, "fingerprint": self.fingerprint.to_json(),
             "dtype": self.dtype, "pool": self.pool, "shard_rows": self.shard_rows}
        if self.negative_prompt is not None:
            d["negative_prompt"] = self.negative_prompt
        return d


@dataclass(frozen=True)
class ShardRec:
    file: str
    count: int
    first: int  # global row of its first entry
    sha256: str  # of the whole file (validate)
    head_sha: str  # of its header and row-checksum tables (checked on first use)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class IndexRec:
    file: str
    rows: int
    sha256: str


@dataclass
class State:
    """A consistent snapshot of a KB: the manifest plus the committed log."""

    header: Header
    count: int = 0
    nshards: int = 0
    chain: str = ""  # hash chain over the committed prompts, in commit order
    seq: int = -1
    last_sha: str = ""
    log_bytes: int = 0  # length of the committed log
    shards: list[ShardRec] = field(default_factory=list)
    units: set[str] = field(default_factory=set)
    key_chunks: dict[str, list[tuple[int, str]]] = field(default_factory=dict)  # key -> [(rows after, sha of chunk)]
    indexes: dict[str, IndexRec] = field(default_factory=dict)

    @property
    def fingerprint(self) -> Fingerprint:
        return self.header.fingerprint


def key_steps(fp: Fingerprint) -> tuple[int, ...]:
    """Stored steps that can serve as key steps (the key step must lie below a stored value step)."""
    return fp.stored_steps[:-1]


def key_list(fp: Fingerprint) -> list[tuple[str, int]]:
    """(space, step) of every reduced-key file a KB keeps."""
    return [(space, s) for space in KEY_SPACES for s in key_steps(fp)]


def key_name(space: str, step: int) -> str:
    return f"{space}_{step}"


def rkeys_file(space: str, step: int) -> str:
    return f"rkeys_{space}_{step}.f32"


def chain_step(chain: str, prompt: str) -> str:
    return hashlib.sha256((chain + "\0" + prompt).encode()).hexdigest()


def prompt_chain(prompts: list[str], chain: str = "") -> str:
    for p in prompts:
        chain = chain_step(chain, p)
    return chain


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def safe_file(kb_dir: Path, name: Any, pattern: re.Pattern | None = None, must_exist: bool = True) -> Path:
    """The path of a file a KB lists, refusing anything that is not a plain name of a regular
    file inside the folder (separators, '..', absolute paths, symlinks, devices)."""
    kb_dir = Path(kb_dir)
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or "\0" in name or name in (".", ".."):
        raise KBError(f"KB {kb_dir.name} names the file {name!r:.80}, which is not a plain file name inside the KB folder; the KB is corrupt or hostile, do not use it")
    if pattern is not None and not pattern.match(name):
        raise KBError(f"KB {kb_dir.name} names the file {name!r:.80}, which is not a KB file name ({pattern.pattern}); the KB is corrupt or hostile, do not use it")
    path = kb_dir / name
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if must_exist:
            raise KBError(f"{name} is listed by KB {kb_dir.name} but missing; the KB is incomplete, rebuild or re-copy it") from None
        return path
    if stat.S_ISLNK(st.st_mode):
        raise KBError(f"{name} in KB {kb_dir.name} is a symbolic link; a KB may only hold its own regular files (copy the file in instead of linking it)")
    if not stat.S_ISREG(st.st_mode):
        raise KBError(f"{name} in KB {kb_dir.name} is not a regular file; the KB is corrupt or hostile, do not use it")
    return path


def _check_dir(kb_dir: Path) -> Path:
    kb_dir = Path(kb_dir)
    if not kb_dir.is_dir():
        raise KBError(f"no knowledge base at {kb_dir}: build one with the ReDi KB Builder node or `python -m kb_tools build`")
    return kb_dir


def _read_bounded(path: Path, limit: int, what: str) -> bytes:
    size = os.stat(path).st_size
    if size > limit:
        raise KBError(f"{path.name} is {size} bytes, more than the {limit} a {what} may have; the KB is corrupt or hostile, do not use it")
    with open(path, "rb") as f:
        return f.read(limit + 1)


def header_problems(data: Any) -> list[str]:
    if not isinstance(data, dict):
        return [f"the manifest must be a JSON object, not {type(data).__name__}"]
    problems = []
    if data.get("dtype") not in DTYPES:
        problems.append(f"dtype must be one of {DTYPES}, not {data.get('dtype')!r:.40}")
    if not _is_int(data.get("pool")) or not 1 <= data["pool"] <= 512:
        problems.append(f"pool must be an integer in 1..512, not {data.get('pool')!r:.40}")
    if not _is_int(data.get("shard_rows")) or not 1 <= data["shard_rows"] <= MAX_SHARD_ROWS:
        problems.append(f"shard_rows must be an integer in 1..{MAX_SHARD_ROWS}, not {data.get('shard_rows')!r:.40}")
    fp_problems = fingerprint_problems(data.get("fingerprint"))
    problems += fp_problems
    if "negative_prompt" in data:  # optional (manifests written before it lack it)
        neg = data["negative_prompt"]
        if not isinstance(neg, str) or len(neg) > MAX_NEGATIVE_CHARS:
            problems.append(f"negative_prompt must be a string of at most {MAX_NEGATIVE_CHARS} characters, not {neg!r:.40}")
        elif not fp_problems and text_hash(neg) != data["fingerprint"].get("negative_hash", ""):
            problems.append("negative_prompt does not match the fingerprint's negative_hash (the text shown would not be the one the KB was built with)")
    if not fp_problems and _is_int(data.get("pool")) and data["pool"] >= 1:
        _, h, w = data["fingerprint"]["latent_shape"]
        if h % data["pool"] or w % data["pool"]:
            problems.append(f"pool {data['pool']} does not divide the latent size {h}x{w}")
    return problems


def read_header(kb_dir: Path) -> Header:
    kb_dir = _check_dir(kb_dir)
    if not os.path.lexists(kb_dir / MANIFEST):
        raise KBError(f"{kb_dir} has no {MANIFEST}: it is not a ReDi knowledge base (or its build never started); build it")
    path = safe_file(kb_dir, MANIFEST)
    try:
        data = json.loads(_read_bounded(path, MAX_MANIFEST_BYTES, "manifest"))
    except (ValueError, RecursionError) as e:  # JSON, UTF-8, huge integers
        raise KBError(f"{path} is not valid JSON ({e}); the KB is corrupt, rebuild it") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise KBError(f"{path} is not a ReDi KB manifest (format field is {data.get('format') if isinstance(data, dict) else None!r:.40})")
    version = data.get("format_version")
    if version == 1:
        raise KBError(
            f"{kb_dir.name} is a format-1 knowledge base; convert it once with "
            f"`python -m kb_tools upgrade {kb_dir} {kb_dir}_v2` (lossless) and use the new folder"
        )
    if version != FORMAT_VERSION:
        raise KBError(f"{kb_dir.name} has format_version {version!r:.20}, this pack reads version {FORMAT_VERSION}; rebuild the KB with this version of the pack")
    problems = header_problems(data)
    if problems:
        raise KBError(f"{path} is invalid:\n- " + "\n- ".join(problems))
    return Header(Fingerprint(**data["fingerprint"]), data["dtype"], data["pool"], data["shard_rows"], data.get("negative_prompt"))


def write_header(kb_dir: Path, header: Header) -> None:
    write_json_atomic(Path(kb_dir) / MANIFEST, header.to_json())
