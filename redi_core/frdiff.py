"""FRDiff: feature reuse between keyframe steps, plus score mixing (arXiv 2312.03517),
with feature forecasting (TaylorSeer-style finite differences) and keyframe schedules.

At keyframe steps the UNet runs in full and caches, per block, the output of each
ResBlock's first convolution path and each spatial transformer's inner path (for DiT
models: what each transformer block adds to its streams). On the
steps between, those blocks return the cached tensors (a transformer adds its current
residual input), and the network's score is mixed with the last keyframe's full score:

    eps = lambda(r) * eps_reuse + (1 - lambda(r)) * eps_keyframe,
    lambda(r) = clip((slope * (r - bias) + 2) / 4, 0, 1),   r = sampling progress in [0, 1].

Where lambda is 0 ("Jump"), the network is not run at all.

With `order` 1 or 2 a cached tensor is not copied but extrapolated from the last 2 or 3
keyframes (Lagrange/Newton finite differences in the progress r, as TaylorSeer forecasts
features); the keyframe score used by the mixing is extrapolated the same way.

Schedules decide which steps are keyframes: "fixed" (every `interval`-th step),
"ramp" (dense early, the gap between keyframes grows from 1 to `interval` over the
reuse window) and "adaptive" (a keyframe when the model input has moved more than
`threshold` relative to the last keyframe's, and at least every `interval` steps).
Pure torch: no ComfyUI import.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

SCHEDULES = ("fixed", "ramp", "adaptive")


def mix_lambda(r: float, bias: float = 0.5, slope: float = 30.0) -> float:
    """FRDiff's hard sigmoid: 0 early (reduced NFE keeps low frequencies), 1 late (reuse keeps detail)."""
    return float(min(1.0, max(0.0, (slope * (r - bias) + 2.0) / 4.0)))


def step_index(sample_sigmas: torch.Tensor | None, sigma: float) -> int:
    """The index of the sampling step that evaluates the model at `sigma`: how many of the
    run's sigmas lie above it (0 for the first step; 0 when the run's sigmas are unknown)."""
    if sample_sigmas is None:
        return 0
    return int((sample_sigmas.float() > float(sigma) * (1.0 + 1e-5)).sum().item())


def is_keyframe(step: int, interval: int, r: float, start_percent: float, end_percent: float) -> bool:
    """Step `step` of a run is a keyframe unless it lies in [start, end] and off the interval grid."""
    if interval <= 1 or not (start_percent <= r <= end_percent):
        return True
    return step % interval == 0


def ramp_gap(r: float, interval: int, start_percent: float, end_percent: float) -> int:
    """The "ramp" schedule's keyframe gap at progress r: 1 at start_percent, growing
    linearly to `interval` at end_percent (dense keyframes at the high-noise steps)."""
    span = max(end_percent - start_percent, 1e-8)
    frac = min(1.0, max(0.0, (r - start_percent) / span))
    return max(1, min(interval, 1 + int(round((interval - 1) * frac))))


def keyframe_schedule(total_steps: int, interval: int, start_percent: float = 0.0, end_percent: float = 1.0,
                      schedule: str = "fixed") -> list[bool]:
    """Keyframe flags of a run of `total_steps` uniform steps (progress r = step / total)
    for the input-independent schedules ("fixed", "ramp")."""
    if schedule == "fixed":
        return [is_keyframe(i, interval, i / total_steps, start_percent, end_percent) for i in range(total_steps)]
    flags, last = [], None
    for i in range(total_steps):
        r = i / total_steps
        key = last is None or interval <= 1 or not (start_percent <= r <= end_percent) or i - last >= ramp_gap(r, interval, start_percent, end_percent)
        last = i if key else last
        flags.append(key)
    return flags


def extrapolation_weights(nodes: list[float], at: float) -> list[float]:
    """Lagrange weights w_i with sum_i w_i f(nodes_i) = p(at), p the polynomial through the
    points (degree len(nodes) - 1): 1 node copies, 2 extrapolate linearly, 3 quadratically.
    The nodes must be distinct."""
    w = []
    for i, ni in enumerate(nodes):
        wi = 1.0
        for j, nj in enumerate(nodes):
            if j != i:
                wi *= (at - nj) / (ni - nj)
        w.append(wi)
    return w


def forecast(history: list[tuple[float, object]], at: float):
    """Extrapolate a cached value (a tensor or a dict of tensors) from its keyframe history
    [(r, value), ...] (oldest first) to progress `at`."""
    if len(history) == 1:
        return history[-1][1]
    w = extrapolation_weights([r for r, _ in history], at)
    last = history[-1][1]
    if isinstance(last, dict):
        return {k: _combine([v[k] for _, v in history], w) for k in last}
    return _combine([v for _, v in history], w)


def _combine(values: list[torch.Tensor], w: list[float]) -> torch.Tensor:
    out = values[-1] * w[-1]
    for v, wi in zip(values[:-1], w[:-1]):
        if wi != 0.0:
            out.add_(v, alpha=wi)
    return out


@dataclass
class FRDiffConfig:
    interval: int = 2
    start_percent: float = 0.0
    end_percent: float = 1.0
    score_mixing: bool = True
    mix_bias: float = 0.5
    mix_slope: float = 30.0
    order: int = 0  # 0 copies the cached features; 1, 2 extrapolate them from the last 2, 3 keyframes
    schedule: str = "fixed"  # see SCHEDULES
    threshold: float = 0.15  # "adaptive": predicted relative change of the output that forces a keyframe

    @property
    def neutral(self) -> bool:
        return self.interval <= 1


def _mean_abs(t: torch.Tensor) -> float:
    return float(t.detach().float().abs().mean())


@dataclass
class FRDiffState:
    """Per-run state of one patched model: the current step's mode, the keyframe
    caches (histories for forecasting) and the counts of what was computed and reused.

    `mode` is "key" (run in full and cache), "reuse" (run with cached blocks) or
    "jump" (return the last keyframe score, no network call). `reset()` runs at the
    start of every sampling run, so nothing survives from one run to the next."""

    config: FRDiffConfig
    mode: str = "key"
    lam: float = 1.0
    r: float = 0.0
    call_key: tuple = ()
    blocks: dict = field(default_factory=dict)  # (slot, call_key) -> [(r, tensor or dict of tensors)], oldest first
    scores: dict = field(default_factory=dict)  # call_key -> [(r, keyframe score)], oldest first
    computed: dict = field(default_factory=dict)  # block kind -> full computations
    skipped: dict = field(default_factory=dict)  # block kind -> reuses
    slot_skips: dict = field(default_factory=dict)  # block slot -> reuses (for compute accounting)
    calls: dict = field(default_factory=lambda: {"key": 0, "reuse": 0, "jump": 0})
    decided: tuple | None = None  # (step, is_keyframe) of the step being sampled
    last_key_step: int | None = None
    refs: dict = field(default_factory=dict)  # call_key -> adaptive schedule's keyframe measurements
    pending_x: torch.Tensor | None = None  # the keyframe's input, until its output is known

    def drop_caches(self) -> None:
        """Free the cached block outputs and scores (the call and reuse counts stay readable)."""
        self.blocks.clear()
        self.scores.clear()
        self.refs.clear()

    def reset(self) -> None:
        self.drop_caches()
        self.mode, self.lam, self.r = "key", 1.0, 0.0
        for d in (self.computed, self.skipped, self.slot_skips):
            d.clear()
        self.calls = {"key": 0, "reuse": 0, "jump": 0}
        self.decided, self.last_key_step, self.pending_x = None, None, None

    def _history_len(self) -> int:
        return max(0, min(2, self.config.order)) + 1

    def _push(self, store: dict, key, value) -> None:
        hist = store.setdefault(key, [])
        if hist and abs(hist[-1][0] - self.r) < 1e-9:
            hist.pop()  # the same progress evaluated again: keep the newest
        hist.append((self.r, value))
        del hist[: -self._history_len()]

    def _predicted_change(self, call_key: tuple, x: torch.Tensor) -> float | None:
        """EasyCache's estimate of how far the output moved since the last keyframe: the
        input's change times the output/input change ratio measured between the last two
        keyframes, relative to the last keyframe's output. None until two keyframes exist."""
        ref = self.refs.get(call_key)
        if ref is None or ref.get("rate") is None or ref["x"].shape != x.shape:
            return None
        return ref["rate"] * _mean_abs(x - ref["x"]) / max(ref["out_norm"], 1e-8)

    def _step_is_keyframe(self, step: int, r: float, call_key: tuple, x: torch.Tensor | None) -> bool:
        cfg = self.config
        if cfg.interval <= 1 or not (cfg.start_percent <= r <= cfg.end_percent):
            return True
        if cfg.schedule == "ramp":
            return self.last_key_step is None or step - self.last_key_step >= ramp_gap(r, cfg.interval, cfg.start_percent, cfg.end_percent)
        if cfg.schedule == "adaptive":
            if self.last_key_step is None or step - self.last_key_step >= cfg.interval or x is None:
                return True
            change = self._predicted_change(call_key, x)
            return change is None or change > cfg.threshold
        return step % cfg.interval == 0

    def begin_call(self, step: int, r: float, call_key: tuple, x: torch.Tensor | None = None) -> str:
        """Decide this network call's mode from its step index, progress r and (for the
        adaptive schedule) the model input x. Every call of one step shares the decision."""
        cfg = self.config
        self.call_key, self.r = call_key, r
        if self.decided is None or self.decided[0] != step:
            key = self._step_is_keyframe(step, r, call_key, x)
            self.decided = (step, key)
            if key:
                self.last_key_step = step
        if self.decided[1] or call_key not in self.scores:
            self.mode, self.lam = "key", 1.0
            if cfg.schedule == "adaptive" and x is not None:
                self.pending_x = x.detach()
        else:
            self.lam = mix_lambda(r, cfg.mix_bias, cfg.mix_slope) if cfg.score_mixing else 1.0
            self.mode = "jump" if self.lam <= 0.0 else "reuse"
        self.calls[self.mode] += 1
        return self.mode

    def keyframe_score(self) -> torch.Tensor:
        """The last keyframe score of this call, forecast to the current progress (order > 0)."""
        hist = self.scores[self.call_key]
        return hist[-1][1] if len(hist) == 1 else forecast(hist, self.r)

    def end_call(self, out: torch.Tensor) -> torch.Tensor:
        """Record a keyframe score, or mix a reuse score with the last keyframe's."""
        if self.mode == "key":
            self._push(self.scores, self.call_key, out.detach())
            if self.pending_x is not None:
                self._record_ref(self.pending_x, out.detach())
                self.pending_x = None
            return out
        if self.lam < 1.0:
            return self.lam * out + (1.0 - self.lam) * self.keyframe_score()
        return out

    def _record_ref(self, x: torch.Tensor, out: torch.Tensor) -> None:
        old = self.refs.get(self.call_key)
        rate = None
        if old is not None and old["x"].shape == x.shape:
            dx = _mean_abs(x - old["x"])
            rate = _mean_abs(out - old["out"]) / dx if dx > 1e-12 else old.get("rate")
        self.refs[self.call_key] = {"x": x, "out": out, "out_norm": _mean_abs(out), "rate": rate}

    def cached(self, kind: str, slot: str, x: torch.Tensor, compute, to_cache=None, from_cache=None):
        """Run `compute()` at keyframes, caching `to_cache(out)`; on reuse steps return
        `from_cache(cached)` instead (forecast from the keyframe history when order > 0).
        A cache of another batch, dtype or device is not used."""
        key = (slot, self.call_key)
        hist = self.blocks.get(key)
        if self.mode == "reuse" and hist:
            last = hist[-1][1]
            ref = next(iter(last.values())) if isinstance(last, dict) else last
            if ref.shape[0] == x.shape[0] and ref.device == x.device and ref.dtype == x.dtype:
                self.skipped[kind] = self.skipped.get(kind, 0) + 1
                self.slot_skips[slot] = self.slot_skips.get(slot, 0) + 1
                hit = last if len(hist) == 1 else forecast(hist, self.r)
                return from_cache(hit) if from_cache else hit
        out = compute()
        self.computed[kind] = self.computed.get(kind, 0) + 1
        if self.mode == "key":
            keep = to_cache(out) if to_cache else out
            self._push(self.blocks, key, {k: v.detach() for k, v in keep.items()} if isinstance(keep, dict) else keep.detach())
        return out


class _Delegating(torch.nn.Module):
    """Stands in for a module at the same path: it registers the wrapped module's own
    children, parameters and buffers under their original names (the same objects), so
    a model patcher that walks named_modules() still moves them between devices and
    applies weight patches (LoRA) addressed by the original names."""

    def __init__(self, inner: torch.nn.Module, state: FRDiffState, slot: str) -> None:
        super().__init__()
        for name, child in inner.named_children():
            self.add_module(name, child)
        for name, param in inner.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buf in inner.named_buffers(recurse=False):
            self.register_buffer(name, buf)
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "_state", state)
        object.__setattr__(self, "_slot", slot)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_inner"), name)

    def __getitem__(self, idx):
        return object.__getattribute__(self, "_inner")[idx]


def unwrap(obj):
    """The module (or DiT replacement) a FeatureReuse wrapper stands in for; other objects unchanged."""
    while isinstance(obj, (_Delegating, CachedDiTBlock)):
        obj = object.__getattribute__(obj, "_inner") if isinstance(obj, _Delegating) else obj.inner
    return obj


class CachedFirstConv(_Delegating):
    """Stands in for a ResBlock's first convolution path (`in_layers`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._state.cached("resblock", self._slot, x, lambda: self._inner(x))


class CachedTransformer(_Delegating):
    """Stands in for a spatial transformer; `run` returns cached inner output + x on reuse steps."""

    def run(self, x: torch.Tensor, *args) -> torch.Tensor:
        return self._state.cached(
            "transformer", self._slot, x, lambda: self._inner(x, *args), to_cache=lambda out: out - x, from_cache=lambda c: c + x
        )

    def forward(self, x: torch.Tensor, *args) -> torch.Tensor:
        return self.run(x, *args)


class CachedDiTBlock:
    """A DiT block replacement (ComfyUI's "dit" patches_replace protocol: a callable taking
    the block's input dict and {"original_block": fn}, returning its output dict). At
    keyframes it runs the block and caches what the block added to each stream; on reuse
    steps it returns the current inputs plus those cached residuals. A replacement that
    another patch put on the same block runs inside it at keyframes."""

    def __init__(self, state: FRDiffState, slot: str, inner=None) -> None:
        self.state, self.slot, self.inner = state, slot, inner  # inner: a replacement patched in before us

    def __deepcopy__(self, memo: dict) -> CachedDiTBlock:
        # ModelPatcher.clone() deep-copies model_options, where this patch lives: a copy must keep the
        # one state that the sampling wrappers drive (a copied state never leaves keyframe mode)
        return CachedDiTBlock(self.state, self.slot, copy.deepcopy(self.inner, memo))

    def __call__(self, args: dict, extra: dict) -> dict:
        compute = (lambda: self.inner(args, extra)) if self.inner else (lambda: extra["original_block"](args))
        return self.state.cached(
            "dit", self.slot, args["img"], compute,
            to_cache=lambda out: {k: v - args[k] for k, v in out.items()},
            from_cache=lambda c: {k: args[k] + v for k, v in c.items()},
        )
