"""Search over reduced keys: average pooling, and a faiss index chosen by size.

The search runs on small keys (the latent average-pooled by a factor fixed at creation);
its candidates are then re-ranked exactly on the full keys read from the shards
(knowledge_base.py), so the pooling and the approximate index only have to put the true
neighbours among the candidates.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import faiss
import numpy as np

from ..errors import KBError
from .atomic import write_atomic

# Flat (exact) search up to this many stored key floats, IVF above (a single-threaded flat
# scan of 2.6M floats took 2.4 ms on this busy machine). 2M keeps demo-model KBs of up to
# 8,192 entries (the benchmark's 5,000 included) on exact search.
FLAT_MAX_FLOATS = 2 << 20
DEFAULT_KEY_DIMS = 256  # pooled key size; measured in the README (kb_tools recall)
DEFAULT_RERANK = 16  # candidates re-ranked on full keys (recall measured in the README; halves an SD1.5 query's reads vs 32)
DEFAULT_NPROBE = 8  # 1M demo KB: same top-1 as 32 probes on 200 queries, 0.6 ms vs 1.3 ms for 16 (README)
RETRAIN_GROWTH = 4  # retrain the IVF centroids when the list count it wants has grown this much


def pool_factor(latent_shape: tuple[int, int, int], key_dims: int = DEFAULT_KEY_DIMS) -> int:
    """The smallest power-of-two pooling factor that brings the key to at most `key_dims` floats."""
    c, h, w = latent_shape
    f = 1
    while c * (h // f) * (w // f) > key_dims and h % (2 * f) == 0 and w % (2 * f) == 0:
        f *= 2
    return f


def reduce_keys(keys: np.ndarray, latent_shape: tuple[int, int, int], pool: int) -> np.ndarray:
    """N x (C*H*W) or N x C x H x W full keys -> N x D pooled float32 keys."""
    c, h, w = latent_shape
    k = np.asarray(keys, dtype=np.float32).reshape(len(keys), c, h, w)
    if pool > 1:
        k = k.reshape(len(keys), c, h // pool, pool, w // pool, pool).mean(axis=(3, 5))
    return np.ascontiguousarray(k.reshape(len(keys), -1), dtype=np.float32)


def wants_ivf(rows: int, dims: int) -> bool:
    return rows * dims > FLAT_MAX_FLOATS


def nlist_for(rows: int) -> int:
    return int(np.clip(2 * np.sqrt(rows), 64, 1024))  # k-means beyond 1024 lists costs minutes here


def flat_index(keys: np.ndarray) -> faiss.Index:
    index = faiss.IndexFlatL2(keys.shape[1])
    if len(keys):
        index.add(np.ascontiguousarray(keys, dtype=np.float32))
    return index


def build_index(keys: np.ndarray) -> faiss.Index:
    """An exact L2 index over `keys` (N x D); kept for small in-memory uses."""
    return flat_index(np.ascontiguousarray(keys, dtype=np.float32))


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(distances, ids), each B x k; faiss' L2 distances are squared, these are not.

    A query batch of a sampler is a few rows: faiss' OpenMP threads cost far more than they
    save there (measured 100 ms with 2 threads vs 2.4 ms with 1 for a 10k x 256 flat scan on
    this busy 2-core machine), so small batches run single-threaded (faiss' own OpenMP
    runtime; torch's threads are not touched)."""
    k = max(1, min(k, index.ntotal))
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if q.ndim != 2 or q.shape[1] != index.d:
        raise KBError(f"query keys of shape {q.shape} do not fit an index of {index.d} floats per key; the query latent "
                      "does not have the KB's latent shape")
    if len(q) > 16:
        d2, ids = index.search(q, k)
    else:
        with single_thread():
            d2, ids = index.search(q, k)
    return np.sqrt(np.maximum(d2, 0.0)), ids


@contextmanager
def single_thread() -> Iterator[None]:
    """Run faiss on one OpenMP thread (its own runtime; torch's threads are not touched)."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(threads)


def assign(centroids: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """The IVF list (nearest centroid) of every key, int32."""
    q = faiss.IndexFlatL2(centroids.shape[1])
    q.add(np.ascontiguousarray(centroids, dtype=np.float32))
    out = np.empty(len(keys), dtype=np.int32)
    for a in range(0, len(keys), 65536):
        part = np.ascontiguousarray(keys[a : a + 65536], dtype=np.float32)
        if len(part) > 4096:
            _, ids = q.search(part, 1)
        else:  # a commit's few new keys: OpenMP threads only contend (21 ms vs under 1 ms measured for 2 keys)
            with single_thread():
                _, ids = q.search(part, 1)
        out[a : a + 65536] = ids[:, 0]
    return out


def train_centroids(keys: np.ndarray, seed: int = 0) -> np.ndarray:
    """k-means centroids (nlist x D) for an IVF index over keys like these."""
    n, d = keys.shape
    nlist = max(1, min(nlist_for(n), n // 39))  # faiss wants 39 training points per centroid
    rng = np.random.default_rng(seed)
    sample = keys[np.sort(rng.choice(n, size=min(n, 40 * nlist), replace=False))]
    km = faiss.Kmeans(d, nlist, niter=10, seed=seed, verbose=False)
    km.train(np.ascontiguousarray(sample, dtype=np.float32))
    return np.ascontiguousarray(km.centroids, dtype=np.float32)


def ivf_index(centroids: np.ndarray, nprobe: int = DEFAULT_NPROBE) -> faiss.IndexIVFFlat:
    """An empty IVF-flat index with these (already trained) centroids."""
    nlist, d = centroids.shape
    quantizer = faiss.IndexFlatL2(d)
    quantizer.add(np.ascontiguousarray(centroids, dtype=np.float32))
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_L2)
    index.is_trained = True
    index.nprobe = nprobe
    return index


def add_preassigned(index: faiss.IndexIVFFlat, keys: np.ndarray, lists: np.ndarray) -> None:
    """Add `keys` to the lists given for each (faiss reads len(keys) list numbers and vectors
    through raw pointers and aborts the process on a bad list: every size is checked first)."""
    keys = np.ascontiguousarray(keys, dtype=np.float32)
    lists = np.ascontiguousarray(lists, dtype=np.int64)
    if keys.ndim != 2 or keys.shape[1] != index.d or lists.shape != (len(keys),) \
            or (len(lists) and (lists.min() < 0 or lists.max() >= index.nlist)):
        raise KBError(f"an IVF index of {index.nlist} lists of {index.d} floats cannot take keys {keys.shape} with lists "
                      f"{lists.shape}; the KB's index does not fit its keys, rebuild the KB")
    with single_thread():  # a memory copy into the lists: threads only contend (3.5 s vs 0.2 s measured)
        index.add_core(len(keys), faiss.swig_ptr(keys), None, faiss.swig_ptr(lists))


def save_ivf(path: Path, centroids: np.ndarray, lists: np.ndarray) -> None:
    """The IVF index as plain arrays (safetensors): centroids and each key's list. The
    vectors themselves are the rkeys file, so nothing in faiss' own format is ever read."""
    from safetensors.numpy import save_file

    write_atomic(Path(path), lambda p: save_file({"centroids": np.ascontiguousarray(centroids, np.float32),
                                                   "lists": np.ascontiguousarray(lists, np.int32)}, str(p)))


MAX_IVF_LISTS = 4096  # nlist_for never asks for more than 1024


def load_ivf(path: Path, rows: int, dims: int, sha256: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(centroids, lists) of an IVF file, read once through one descriptor (a concurrent commit
    may delete the name, never change the bytes), checked against `sha256` (the log's) when
    given, and every size checked against what the KB expects before use."""
    from safetensors.numpy import load

    name = Path(path).name
    limit = 4 * rows + 4 * dims * MAX_IVF_LISTS + (1 << 20)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise KBError(f"{name} is listed by the KB but missing; the KB is incomplete, re-copy or rebuild it") from None
    except OSError as e:
        raise KBError(f"{name} cannot be opened ({e.strerror}); it must be a regular file of the KB, re-copy or rebuild it") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KBError(f"{name} is not a regular file; it must be a file of the KB, re-copy or rebuild it")
        size = st.st_size
        if size > limit:
            raise KBError(f"{name} is {size} bytes, more than an index of {rows} keys may be; the KB is corrupt or hostile")
        data = f.read(limit + 1)
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise KBError(f"{name} does not match its checksum in the log (damaged or swapped); re-copy or rebuild the KB")
    try:
        tensors = load(data)
    except Exception as e:  # safetensors raises several types for damaged files
        raise KBError(f"{name} is not a readable index file ({str(e)[:100]}); rebuild the KB") from None
    if set(tensors) != {"centroids", "lists"}:
        raise KBError(f"{name} must hold exactly 'centroids' and 'lists'; rebuild the KB")
    centroids, lists = tensors["centroids"], tensors["lists"]
    cs, ls = list(centroids.shape), list(lists.shape)
    if len(cs) != 2 or cs[1] != dims or not 1 <= cs[0] <= MAX_IVF_LISTS or ls != [rows]:
        raise KBError(f"{name} holds centroids {cs} and lists {ls}, expected (n, {dims}) and [{rows}]; rebuild the KB")
    if centroids.dtype != np.float32 or lists.dtype != np.int32 or not np.isfinite(centroids).all() \
            or (len(lists) and (lists.min() < 0 or lists.max() >= len(centroids))):
        raise KBError(f"{name} holds invalid centroids or list numbers; rebuild the KB")
    return centroids, lists
