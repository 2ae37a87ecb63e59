"""A loaded knowledge base: fingerprint, entries, stored latents and faiss search."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import kb_format, kb_index
from .errors import KBError
from .kb_format import KEY_SPACES, Entry, Fingerprint


class KnowledgeBase:
    def __init__(self, path: Path, fingerprint: Fingerprint, entries: list[Entry], x: dict[int, np.ndarray], d: dict[int, np.ndarray]):
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.entries = entries
        self.x = x
        self.d = d
        self._indexes: dict[tuple[str, int], object] = {}

    @property
    def name(self) -> str:
        return self.path.name

    def __len__(self) -> int:
        return len(self.entries)

    @classmethod
    def load(cls, path: Path, check_hash: bool = True) -> KnowledgeBase:
        """Read and validate everything; raise KBError naming the problem and the fix."""
        path = Path(path)
        manifest = kb_format.read_manifest(path)
        fp = manifest.fingerprint
        if manifest.count == 0:
            raise KBError(f"knowledge base {path.name} is empty (no finished batch); build it with some prompts first")
        xs: dict[int, list[np.ndarray]] = {s: [] for s in fp.stored_steps}
        ds: dict[int, list[np.ndarray]] = {s: [] for s in fp.stored_steps}
        entries: list[Entry] = []
        for rec in manifest.shards:
            tensors, ents = kb_format.read_shard(path, rec, fp, check_hash)
            entries.extend(ents)
            for s in fp.stored_steps:
                xs[s].append(tensors[f"x.{s}"])
                ds[s].append(tensors[f"d.{s}"])
        x = {s: np.concatenate(v) for s, v in xs.items()}
        d = {s: np.concatenate(v) for s, v in ds.items()}
        for s in fp.stored_steps:
            if not (np.isfinite(x[s]).all() and np.isfinite(d[s]).all()):
                raise KBError(f"knowledge base {path.name} holds NaN or infinite latents at step {s}; rebuild it")
        return cls(path, fp, entries, x, d)

    def subset(self, n: int) -> KnowledgeBase:
        """The first `n` entries as an in-memory KB (for size sweeps)."""
        return KnowledgeBase(self.path, self.fingerprint, self.entries[:n], {s: v[:n] for s, v in self.x.items()}, {s: v[:n] for s, v in self.d.items()})

    def keys(self, space: str, step: int) -> np.ndarray:
        self.require_step(step, "key")
        if space not in KEY_SPACES:
            raise KBError(f"key space must be one of {KEY_SPACES}, not {space!r}")
        src = self.x if space == "latent" else self.d
        return src[step].reshape(len(self), -1)

    def values(self, space: str, step: int, ids: np.ndarray) -> np.ndarray:
        self.require_step(step, "value")
        src = self.x if space == "latent" else self.d
        return src[step][ids]

    def require_step(self, step: int, what: str) -> None:
        if step not in self.fingerprint.stored_steps:
            raise KBError(
                f"{what} step {step} is not stored in KB {self.name} (stored steps: {list(self.fingerprint.stored_steps)}); "
                "pick one of those or rebuild the KB storing it"
            )

    def index(self, space: str, step: int):
        key = (space, step)
        if key not in self._indexes:
            path = self.path / f"index_{space}_{step}.faiss"
            idx = None
            if path.is_file():
                try:
                    idx = kb_index.load_index(path)
                except RuntimeError:
                    idx = None
            if idx is None or idx.ntotal != len(self) or idx.d != self.keys(space, step).shape[1]:
                idx = kb_index.build_index(self.keys(space, step))
            self._indexes[key] = idx
        return self._indexes[key]

    def search(self, space: str, step: int, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        return kb_index.search(self.index(space, step), queries.reshape(len(queries), -1), n)

    def write_indexes(self) -> None:
        """Persist one faiss index per (key space, stored step)."""
        for space in KEY_SPACES:
            for s in self.fingerprint.stored_steps:
                kb_index.save_index(kb_index.build_index(self.keys(space, s)), self.path / f"index_{space}_{s}.faiss")
