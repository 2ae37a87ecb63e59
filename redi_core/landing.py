"""The guard's landing check in the finish (pure: the adapter's Capture calls the check with the
finish's first denoised estimate as a numpy array): after a jump, the finish's first denoised estimate must
still show the picture the query's own estimate at the key step showed (redi_core.retrieval's
landing_disagreements), or the item restarts from the key step. Costs no model call when every item
lands well; an item that does not costs its wasted first call, and the items that landed well beside
it in the batch one call more (their finish restarts at the value step)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .retrieval import KeyState, ReDiParams, Retrieval, landing_disagreements


class LandingRejected(Exception):
    """Raised from the finish's first step when some items landed on another picture."""

    def __init__(self, keep: np.ndarray, values: np.ndarray) -> None:
        super().__init__(f"{int((~keep).sum())} items landed on another picture")
        self.keep, self.values = keep, values


def landing_guard(query_denoised: np.ndarray, limit: float) -> Callable[[np.ndarray], np.ndarray]:
    """A Capture's check of the finish's first denoised estimate (rows as the finish's batch): returns
    the values when every item is within `limit`, else raises LandingRejected."""
    def check(denoised: np.ndarray) -> np.ndarray:
        values = landing_disagreements(denoised, query_denoised)
        keep = values <= limit
        if not keep.all():
            raise LandingRejected(keep, values)
        return values

    return check


def finish_groups(run: Callable, groups, ret: Retrieval, state: KeyState, params: ReDiParams) -> None:
    """Finish each (start step, rows, start states) group with `run(start, rows, states, landing)`; the
    group that jumped to the value step is checked where it landed (when the guard is on), and items that
    landed on another picture join the items finished from the key step (their reports say why)."""
    pending = [[start, idx, src, params.landing_on and start == params.value_step] for start, idx, src in groups]
    while pending:
        start, idx, src, check = pending.pop(0)
        landing = landing_guard(state.denoised[idx], params.max_landing) if check else None
        try:
            values = run(start, idx, src, landing)
        except LandingRejected as r:
            ret.reject_landing(idx[~r.keep], r.values[~r.keep], params)
            ret.note_landing(idx[r.keep], r.values[r.keep])
            if r.keep.any():
                pending.insert(0, [start, idx[r.keep], src[r.keep], False])
            back = idx[~r.keep]
            full = next((g for g in pending if g[0] == params.key_step), None)
            if full is None:
                pending.append([params.key_step, back, state.x[back], False])
            else:
                full[1], full[2] = np.concatenate([full[1], back]), np.concatenate([full[2], state.x[back]])
            continue
        if check and values is not None:
            ret.note_landing(idx, values)
