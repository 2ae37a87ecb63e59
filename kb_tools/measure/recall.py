"""`python -m kb_tools recall KB`: how often the reduced-key search + exact re-rank returns
the same neighbours as exact search over full keys, on a KB's own trajectories.

Hold-out protocol: the last `queries` entries of the KB are the queries (trajectories of
prompts the rest of the KB does not hold, like a user's query), the other entries are the
KB searched. For each pooled key size, flat and IVF indexes, and each re-rank depth it
reports recall@1 (same nearest entry as exact search) and recall@H (share of the exact
H nearest found). It also reports how the blend changes when keys and values are stored
in fp16 instead of the KB's own dtype (for a float32 KB; a float16 KB reports none).
"""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

from ..storage import index as kb_index

try:  # inside the pack
    from ...redi_core.blend import blend, lstsq_weights
except ImportError:  # the repository root on sys.path (the CLI)
    from redi_core.blend import blend, lstsq_weights
from ..errors import KBError
from ..storage.knowledge_base import KnowledgeBase


def _topk_exact(base: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    idx = faiss.IndexFlatL2(base.shape[1])
    idx.add(base)
    return idx.search(q, k)[1]


def _rerank(base: np.ndarray, q: np.ndarray, cand: np.ndarray, h: int) -> np.ndarray:
    out = np.full((len(q), h), -1, dtype=np.int64)
    for b in range(len(q)):
        c = cand[b][cand[b] >= 0]
        d = ((base[c].astype(np.float64) - q[b]) ** 2).sum(1)
        top = c[np.argsort(d, kind="stable")[:h]]
        out[b, : len(top)] = top
    return out


def measure_recall(kb_path: Path, space: str, step: int, queries: int, noise: float, h: int,
                   reranks: list[int], key_dims: list[int], value_step: int | None = None) -> dict:
    kb = KnowledgeBase.open(kb_path)
    n = len(kb)
    if queries >= n // 2:
        raise KBError(f"KB {kb.name} has {n} entries; use fewer than {n // 2} hold-out queries")
    shape = kb.fingerprint.latent_shape
    full = kb.keys(space, step)
    base, q = full[: n - queries], full[n - queries :].copy()
    if noise > 0:
        rng = np.random.default_rng(0)
        q += noise * np.linalg.norm(q, axis=1, keepdims=True) / np.sqrt(q.shape[1]) * rng.normal(size=q.shape).astype(np.float32)
    exact = _topk_exact(base, q, h)
    rows = []
    for dims in key_dims:
        pool = kb_index.pool_factor(shape, dims)
        rb, rq = kb_index.reduce_keys(base, shape, pool), kb_index.reduce_keys(q, shape, pool)
        indexes = {"flat": kb_index.flat_index(rb)}
        if len(rb) >= 39 * 4:
            centroids = kb_index.train_centroids(rb)
            ivf = kb_index.ivf_index(centroids)
            kb_index.add_preassigned(ivf, rb, kb_index.assign(centroids, rb))
            for nprobe in sorted({4, kb_index.DEFAULT_NPROBE}):
                if nprobe < ivf.nlist:
                    ivf_p = faiss.clone_index(ivf)
                    ivf_p.nprobe = nprobe
                    indexes[f"ivf{ivf.nlist}/nprobe{nprobe}"] = ivf_p
        for name, idx in indexes.items():
            for c in reranks:
                if c < h:
                    continue
                cand = idx.search(rq, c)[1]
                got = _rerank(base, q, cand, h)
                rows.append({"key_dims": rb.shape[1], "pool": pool, "index": name, "rerank": c,
                             "recall@1": float((got[:, 0] == exact[:, 0]).mean()),
                             f"recall@{h}": float(np.mean([len(set(g) & set(e)) / h for g, e in zip(got, exact)]))})
    out = {"kb": kb.name, "entries": n - queries, "queries": queries, "space": space, "step": step, "h": h,
           "dtype": kb.header.dtype, "rows": rows}
    v = value_step or max(s for s in kb.fingerprint.stored_steps)
    if kb.header.dtype == "float32" and v != step:
        out["fp16"] = _fp16_blend_change(kb, base, q, exact, space, v, n - queries)
    return out


def _fp16_blend_change(kb: KnowledgeBase, base, q, exact, space, v, nbase) -> dict:
    """Relative change of the blended value when keys and values are rounded to fp16."""
    changes, errs32, errs16 = [], [], []
    truth = kb.values(space, v, np.arange(nbase, nbase + len(q)))
    for b in range(len(q)):
        nb = exact[b]
        vals = kb.values(space, v, nb)
        w32, _ = lstsq_weights(base[nb], q[b])
        w16, _ = lstsq_weights(base[nb].astype(np.float16).astype(np.float32), q[b])
        b32 = blend(vals, w32)
        b16 = blend(vals.astype(np.float16).astype(np.float32), w16)
        tn = max(float(np.linalg.norm(truth[b])), 1e-12)
        changes.append(float(np.linalg.norm(b16 - b32)) / tn)
        errs32.append(float(np.linalg.norm(b32 - truth[b])) / tn)
        errs16.append(float(np.linalg.norm(b16 - truth[b])) / tn)
    return {"value_step": v, "blend_change_fp16_vs_fp32": float(np.mean(changes)),
            "blend_error_fp32": float(np.mean(errs32)), "blend_error_fp16": float(np.mean(errs16))}


def print_table(res: dict) -> None:
    h = res["h"]
    print(f"recall on KB {res['kb']}: {res['entries']} entries, {res['queries']} hold-out queries, "
          f"{res['space']} keys at step {res['step']}, H={h}, stored {res['dtype']}")
    print(f"\n| key dims | pool | index | re-rank | recall@1 | recall@{h} |\n|---|---|---|---|---|---|")
    for r in res["rows"]:
        print(f"| {r['key_dims']} | {r['pool']} | {r['index']} | {r['rerank']} | {r['recall@1']:.3f} | {r[f'recall@{h}']:.3f} |")
    if "fp16" in res:
        f = res["fp16"]
        print(f"\nfp16 storage (value step {f['value_step']}, exact top-{h}): blend changes by {f['blend_change_fp16_vs_fp32']:.2e} "
              f"(relative); blend error against the true trajectory {f['blend_error_fp32']:.4f} (fp32) vs {f['blend_error_fp16']:.4f} (fp16)")
