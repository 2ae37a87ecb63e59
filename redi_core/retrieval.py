"""ReDi's retrieval step between the key phase and the finish phase.

The node glue runs the first k steps with a stock sampler (the key phase), calls
`retrieve()` with the resulting state, then finishes each item from step v with the
blended value, or from step k when the quality guard rejects its neighbours.

Two key spaces:
  latent:   key = the latent after k steps, value = the latent after v steps (the
            paper; meaningful when the query uses the KB's seed, the paper's regime).
  denoised: key = the model's denoised estimate after k steps, value = the denoised
            estimate at v, re-noised to sigma_v with the query's own noise estimate,
            so a KB serves queries with any seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .blend import blend, lstsq_weights
from .kb_access import KEY_SPACES, KBError, KBView
from .noise_levels import NoiseLevels

# The quality guard's defaults, calibrated on the demo model (scripts/sampler_support.py --calibrate,
# docs/how_redi_works.md); each 0 disables its check.
# Good retrievals measured: latent keys (KB's seed) distance <= 0.52, |sum w - 1| <= 0.10; denoised keys
# (new seeds) distance <= 1.22, residual <= 0.99, |sum w - 1| <= 0.75 (PSNR 26-40 dB to the full run).
# Failures of issue 15: w = +5.1..+7.4 (UniPC), +159 (zsnr), distance 1.67-1.96 (deis). The residual
# (<= 1 by construction) does not separate them, so its check is off by default.
GUARD_DEFAULTS = {"max_key_distance": 1.5, "max_residual": 0.0, "max_weight_deviation": 2.0}
# The per-image predictor for latent keys (the KB's seed, where the shared noise dominates the key):
# the distance between the query's denoised estimate at k and the blend of its neighbours' (see
# docs/how_redi_works.md for its calibration). Not a node input: it follows max_key_distance's switch.
MAX_DENOISED_DISTANCE = 0.0
# The per-image landing check (on by default): after the jump, the finish's first denoised estimate must
# still show the picture the query's own estimate at k showed (landing_disagreements <= this), else the
# item restarts from k. Calibrated on 1,536 measured items at 96 queries per regime
# (scripts/sampler_support.py --arrays, docs/how_redi_works.md): at 0.6, euler/normal gives up 7 of 95
# good retrievals at the KB's seed and 1 of 96 at new seeds, and catches its failure. Not a node input:
# it follows max_key_distance's switch.
MAX_LANDING = 0.6


@dataclass(frozen=True)
class ReDiParams:
    key_step: int
    value_step: int
    neighbours: int = 1
    key_space: str = "latent"
    max_key_distance: float = GUARD_DEFAULTS["max_key_distance"]  # relative ||y - nearest|| / ||y||
    max_residual: float = GUARD_DEFAULTS["max_residual"]  # relative least-squares residual
    max_weight_deviation: float = GUARD_DEFAULTS["max_weight_deviation"]  # |sum of blend weights - 1|
    max_denoised_distance: float = MAX_DENOISED_DISTANCE  # latent keys: relative ||denoised - blend of neighbours' denoised||
    max_landing: float = MAX_LANDING  # the finish's first estimate vs the query's estimate at k (landing_disagreements)

    @property
    def landing_on(self) -> bool:
        """Whether the finish of jumped items checks where they landed (the guard's switch turns it off too)."""
        return self.max_key_distance > 0 and self.max_landing > 0

    def validate(self, steps: int, kb: KBView | None = None) -> None:
        k, v = self.key_step, self.value_step
        if not 1 <= k < v <= steps:
            raise KBError(f"need 1 <= key step ({k}) < value step ({v}) <= steps ({steps}); lower the key step or raise the value step")
        for name in ("max_key_distance", "max_residual", "max_weight_deviation", "max_denoised_distance", "max_landing"):
            if getattr(self, name) < 0:
                raise KBError(f"{name} must be 0 (off) or positive, not {getattr(self, name)}")
        if self.neighbours < 1:
            raise KBError(f"neighbours must be at least 1, not {self.neighbours}")
        if self.key_space not in KEY_SPACES:
            raise KBError(f"key space must be one of {KEY_SPACES}, not {self.key_space!r}")
        if kb is not None:
            kb.require_step(k, "key")
            kb.require_step(v, "value")


@dataclass(frozen=True)
class KeyState:
    """The key phase's result for a batch (all arrays B x C x H x W, model space)."""

    x: np.ndarray  # latent after k steps
    denoised: np.ndarray  # denoised estimate of the last evaluated step
    eps: np.ndarray  # the query's own noise estimate, (x_prev - denoised) / sigma_prev

    @classmethod
    def after_key_phase(cls, x: np.ndarray, x_prev: np.ndarray, denoised_prev: np.ndarray, sigma_prev: float) -> KeyState:
        """From the latent after k steps and the last evaluated step (its input, estimate and sigma)."""
        return cls(x, denoised_prev, (x_prev - denoised_prev) / max(float(sigma_prev), 1e-8))


@dataclass
class ItemReport:
    accepted: bool
    neighbours: list[int] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    distances: list[float] = field(default_factory=list)  # relative to the query's norm
    weights: list[float] = field(default_factory=list)
    residual: float = 0.0
    denoised_distance: float | None = None  # latent keys: relative distance of the denoised estimates at k
    landing: float | None = None  # the landing check's value, once the finish has evaluated the jump
    reason: str = ""


@dataclass
class Retrieval:
    x_v: np.ndarray  # B x C x H x W start latents for accepted items (rows of rejected items are unused)
    accepted: np.ndarray  # B bools
    reports: list[ItemReport]
    noise_note: str | None = None  # how the schedule's noise levels tightened the guard, for the report

    def hold(self, reason: str) -> None:
        """Every item sampled in full from the key step, for one reason (an unverified pair)."""
        self.accepted[:] = False
        for rep in self.reports:
            rep.accepted, rep.reason = False, reason

    def reject_landing(self, rows: np.ndarray, values: np.ndarray, params: ReDiParams) -> None:
        """Items whose jump landed on another picture: the finish restarts them from the key step."""
        for b, value in zip(rows, values):
            rep = self.reports[int(b)]
            rep.accepted, rep.landing = False, float(value)
            rep.reason = (f"the jump to step {params.value_step} landed on another picture (landing check "
                          f"{value:.3f} > max {params.max_landing:.2f})")
            self.accepted[int(b)] = False

    def note_landing(self, rows: np.ndarray, values: np.ndarray) -> None:
        for b, value in zip(rows, values):
            self.reports[int(b)].landing = float(value)

    def starts(self, state: KeyState, params: ReDiParams):
        """(start step, item indices, their start latents) for the finish phase: accepted items
        continue from the value step with the blend, rejected ones from the key step."""
        for start, mask, src in ((params.value_step, self.accepted, self.x_v), (params.key_step, ~self.accepted, state.x)):
            idx = np.flatnonzero(mask)
            if len(idx):
                yield start, idx, src[idx]


def retrieve(kb: KBView, state: KeyState, params: ReDiParams, sigma_v: float, noise: NoiseLevels | None = None) -> Retrieval:
    """Find each item's neighbours at the key step and blend their values at the value step.

    With `noise` (the schedule's noise ratios at k and v) the guard also refuses neighbours the
    finish cannot correct (noise_levels.py); the guard's switch (max_key_distance 0) turns that off too."""
    params.validate(kb.fingerprint.steps, kb)
    if state.x.shape[1:] != tuple(kb.fingerprint.latent_shape):
        raise KBError(
            f"latent shape {tuple(state.x.shape[1:])} does not match KB {kb.name} ({tuple(kb.fingerprint.latent_shape)}); "
            "use the KB's width/height or build a KB at this size"
        )
    k, v, space = params.key_step, params.value_step, params.key_space
    if params.max_key_distance <= 0:
        noise = None  # the guard's distance switch turns its noise-level check off too
    queries = (state.x if space == "latent" else state.denoised).reshape(len(state.x), -1).astype(np.float32)
    # reduced-key search, exact re-rank on full keys read from the shards (only candidates)
    dist, ids = kb.search(space, k, queries, params.neighbours)
    x_v = np.zeros_like(state.x, dtype=np.float32)
    accepted = np.zeros(len(queries), dtype=bool)
    reports = []
    for b, q in enumerate(queries):
        nb = ids[b][ids[b] >= 0]
        qn = max(float(np.linalg.norm(q)), 1e-12)
        rel = [float(d) / qn for d in dist[b][: len(nb)]]
        w, resid = lstsq_weights(kb.full_keys(space, k, nb), q)
        rep = ItemReport(
            accepted=True, neighbours=nb.tolist(), prompts=[kb.entries[i].prompt for i in nb],
            distances=rel, weights=w.tolist(), residual=resid,
        )
        if space == "latent":
            rep.denoised_distance = denoised_distance(kb.full_keys("denoised", k, nb), w, state.denoised[b])
        low_noise = noise.rejection(space, rel[0], v) if noise is not None else None
        if params.max_key_distance > 0 and rel[0] > params.max_key_distance:
            rep.accepted, rep.reason = False, f"nearest key at {rel[0]:.3f} > max {params.max_key_distance:.3f}"
        elif low_noise:
            rep.accepted, rep.reason = False, low_noise
        elif params.max_residual > 0 and resid > params.max_residual:
            rep.accepted, rep.reason = False, f"blend residual {resid:.3f} > max {params.max_residual:.3f}"
        elif params.max_weight_deviation > 0 and abs(float(np.sum(w)) - 1.0) > params.max_weight_deviation:
            rep.accepted, rep.reason = False, f"blend weights sum to {float(np.sum(w)):+.3f}, more than {params.max_weight_deviation:.2f} from 1"
        elif (params.max_key_distance > 0 and params.max_denoised_distance > 0 and rep.denoised_distance is not None
              and rep.denoised_distance > params.max_denoised_distance):
            rep.accepted, rep.reason = False, (f"denoised estimates at step {k} differ: {rep.denoised_distance:.3f} > max "
                                               f"{params.max_denoised_distance:.3f} (the neighbours' content is another)")
        if rep.accepted:
            value = blend(kb.values(space, v, nb), w)
            if space == "denoised":
                value = value + np.float32(sigma_v) * state.eps[b].astype(np.float32)
            x_v[b] = value
            accepted[b] = True
        reports.append(rep)
    return Retrieval(x_v, accepted, reports, noise.summary(space) if noise is not None else None)


def signatures_match(a: str, b: str, tol: float = 2e-3) -> bool:
    """Compare two conditioning signatures ("SHAPE:v1,v2,...;rms", see comfy_adapter/identity.py):
    same shape and every value within `tol` (encoder float noise, not another prompt)."""
    if a == b:
        return True
    try:
        shape_a, vals_a = a.split(":", 1)
        shape_b, vals_b = b.split(":", 1)
        va = [float(v) for v in vals_a.replace(";", ",").split(",")]
        vb = [float(v) for v in vals_b.replace(";", ",").split(",")]
    except ValueError:
        return False
    return shape_a == shape_b and len(va) == len(vb) and all(abs(x - y) <= tol for x, y in zip(va, vb))


def denoised_distance(neighbour_denoised: np.ndarray, weights: np.ndarray, query_denoised: np.ndarray) -> float:
    """Relative distance between the query's denoised estimate and the blend of its neighbours'
    (same weights as the values): small when the neighbours show the same content as the query."""
    q = query_denoised.reshape(-1).astype(np.float32)
    pred = blend(neighbour_denoised.reshape(len(neighbour_denoised), -1), np.asarray(weights, dtype=np.float32))
    return float(np.linalg.norm(q - pred) / max(float(np.linalg.norm(q)), 1e-12))


def landing_disagreements(denoised_after_jump: np.ndarray, query_denoised: np.ndarray) -> np.ndarray:
    """Per item (B x C x H x W each): 1 - the correlation between the model's denoised estimate on the
    blended value (the finish's first evaluation, under the query's own conditioning) and the query's
    denoised estimate at the key step. Near 0 when the jump lands on the picture the query was heading
    for; large when it lands on another one (an object moved, another background)."""
    a = denoised_after_jump.reshape(len(denoised_after_jump), -1).astype(np.float64)
    q = query_denoised.reshape(len(query_denoised), -1).astype(np.float64)
    a = a - a.mean(axis=1, keepdims=True)
    q = q - q.mean(axis=1, keepdims=True)
    norms = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(q, axis=1), 1e-12)
    return 1.0 - (a * q).sum(axis=1) / norms


def guard_line(params: ReDiParams) -> str:
    checks = [f"{name} {value:g}" for name, value in (("distance", params.max_key_distance), ("residual", params.max_residual),
                                                      ("|sum w - 1|", params.max_weight_deviation)) if value > 0]
    if params.landing_on:
        checks.append(f"landing {params.max_landing:g}")
    return "guard: " + (", ".join(f"max {c}" for c in checks) if checks else "OFF (every item takes its neighbours)")


def summary_lines(ret: Retrieval, params: ReDiParams, steps: int) -> list[str]:
    """Human-readable report for the node's UI."""
    skipped = params.value_step - params.key_step
    rejected = int((~ret.accepted).sum())
    lines = [f"ReDi: key step {params.key_step}, value step {params.value_step}, {params.key_space} keys, H={params.neighbours}",
             guard_line(params)]
    if ret.noise_note:
        lines.append(ret.noise_note)
    if rejected:
        lines.append(f"guard: {rejected} of {len(ret.accepted)} items sampled in full from step {params.key_step} (no steps skipped)")
    for b, r in enumerate(ret.reports):
        head = f"[{b}] " + (f"skipped {skipped} of {steps} steps" if r.accepted else f"full sampling from step {params.key_step}, guard: {r.reason}")
        lines.append(head)
        for p, d, w in zip(r.prompts, r.distances, r.weights):
            lines.append(f"    w={w:+.3f} dist={d:.3f}  {p[:80]}")
        lines.append(f"    residual {r.residual:.3f}" + (f", denoised distance {r.denoised_distance:.3f}" if r.denoised_distance is not None else "")
                     + (f", landing {r.landing:.3f}" if r.landing is not None else ""))
    return lines
