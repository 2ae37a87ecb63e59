"""Least-squares blending of retrieved trajectories (ReDi, section 4.2).

The query key y is approximated by a combination of its neighbours' keys,
w = argmin ||K^T w - y||  (K: H x D, unconstrained, as in the authors' code), and the
same weights combine the neighbours' values: v = sum_i w_i V_i. With one neighbour
this is a scalar rescale of it.
"""

from __future__ import annotations

import numpy as np


def lstsq_weights(keys: np.ndarray, query: np.ndarray) -> tuple[np.ndarray, float]:
    """Weights (H,) of the neighbours' keys (H x D) for `query` (D,), and the
    relative residual ||K^T w - y|| / ||y||."""
    keys = np.asarray(keys, dtype=np.float64)
    query = np.asarray(query, dtype=np.float64)
    w, *_ = np.linalg.lstsq(keys.T, query, rcond=None)
    resid = np.linalg.norm(keys.T @ w - query) / max(np.linalg.norm(query), 1e-12)
    return w, float(resid)


def blend(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """sum_i w_i values[i] for values H x ... and weights H."""
    values = np.asarray(values, dtype=np.float64)
    return np.tensordot(np.asarray(weights, dtype=np.float64), values, axes=1).astype(np.float32)
