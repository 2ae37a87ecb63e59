"""The on-disk knowledge base (format version 1).

    NAME/
      manifest.json        format, version, fingerprint, shard list (source of truth)
      shard_00000.safetensors ...
                           one finished build batch each: "x.{s}" (the latent after s
                           steps) and "d.{s}" (the model's denoised estimate at step s-1)
                           for every stored step s, plus JSON entry metadata
                           (prompt, seed) in the safetensors header
      index_latent.faiss, index_denoised.faiss
                           exact L2 indexes over the keys, rebuilt on every change

Every write is atomic (temp file + rename) and the manifest is written last, so a
build killed midway keeps each finished shard and nothing half-written is read.
No pickle anywhere: tensors are safetensors, metadata JSON, indexes faiss' format.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from .atomic import write_atomic, write_json_atomic
from .errors import KBError

FORMAT = "redi-kb"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
KEY_SPACES = ("latent", "denoised")


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

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["latent_shape"] = list(self.latent_shape)
        d["stored_steps"] = list(self.stored_steps)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Fingerprint:
        try:
            return cls(**d)
        except TypeError as e:
            raise KBError(f"manifest fingerprint has unexpected fields ({e}); rebuild the KB with this version") from e

    def mismatches(self, other: Fingerprint, fields: tuple[str, ...]) -> list[str]:
        return [f for f in fields if getattr(self, f) != getattr(other, f)]


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Entry:
    prompt: str
    seed: int


@dataclass
class Manifest:
    fingerprint: Fingerprint
    shards: list[dict[str, Any]] = field(default_factory=list)
    planned: int = 0  # entries a resumable build aims for (0: no build in progress)

    @property
    def count(self) -> int:
        return sum(s["count"] for s in self.shards)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "fingerprint": self.fingerprint.to_json(),
            "shards": self.shards,
            "entries": self.count,
            "planned": self.planned,
        }


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(kb_dir: Path) -> Manifest:
    kb_dir = Path(kb_dir)
    path = kb_dir / MANIFEST
    if not kb_dir.is_dir():
        raise KBError(f"no knowledge base at {kb_dir}: build one with the ReDi KB Builder node or `python -m kb_tools build`")
    if not path.is_file():
        raise KBError(f"{kb_dir} has no {MANIFEST}: it is not a ReDi knowledge base (or its build never finished a batch); rebuild it")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KBError(f"{path} is not valid JSON ({e}); the KB is corrupt, rebuild it") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise KBError(f"{path} is not a ReDi KB manifest (format field is {data.get('format') if isinstance(data, dict) else None!r})")
    if data.get("format_version") != FORMAT_VERSION:
        raise KBError(
            f"{kb_dir.name} has format_version {data.get('format_version')}, this pack reads version {FORMAT_VERSION}; "
            "rebuild the KB with this version of the pack"
        )
    fp = Fingerprint.from_json(data.get("fingerprint", {}))
    return Manifest(fp, list(data.get("shards", [])), int(data.get("planned", 0)))


def write_manifest(kb_dir: Path, manifest: Manifest) -> None:
    write_json_atomic(Path(kb_dir) / MANIFEST, manifest.to_json())


def write_shard(
    kb_dir: Path, index: int, fp: Fingerprint, x: dict[int, np.ndarray], d: dict[int, np.ndarray], entries: list[Entry]
) -> dict[str, Any]:
    """Write one batch of trajectories as a shard; returns its manifest record."""
    n = len(entries)
    tensors = {}
    for s in fp.stored_steps:
        for name, src in (("x", x), ("d", d)):
            arr = np.ascontiguousarray(src[s], dtype=np.float32)
            if arr.shape != (n, *fp.latent_shape):
                raise KBError(f"shard {name}.{s} has shape {arr.shape}, expected {(n, *fp.latent_shape)}")
            tensors[f"{name}.{s}"] = arr
    name = f"shard_{index:05d}.safetensors"
    meta = {"entries": json.dumps([asdict(e) for e in entries])}
    write_atomic(Path(kb_dir) / name, lambda p: save_file(tensors, str(p), metadata=meta))
    return {"file": name, "count": n, "sha256": _sha256(Path(kb_dir) / name)}


def read_shard(kb_dir: Path, record: dict[str, Any], fp: Fingerprint, check_hash: bool) -> tuple[dict[str, np.ndarray], list[Entry]]:
    path = Path(kb_dir) / record["file"]
    if not path.is_file():
        raise KBError(f"{path.name} is listed in the manifest but missing; the KB is incomplete, rebuild or re-copy it")
    if check_hash and _sha256(path) != record["sha256"]:
        raise KBError(f"{path.name} does not match its checksum in the manifest: the file is corrupt or was changed; rebuild the KB")
    try:
        with safe_open(str(path), "np") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for truncated or garbage files
        raise KBError(f"{path.name} cannot be read as safetensors ({e}); the KB is corrupt, rebuild it") from e
    try:
        entries = [Entry(**e) for e in json.loads(meta["entries"])]
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise KBError(f"{path.name} has no valid entry metadata; the KB is corrupt, rebuild it") from e
    n = record["count"]
    for s in fp.stored_steps:
        for name in ("x", "d"):
            arr = tensors.get(f"{name}.{s}")
            if arr is None or arr.shape != (n, *fp.latent_shape):
                got = None if arr is None else arr.shape
                raise KBError(f"{path.name}: tensor {name}.{s} is {got}, expected {(n, *fp.latent_shape)}; the KB is corrupt, rebuild it")
    if len(entries) != n:
        raise KBError(f"{path.name} holds {len(entries)} entries, the manifest says {n}; the KB is corrupt, rebuild it")
    return tensors, entries
