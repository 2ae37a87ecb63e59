"""A skip chosen per image: each item's value step follows its retrieval distance.

One search at the key step gives every item's nearest stored trajectory. A close neighbour
lets the item jump far (a late value step), a farther one less, and a poor one is sampled in
full from the key step. The tiers of a preset are (max relative key distance, value step as a
fraction of the schedule), tried from the farthest jump down; thresholds are measured on the
demo model at random seeds (scripts/calibrate_adaptive.py, README "Speed vs fidelity") under
the per-image criterion: an image fails when it lies under 15 dB PSNR from its full run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .blend import blend, lstsq_weights
from .kb_access import KBError, KBView
from .retrieval import GUARD_DEFAULTS, ItemReport, KeyState

# preset -> (key step fraction, tiers [(max distance, value step fraction)], farthest jump first).
# Calibrated on the demo model (euler/normal, 20 steps, cfg 6), denoised keys at new seeds: a library KB
# of 110 session-stream trajectories, 40 queries of another stream, each finished from every value step
# (scripts/calibrate_adaptive.py; docs/library.md). Nearest distances 0.45-1.16. v=16 (k=3): the first
# image under 15 dB at distance 0.80; v=14: none under 15 dB up to 1.16; v=12: worst 17.8 dB.
# The key step of balanced and speed is 2 (k=2 at 20 steps): on a 500-entry library KB with 300 queries
# at new seeds (scripts/bench_skip.py), k=2 and k=3 gave the same images under 15 dB at v=14 (4 and 4
# of 300) and v=16 (12 and 14), the same accuracy (-0.5 points at v=14) and a median PSNR 0.6 dB apart,
# and k=2 saves one UNet call per image; the learning curve of balanced went from 0.482 to 0.429 of the
# full run's calls in its last window, within every quality target (docs/library.md).
# fidelity keeps k=3, the setting measured within every target from an empty library.
PRESETS: dict[str, tuple[float, tuple[tuple[float, float], ...]]] = {
    "fidelity": (0.15, ((0.9, 0.6), (1.2, 0.5))),
    "balanced": (0.10, ((0.6, 0.8), (1.2, 0.7))),
    "speed": (0.10, ((0.75, 0.8), (1.2, 0.7))),
}
# A KB of at least LARGE_KB trajectories covers the prompts well enough that balanced and speed jump to
# v=16 from much farther: on a pre-built 5,000-entry library KB (random seeds; scripts/bench_skip.py), v=16
# from k=2 for every one of 600 queries put 1 image under 15 dB (0 of the 300 held-out ones), where the
# same on a 500-entry KB put 17 of 600 there (12 of them at nearest distances 0.72-0.83). The bound 1.12
# is fitted on the 5,000-entry calibration split (at most one image under 15 dB) and checked on the
# held-out split. Between 500 and 5,000 nothing was measured: the small-KB tiers apply.
LARGE_KB = 5000
LARGE_KB_TIERS: dict[str, tuple[tuple[float, float], ...]] = {
    "balanced": ((1.12, 0.8), (1.2, 0.7)),
    "speed": ((1.12, 0.8), (1.2, 0.7)),
}
FIXED = "fixed k/v"  # the node option: key_step and value_step for every image
PRESET_OPTIONS = [FIXED, *PRESETS]


def library_preset(speed: str) -> str:
    """The preset a library run uses: a library KB stores its own steps, so "fixed k/v" means fidelity
    (the preset measured within every quality target)."""
    return "fidelity" if speed == FIXED else speed


@dataclass(frozen=True)
class Exploration:
    """When a learning library samples an image in full although a jump was possible, so that it
    keeps learning (only while it records: an image sampled in full is added to the KB).

    - Warm-up: while the KB holds fewer than `min_trajectories`, every image is sampled in full.
      The distance bounds of the presets were calibrated on a 110-entry KB; on a KB of a dozen
      entries the same distance is a worse match (the measured balanced curve lost 2.3-6.3
      accuracy points and stalled at 18 trajectories because nearly every image jumped).
    - Density: an image whose nearest key lies farther than `density_factor` times the KB's own
      spacing (`kb_spacing`: the median distance from a stored key to its nearest other stored
      key) is in a region the KB does not cover yet: the jump from there is the least reliable,
      and recording it is what the library lacks. 0 turns this rule off; so does a KB of LARGE_KB
      trajectories or more (measured: jumps from its far neighbours hold).

    Both depend only on the KB and the item's own key (its seed and conditioning): no random draw.
    """

    min_trajectories: int
    density_factor: float = 0.0

    def density_applies(self, count: int) -> bool:
        """Whether the density rule judges an item of a KB holding `count` trajectories (it needs the
        KB's spacing then): on, past the warm-up, below LARGE_KB."""
        return self.density_factor > 0 and self.min_trajectories <= count < LARGE_KB


# per preset. balanced and speed (v=14-16) jump only from a KB of the calibration's size (110 entries);
# their density factor 1.2 is measured (docs/library.md, 500 generations of balanced: with 1.5 the rule
# fired on 1-6 images per 100 because a ~110-entry KB's spacing is 0.77 and new queries' nearest keys
# lie at a median 0.9, the library stalled near 111 trajectories and one window lost 6.2 accuracy
# points; with 1.2 it grew to 155 and every window stayed within 2 points, 0 of 500 under 15 dB).
# fidelity was measured within every quality target from an empty library, so it keeps that behaviour
# (no warm-up; at 1.5 the density rule fired on none of 200 images)
EXPLORATION: dict[str, Exploration] = {
    "fidelity": Exploration(0, 1.5),
    "balanced": Exploration(100, 1.2),
    "speed": Exploration(100, 1.2),
}
SPACING_SAMPLE = 64


@dataclass(frozen=True)
class Tier:
    max_distance: float
    value_step: int


def plan(preset: str, steps: int, stored: tuple[int, ...], count: int = 0) -> tuple[int, list[Tier]]:
    """The key step and the tiers of `preset` for a schedule of `steps`, snapped to stored steps, for a
    KB of `count` trajectories (LARGE_KB or more: the preset's large-KB tiers)."""
    if preset not in PRESETS:
        raise KBError(f"speed preset must be one of {list(PRESETS)}, not {preset!r}")
    key_frac, tiers = PRESETS[preset]
    if count >= LARGE_KB and preset in LARGE_KB_TIERS:
        tiers = LARGE_KB_TIERS[preset]
    stored = tuple(sorted(stored))

    def snap(frac: float) -> int:
        return min(stored, key=lambda s: (abs(s - frac * steps), s))

    k = snap(key_frac)
    out = []
    for dist, frac in tiers:
        v = snap(frac)
        if v > k and all(v != t.value_step for t in out):
            out.append(Tier(dist, v))
    if not out:
        raise KBError(f"the KB stores no value step after key step {k} (stored {list(stored)}); use a library KB or fixed k/v")
    return k, out


def choose(distance: float, tiers: list[Tier]) -> Tier | None:
    """The farthest jump whose distance bound the item's nearest key meets (None: full sampling)."""
    for t in tiers:
        if distance <= t.max_distance:
            return t
    return None


def fit_tiers(distance: np.ndarray, failed: dict[int, np.ndarray], max_fail: int = 0) -> list[Tier]:
    """Tiers from measured items: `distance` holds each item's nearest relative key distance and
    `failed[v]` whether its image failed when it jumped to value step v (items that could not jump
    there count as not failed). Per step, farthest first: the largest bound under which at most
    `max_fail` items fail, halfway to the next item's distance (or at the largest distance seen).
    A nearer step is kept only where it allows more than the farther ones (a wider bound)."""
    dist = np.asarray(distance, dtype=float)
    order = np.argsort(dist, kind="stable")
    d_sorted = dist[order]
    out: list[Tier] = []
    for v in sorted(failed, reverse=True):
        bad = np.cumsum(np.asarray(failed[v], dtype=bool)[order])
        ok = np.flatnonzero(bad <= max_fail)
        if not len(ok):
            continue
        last = int(ok[-1])
        bound = float(d_sorted[last]) if last == len(order) - 1 else float((d_sorted[last] + d_sorted[last + 1]) / 2)
        if out and bound <= out[-1].max_distance:
            continue
        out.append(Tier(bound, int(v)))
    return out


def kb_spacing(kb: KBView, key_step: int, sample: int = SPACING_SAMPLE) -> float:
    """The KB's density at the key step: the median relative distance (to the stored key's norm, as
    the retrieval measures a query's) from a stored denoised key to its nearest OTHER stored key,
    over up to `sample` entries spread evenly over the KB (deterministic). inf below 2 entries."""
    n = len(kb.entries)
    if n < 2:
        return float("inf")
    idx = np.unique(np.linspace(0, n - 1, min(n, int(sample))).round().astype(np.int64))
    keys = kb.full_keys("denoised", key_step, idx).reshape(len(idx), -1).astype(np.float32)
    dist, ids = kb.search("denoised", key_step, keys, 2)
    rel = []
    for i, own in enumerate(idx.tolist()):
        other = [float(d) for d, j in zip(dist[i], ids[i]) if j >= 0 and j != own]
        if other:
            rel.append(other[0] / max(float(np.linalg.norm(keys[i])), 1e-12))
    return float(np.median(rel)) if rel else float("inf")


class SpacingCache:
    """`kb_spacing` once per (KB, size, key step): a KB only changes by growing, so its size tells a
    stale value. `ident` names the KB (its folder); a few KBs are kept."""

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self._values: dict[tuple, float] = {}

    def get(self, kb: KBView, key_step: int, ident: str, sample: int = SPACING_SAMPLE) -> float:
        key = (ident, len(kb.entries), int(key_step), int(sample))
        if key not in self._values:
            while len(self._values) >= self.size:
                self._values.pop(next(iter(self._values)))
            self._values[key] = kb_spacing(kb, key_step, sample)
        return self._values[key]


SPACING = SpacingCache()


def explore_reason(count: int, nearest: float, explore: Exploration | None, spacing: float) -> str:
    """Why an item with nearest relative distance `nearest` in a KB of `count` entries is sampled in
    full to be recorded ("" when exploration does not apply)."""
    if explore is None:
        return ""
    if count < explore.min_trajectories:
        return (f"exploring: the KB holds {count} of the {explore.min_trajectories} trajectories it needs before jumping "
                f"(nearest key at {nearest:.3f}); sampled in full and recorded")
    bound = explore.density_factor * spacing
    if explore.density_applies(count) and np.isfinite(bound) and nearest > bound:
        return (f"exploring: nearest key at {nearest:.3f} > {explore.density_factor:g} x the KB's spacing {spacing:.3f} "
                "(a region the KB does not cover yet); sampled in full and recorded")
    return ""


@dataclass
class AdaptiveRetrieval:
    key_step: int
    value_steps: np.ndarray  # B ints: the item's value step, or the key step when sampled in full
    x_start: np.ndarray  # B x C x H x W: each item's start state (the blend at its value step, or x_k)
    reports: list[ItemReport]
    explored: np.ndarray | None = None  # B bools: sampled in full by the exploration rule (to be recorded)

    @property
    def accepted(self) -> np.ndarray:
        return self.value_steps > self.key_step

    def hold(self, reason: str, state: KeyState) -> None:
        """Every item sampled in full from the key step, for one reason (an unverified pair)."""
        self.value_steps[:] = self.key_step
        self.x_start[:] = state.x
        for rep in self.reports:
            rep.accepted, rep.reason = False, reason

    def starts(self):
        """(start step, item indices, their start states), one group per distinct start step."""
        for start in sorted(set(self.value_steps.tolist())):
            idx = np.flatnonzero(self.value_steps == start)
            yield int(start), idx, self.x_start[idx]


def retrieve_adaptive(kb: KBView | None, state: KeyState, key_step: int, tiers: list[Tier], sigmas: list[float],
                      neighbours: int = 1, max_weight_deviation: float = GUARD_DEFAULTS["max_weight_deviation"],
                      empty_reason: str = "the KB holds no trajectory yet", explore: Exploration | None = None,
                      spacing: float | None = None) -> AdaptiveRetrieval:
    """Per item: search the denoised keys at `key_step`, pick the tier from the nearest distance,
    blend the neighbours' denoised values at that tier's step and re-noise them with the item's
    own noise estimate (any seed). `sigmas` is the whole schedule. `explore` (a learning library
    only): the items the exploration rule sends to full sampling; `spacing` is the KB's
    `kb_spacing` at `key_step` (computed here when None and the density rule needs it)."""
    b = len(state.x)
    value_steps = np.full(b, key_step, dtype=np.int64)
    x_start = state.x.astype(np.float32).copy()
    explored = np.zeros(b, dtype=bool)
    if kb is None or len(kb.entries) == 0:
        if explore is not None:
            explored[:] = True
        return AdaptiveRetrieval(key_step, value_steps, x_start, [ItemReport(False, reason=empty_reason) for _ in range(b)], explored)
    kb.require_step(key_step, "key")
    for t in tiers:
        kb.require_step(t.value_step, "value")
    count = len(kb.entries)
    if explore is not None and spacing is None and explore.density_applies(count):
        spacing = kb_spacing(kb, key_step)
    queries = state.denoised.reshape(b, -1).astype(np.float32)
    dist, ids = kb.search("denoised", key_step, queries, neighbours)
    reports = []
    for i, q in enumerate(queries):
        nb = ids[i][ids[i] >= 0]
        qn = max(float(np.linalg.norm(q)), 1e-12)
        rel = [float(d) / qn for d in dist[i][: len(nb)]]
        w, resid = lstsq_weights(kb.full_keys("denoised", key_step, nb), q)
        rep = ItemReport(accepted=False, neighbours=nb.tolist(), prompts=[kb.entries[j].prompt for j in nb], distances=rel,
                         weights=w.tolist(), residual=resid)
        tier = choose(rel[0], tiers)
        why = explore_reason(count, rel[0], explore, float("inf") if spacing is None else spacing)
        if why:
            rep.reason = why
            explored[i] = True
        elif tier is None:
            rep.reason = f"nearest key at {rel[0]:.3f} > {tiers[-1].max_distance:.2f} (too far for any jump)"
        elif max_weight_deviation > 0 and abs(float(np.sum(w)) - 1.0) > max_weight_deviation:
            rep.reason = f"blend weights sum to {float(np.sum(w)):+.3f}, more than {max_weight_deviation:.2f} from 1"
        else:
            rep.accepted = True
            rep.reason = f"nearest key at {rel[0]:.3f} <= {tier.max_distance:.2f}"
            value = blend(kb.values("denoised", tier.value_step, nb), w)
            x_start[i] = value + np.float32(sigmas[tier.value_step]) * state.eps[i].astype(np.float32)
            value_steps[i] = tier.value_step
        reports.append(rep)
    return AdaptiveRetrieval(key_step, value_steps, x_start, reports, explored)


def summary_lines(ret: AdaptiveRetrieval, preset: str, tiers: list[Tier], steps: int,
                  explore: Exploration | None = None) -> list[str]:
    k = ret.key_step
    lines = [f"ReDi {preset}: key step {k}, denoised keys; jump to " +
             ", ".join(f"step {t.value_step} when the nearest key is within {t.max_distance:.2f}" for t in tiers)]
    if explore is not None:
        rule = f"while the KB holds fewer than {explore.min_trajectories} trajectories"
        if explore.density_factor > 0:
            rule += f" or when the nearest key is farther than {explore.density_factor:g} x the KB's spacing"
        lines[0] += f"; exploring (sampling in full to record) {rule}"
    for b, (r, v) in enumerate(zip(ret.reports, ret.value_steps.tolist())):
        if v > k:
            lines.append(f"[{b}] jumped from step {k} to step {v} (skipped {v - k} of {steps} steps): {r.reason}")
        else:
            lines.append(f"[{b}] full sampling from step {k}: {r.reason}")
        for p, d, w in zip(r.prompts[:2], r.distances, r.weights):
            lines.append(f"    w={w:+.3f} dist={d:.3f}  {p[:80]}")
    return lines
