"""An opened knowledge base: fingerprint and entry table in RAM, everything else on demand.

Opening reads manifest.json and log.jsonl only. The first search in a (key space, key
step) reads that key's reduced keys (and IVF list file for large KBs) and builds its faiss
index; full keys and values are then read row by row from the shards, only for the
candidates and neighbours of a query, each row checked against its checksum.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import faiss
import numpy as np

from ..errors import KBError
from . import index as kb_index
from .commit_log import read_state
from .disk_format import (
    IVF_RE,
    KEY_SPACES,
    Entry,
    State,
    key_name,
    read_header,
    safe_file,
)
from .reduced_keys import read_reduced_keys
from .shard import ShardCache, check_values

IVF_RETRIES = 3  # a reader's tries on newer IVF files while commits remove older ones


class _Entries(Sequence):
    """kb.entries[i]: an entry read from its shard's header on first use."""

    def __init__(self, kb: KnowledgeBase):
        self._kb = kb

    def __len__(self) -> int:
        return len(self._kb)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._kb.entry(j) for j in range(*i.indices(len(self)))]
        return self._kb.entry(int(i))

    def __iter__(self) -> Iterator[Entry]:
        return (self._kb.entry(j) for j in range(len(self)))


class KnowledgeBase:
    def __init__(self, path: Path, state: State, limit: int | None = None):
        self.path = Path(path)
        self.state = state
        self.header = state.header
        self.fingerprint = state.fingerprint
        self._count = state.count if limit is None else min(int(limit), state.count)
        self._firsts = np.array([s.first for s in state.shards], dtype=np.int64)
        self._shards = ShardCache(self.path, self.header)
        self._indexes: dict[tuple[str, int], faiss.Index] = {}
        self.rerank = kb_index.DEFAULT_RERANK
        self.nprobe = kb_index.DEFAULT_NPROBE
        self.entries = _Entries(self)
        self._last_rows: tuple[str, np.ndarray, np.ndarray] | None = None  # the last re-rank's rows

    @property
    def name(self) -> str:
        return self.path.name

    def __len__(self) -> int:
        return self._count

    @property
    def units(self) -> frozenset[str]:
        return frozenset(self.state.units)

    @classmethod
    def open(cls, path: Path) -> KnowledgeBase:
        """Read the manifest and the log; raise KBError naming the problem and the fix."""
        path = Path(path)
        state = read_state(path, read_header(path))
        if state.count == 0:
            raise KBError(f"knowledge base {path.name} is empty (no finished batch); build it with some prompts first")
        return cls(path, state)

    @classmethod
    def load(cls, path: Path, check_hash: bool = False) -> KnowledgeBase:
        """Open the KB; with check_hash, validate every file first (reads everything)."""
        if check_hash:
            from .validate import validate_kb

            validate_kb(path)
        return cls.open(path)

    def subset(self, n: int) -> KnowledgeBase:
        """The first `n` entries (for size sweeps); shares nothing mutable with this one."""
        return KnowledgeBase(self.path, self.state, limit=n)

    def close(self) -> None:
        self._shards.close()

    # ---- rows -------------------------------------------------------------------------------
    def require_step(self, step: int, what: str) -> None:
        if step not in self.fingerprint.stored_steps:
            raise KBError(
                f"{what} step {step} is not stored in KB {self.name} (stored steps: {list(self.fingerprint.stored_steps)}); "
                "pick one of those or rebuild the KB storing it"
            )

    def _check_space(self, space: str) -> None:
        if space not in KEY_SPACES:
            raise KBError(f"key space must be one of {KEY_SPACES}, not {space!r}")

    def _rows(self, tensor: str, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        last = self._last_rows
        if last is not None and last[0] == tensor and len(ids):
            at = np.searchsorted(last[1], ids).clip(max=len(last[1]) - 1)
            if (last[1][at] == ids).all():
                return last[2][at]  # the blend re-uses the re-rank's full keys
        if len(ids) and (ids.min() < 0 or ids.max() >= self._count):
            raise KBError(f"entry ids {ids.tolist()[:5]} are outside 0..{self._count - 1} of KB {self.name}")
        if not len(ids):
            return np.empty((0, *self.fingerprint.latent_shape), dtype=np.float32)
        shard_of = np.searchsorted(self._firsts, ids, side="right") - 1
        parts, dtype = [], None
        for i, sh in zip(ids.tolist(), shard_of.tolist()):
            rec = self.state.shards[sh]
            sf = self._shards.get(rec)
            parts.append(sf.raw_row(tensor, i - rec.first))
            dtype = sf.dtype
        out = np.frombuffer(b"".join(parts), dtype=dtype).astype(np.float32).reshape(len(ids), *self.fingerprint.latent_shape)
        check_values(out, f"KB {self.name}, tensor {tensor}")
        return out

    def entry(self, i: int) -> Entry:
        if not 0 <= i < self._count:
            raise IndexError(i)
        sh = int(np.searchsorted(self._firsts, i, side="right") - 1)
        rec = self.state.shards[sh]
        return self._shards.entry(rec, i - rec.first)

    def values(self, space: str, step: int, ids) -> np.ndarray:
        """The stored latents ("latent") or denoised estimates ("denoised") at `step` for `ids`."""
        self.require_step(step, "value")
        self._check_space(space)
        return self._rows(("x" if space == "latent" else "d") + f".{step}", ids)

    def full_keys(self, space: str, step: int, ids) -> np.ndarray:
        """Full keys (len(ids) x C*H*W, float32) read from the shards."""
        self.require_step(step, "key")
        self._check_space(space)
        return self._rows(("x" if space == "latent" else "d") + f".{step}", ids).reshape(len(ids), -1)

    def keys(self, space: str, step: int) -> np.ndarray:
        """Every full key (N x C*H*W). Reads the whole key tensor: for small KBs, tests and tools."""
        return self.full_keys(space, step, np.arange(self._count))

    # ---- search -----------------------------------------------------------------------------
    def reduced_keys(self, space: str, step: int) -> np.ndarray:
        """The first len(self) reduced keys, each committed chunk checked against its checksum."""
        self.require_step(step, "key")
        self._check_space(space)
        return read_reduced_keys(self.path, self.state, space, step, self._count)

    def index(self, space: str, step: int) -> faiss.Index:
        key = (space, step)
        if key not in self._indexes:
            keys = self.reduced_keys(space, step)
            rec = self.state.indexes.get(key_name(space, step))
            if rec is not None and kb_index.wants_ivf(len(keys), keys.shape[1]):
                centroids, lists = self._ivf(key_name(space, step), keys.shape[1])
                idx = kb_index.ivf_index(centroids, self.nprobe)
                kb_index.add_preassigned(idx, keys, lists[: len(keys)])
            else:
                idx = kb_index.flat_index(keys)
            if not self._indexes:
                self._parse_shards()  # once per opened KB, with its first index
            self._check_first_rows(space, step, keys)
            self._indexes[key] = idx
        return self._indexes[key]

    def _ivf(self, key: str, dims: int) -> tuple[np.ndarray, np.ndarray]:
        """The IVF file of `key` that this KB's state lists, or, when a concurrent commit has
        since removed it (writers keep KEEP_IVF_GENERATIONS), the newest one: a later IVF file
        holds a list number for every key this state holds, in the same order (its reduced
        keys only grow, checked on their chunk checksums), so its lists cover ours."""
        rec = self.state.indexes[key]
        for attempt in range(IVF_RETRIES + 1):
            path = safe_file(self.path, rec.file, IVF_RE, must_exist=False)
            try:
                return kb_index.load_ivf(path, rec.rows, dims, rec.sha256)
            except KBError:
                if os.path.lexists(path) or attempt == IVF_RETRIES:
                    if not os.path.lexists(path):
                        raise KBError(f"{rec.file} was removed by commits to KB {self.name} while it was being read "
                                      f"({IVF_RETRIES + 1} tries); run the query again") from None
                    raise
            newer = read_state(self.path, self.header)
            mine, theirs = self.state.key_chunks.get(key, []), newer.key_chunks.get(key, [])
            if theirs[: len(mine)] != mine or key not in newer.indexes or newer.indexes[key].rows < self.state.count:
                raise KBError(f"KB {self.name} was replaced by a different KB while open; run the graph again (it is reopened)")
            rec = newer.indexes[key]
        raise AssertionError("unreachable")

    def _check_first_rows(self, space: str, step: int, keys: np.ndarray) -> None:
        """The first row of every shard must give its reduced key in the rkeys file: one row per
        shard (4,096 entries) catches a shard swapped in from another KB even when the log was
        re-signed to match it (validate compares every row)."""
        tensor = ("x" if space == "latent" else "d") + f".{step}"
        for rec in self.state.shards:
            if rec.first >= self._count:
                break
            row = self._rows(tensor, [rec.first])
            red = kb_index.reduce_keys(row, self.fingerprint.latent_shape, self.header.pool)
            if not np.allclose(red[0], keys[rec.first], rtol=1e-5, atol=1e-5):
                raise KBError(f"{rec.file} does not hold the entries its reduced keys ({key_name(space, step)}) were made from: "
                              f"the shard was swapped or the log re-signed; run `python -m kb_tools validate` and re-copy or rebuild KB {self.name}")

    def _parse_shards(self) -> None:
        """Check every shard's header and row checksums against the log once (about 100 KB per
        4,096 entries), so that later queries read nothing but their rows."""
        for rec in self.state.shards:
            if rec.first >= self._count:
                break
            self._shards.get(rec, keep_open=False)

    def _query_rows(self, queries: np.ndarray) -> np.ndarray:
        """Query latents as rows of the KB's latent size (KBError for another size)."""
        q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32).reshape(len(queries), -1))
        if q.shape[1] != int(np.prod(self.fingerprint.latent_shape)):
            raise KBError(f"the query latent has {q.shape[1]} values per item, KB {self.name} stores latents of shape "
                          f"{list(self.fingerprint.latent_shape)}; use a KB built at this resolution and model")
        return q

    def search(self, space: str, step: int, queries: np.ndarray, n: int, rerank: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The `n` nearest entries of each query by exact L2 on full keys: (distances, ids), B x n.

        Candidates come from the reduced-key index (`rerank` of them, default self.rerank);
        their full keys are read from the shards and ranked exactly."""
        q = self._query_rows(queries)
        check_values(q, "the query latent")
        n = max(1, min(int(n), self._count))
        cand_n = max(n, int(rerank if rerank is not None else self.rerank))
        if self.header.pool == 1 and rerank is None:
            cand_n = n  # the reduced keys are the stored full keys: a re-rank would find the same order
        reduced = kb_index.reduce_keys(q, self.fingerprint.latent_shape, self.header.pool)
        _, cand = kb_index.search(self.index(space, step), reduced, cand_n)
        uniq = np.unique(cand[cand >= 0])
        full = self.full_keys(space, step, uniq)
        self._last_rows = (("x" if space == "latent" else "d") + f".{step}", uniq, full.reshape(len(uniq), *self.fingerprint.latent_shape))
        col = np.searchsorted(uniq, cand.clip(min=0))
        dist = np.full((len(q), n), np.inf, dtype=np.float64)
        ids = np.full((len(q), n), -1, dtype=np.int64)
        for b in range(len(q)):
            ok = cand[b] >= 0
            c = cand[b][ok]
            diff = full[col[b][ok]] - q[b]  # exact distances on full keys (differences first: no cancellation)
            d = np.sqrt(np.einsum("ij,ij->i", diff, diff, dtype=np.float64))
            order = np.argsort(d, kind="stable")[:n]
            dist[b, : len(order)], ids[b, : len(order)] = d[order], c[order]
        return dist, ids

    def exact_search(self, space: str, step: int, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Brute force over every full key (reads them all): the reference for recall checks."""
        q = self._query_rows(queries)
        best_d = np.full((len(q), 0), np.inf)
        best_i = np.zeros((len(q), 0), dtype=np.int64)
        for rec in self.state.shards:
            if rec.first >= self._count:
                break
            ids = np.arange(rec.first, min(rec.first + rec.count, self._count))
            k = self.full_keys(space, step, ids).astype(np.float64)
            d = np.sqrt(np.maximum((q.astype(np.float64) ** 2).sum(1)[:, None] - 2 * q @ k.T + (k**2).sum(1)[None, :], 0))
            best_d = np.concatenate([best_d, d], axis=1)
            best_i = np.concatenate([best_i, np.broadcast_to(ids, d.shape)], axis=1)
            order = np.argsort(best_d, axis=1, kind="stable")[:, :n]
            best_d, best_i = np.take_along_axis(best_d, order, 1), np.take_along_axis(best_i, order, 1)
        return best_d, best_i
