"""Least-squares blending of retrieved trajectories (ReDi, section 4.2).

The query key y is approximated by a combination of its neighbours' keys,
w = argmin ||K^T w - y||  (K: H x D, unconstrained, as in the authors' code), and the
same weights combine the neighbours' values: v = sum_i w_i V_i. With one neighbour
this is a scalar rescale of it.
"""

from __future__ import annotations

import numpy as np

# Everything here is a few neighbours by one latent: einsum's own loops, not BLAS, whose threads
# cost 10x more than they save on such shapes when the CPU is busy (16 ms vs 1.5 ms measured for
# H=4 SD1.5 keys on this 2-core box while sampling ran).


def lstsq_weights(keys: np.ndarray, query: np.ndarray) -> tuple[np.ndarray, float]:
    """Weights (H,) of the neighbours' keys (H x D) for `query` (D,), and the
    relative residual ||K^T w - y|| / ||y||."""
    keys = np.asarray(keys, dtype=np.float64)
    query = np.asarray(query, dtype=np.float64)
    gram = np.einsum("id,jd->ij", keys, keys)
    # minimum-norm solution of the normal equations = the pseudo-inverse solution of K^T w = y
    w, *_ = np.linalg.lstsq(gram, np.einsum("id,d->i", keys, query), rcond=1e-12)
    diff = np.einsum("i,id->d", w, keys) - query
    resid = np.sqrt(np.einsum("d,d->", diff, diff)) / max(np.sqrt(np.einsum("d,d->", query, query)), 1e-12)
    return w, float(resid)


def blend(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """sum_i w_i values[i] for values H x ... and weights H."""
    values = np.asarray(values, dtype=np.float64)
    flat = values.reshape(len(values), -1)
    return np.einsum("i,id->d", np.asarray(weights, dtype=np.float64), flat).reshape(values.shape[1:]).astype(np.float32)
