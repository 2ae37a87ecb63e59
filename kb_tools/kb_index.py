"""Exact nearest-neighbour search over KB keys with faiss (L2, float32)."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

from .atomic import write_atomic


def build_index(keys: np.ndarray) -> faiss.Index:
    """An exact L2 index over `keys` (N x D)."""
    keys = np.ascontiguousarray(keys, dtype=np.float32)
    index = faiss.IndexFlatL2(keys.shape[1])
    index.add(keys)
    return index


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(distances, ids), each B x k; faiss' L2 distances are squared, these are not."""
    k = min(k, index.ntotal)
    d2, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return np.sqrt(np.maximum(d2, 0.0)), ids


def save_index(index: faiss.Index, path: Path) -> None:
    write_atomic(Path(path), lambda p: faiss.write_index(index, str(p)))


def load_index(path: Path) -> faiss.Index:
    return faiss.read_index(str(path))
