"""FRDiff: feature reuse between keyframe steps, plus score mixing (arXiv 2312.03517).

At keyframe steps the UNet runs in full and caches, per block, the output of each
ResBlock's first convolution path and each spatial transformer's inner path (for DiT
models: what each transformer block adds to its streams). On the
steps between, those blocks return the cached tensors (a transformer adds its current
residual input), and the network's score is mixed with the last keyframe's full score:

    eps = lambda(r) * eps_reuse + (1 - lambda(r)) * eps_keyframe,
    lambda(r) = clip((slope * (r - bias) + 2) / 4, 0, 1),   r = sampling progress in [0, 1].

Where lambda is 0 ("Jump"), the network is not run at all. Pure torch: no ComfyUI import.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


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


def keyframe_schedule(total_steps: int, interval: int, start_percent: float = 0.0, end_percent: float = 1.0) -> list[bool]:
    """Keyframe flags of a run of `total_steps` uniform steps (progress r = step / total)."""
    return [is_keyframe(i, interval, i / total_steps, start_percent, end_percent) for i in range(total_steps)]


@dataclass
class FRDiffConfig:
    interval: int = 2
    start_percent: float = 0.0
    end_percent: float = 1.0
    score_mixing: bool = True
    mix_bias: float = 0.5
    mix_slope: float = 30.0

    @property
    def neutral(self) -> bool:
        return self.interval <= 1


@dataclass
class FRDiffState:
    """Per-model runtime state: the current step's mode and the caches.

    `mode` is "key" (run in full and cache), "reuse" (run with cached blocks) or
    "jump" (return the last keyframe score, no network call)."""

    config: FRDiffConfig
    mode: str = "key"
    lam: float = 1.0
    call_key: tuple = ()
    blocks: dict = field(default_factory=dict)  # (slot, call_key) -> tensor, or dict of tensors (DiT streams)
    scores: dict = field(default_factory=dict)  # call_key -> last keyframe score
    computed: dict = field(default_factory=dict)  # block kind -> full computations
    skipped: dict = field(default_factory=dict)  # block kind -> reuses
    calls: dict = field(default_factory=lambda: {"key": 0, "reuse": 0, "jump": 0})

    def drop_caches(self) -> None:
        """Free the cached block outputs and scores (the call and reuse counts stay readable)."""
        self.blocks.clear()
        self.scores.clear()

    def reset(self) -> None:
        self.drop_caches()
        self.mode, self.lam = "key", 1.0
        for d in (self.computed, self.skipped):
            d.clear()
        self.calls = {"key": 0, "reuse": 0, "jump": 0}

    def begin_call(self, step: int, r: float, call_key: tuple) -> str:
        """Decide this network call's mode from its step index and progress r."""
        cfg = self.config
        self.call_key = call_key
        if is_keyframe(step, cfg.interval, r, cfg.start_percent, cfg.end_percent) or call_key not in self.scores:
            self.mode, self.lam = "key", 1.0
        else:
            self.lam = mix_lambda(r, cfg.mix_bias, cfg.mix_slope) if cfg.score_mixing else 1.0
            self.mode = "jump" if self.lam <= 0.0 else "reuse"
        self.calls[self.mode] += 1
        return self.mode

    def end_call(self, out: torch.Tensor) -> torch.Tensor:
        """Record a keyframe score, or mix a reuse score with the last keyframe's."""
        if self.mode == "key":
            self.scores[self.call_key] = out.detach()
            return out
        if self.lam < 1.0:
            return self.lam * out + (1.0 - self.lam) * self.scores[self.call_key]
        return out

    def cached(self, kind: str, slot: str, x: torch.Tensor, compute, to_cache=None, from_cache=None):
        """Run `compute()` at keyframes, caching `to_cache(out)`; on reuse steps return
        `from_cache(cached)` instead. A cache of another batch, dtype or device is not used."""
        key = (slot, self.call_key)
        hit = self.blocks.get(key)
        ref = next(iter(hit.values())) if isinstance(hit, dict) else hit
        if self.mode == "reuse" and ref is not None and ref.shape[0] == x.shape[0] and ref.device == x.device and ref.dtype == x.dtype:
            self.skipped[kind] = self.skipped.get(kind, 0) + 1
            return from_cache(hit) if from_cache else hit
        out = compute()
        self.computed[kind] = self.computed.get(kind, 0) + 1
        if self.mode == "key":
            keep = to_cache(out) if to_cache else out
            self.blocks[key] = {k: v.detach() for k, v in keep.items()} if isinstance(keep, dict) else keep.detach()
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

    def __call__(self, args: dict, extra: dict) -> dict:
        compute = (lambda: self.inner(args, extra)) if self.inner else (lambda: extra["original_block"](args))
        return self.state.cached(
            "dit", self.slot, args["img"], compute,
            to_cache=lambda out: {k: v - args[k] for k, v in out.items()},
            from_cache=lambda c: {k: args[k] + v for k, v in c.items()},
        )
