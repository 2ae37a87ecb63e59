"""ReDi's sampling phases on ComfyUI's stock samplers (used by the KB Builder,
the ReDi KSampler, the ReDi Sampler and the headless `kb_tools build`).

All latents handed to kb_tools are the sampler's own state x (the model's internal
space, noise included), the same for every sampler:

- x after s steps is read from the model evaluation that precedes the sampler's
  step-s callback (the callback's own `x` is stale in ipndm, ipndm_v and deis, and
  scaled by 1/sqrt(1+sigma^2) in ComfyUI's UniPC), except for UniPC, whose corrected
  x is never evaluated: there the callback's x is scaled back.
- The key phase of a sampler whose first k steps depend on the whole schedule
  (UniPC's final-order logic, the SDE samplers' Brownian tree over the schedule's
  sigma range, ...) runs the FULL schedule and stops at step k, so the key is the
  point of the trajectory the KB stored. Samplers measured slice-exact run only
  sigmas[:k+1] (no extra UNet call).
"""

from __future__ import annotations

import math

import comfy.model_management
import comfy.sample
import comfy.samplers
import latent_preview
import numpy as np
import torch

from ..redi_core import noise_levels
from ..redi_core.retrieval import KeyState
from .noise import NoisePlan
from .samplers import VP_CALLBACK, check_sampler, model_kind, stop_step_for


def noise_levels_of(model, sigmas: torch.Tensor, key_step: int, value_step: int) -> noise_levels.NoiseLevels:
    """The schedule's noise ratios at the key and value steps, for the quality guard."""
    return noise_levels.NoiseLevels.of(sigmas.float().cpu().tolist(), key_step, value_step, model_kind(model) == "flow")


def ksampler_sigmas(model, sampler: str, scheduler: str, steps: int) -> torch.Tensor:
    """The sigmas the stock KSampler uses (dpm_2 and UniPC drop the penultimate sigma of a steps+1 schedule)."""
    return comfy.samplers.KSampler(model, steps=steps, device="cpu", sampler=sampler, scheduler=scheduler, denoise=1.0).sigmas.cpu()


_SCHEDULER_CACHE: dict[tuple, str | None] = {}


def _number(value) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):  # a model sampling's attribute that is not a number: not part of the key
        return None


def scheduler_of(model, sampler: str, sigmas: torch.Tensor) -> str | None:
    """The stock scheduler whose schedule (for this model, sampler and step count) equals `sigmas`;
    None for a schedule no stock scheduler makes (a custom sigmas node, denoise below 1, ...).
    Cached per model sampling, sampler and schedule: every recorded run asks (ReDi Record)."""
    steps, got = len(sigmas) - 1, sigmas.float().cpu()
    ms = model.get_model_object("model_sampling")
    table = getattr(ms, "sigmas", None)  # a discrete model's whole noise table (zsnr, other betas)
    key = (type(ms).__qualname__, *(_number(getattr(ms, a, None)) for a in ("sigma_min", "sigma_max", "shift", "multiplier")),
           None if not torch.is_tensor(table) else table.float().cpu().numpy().tobytes(), sampler, got.numpy().tobytes())
    if key in _SCHEDULER_CACHE:
        return _SCHEDULER_CACHE[key]
    found = None
    for name in comfy.samplers.SCHEDULER_NAMES:
        try:
            ref = ksampler_sigmas(model, sampler, name, steps)
        except Exception:  # a scheduler that cannot make this schedule (too few steps, ...): not this one
            continue
        if ref.shape == got.shape and torch.allclose(got, ref.float(), rtol=1e-4, atol=1e-5):
            found = name
            break
    if len(_SCHEDULER_CACHE) >= 64:
        _SCHEDULER_CACHE.pop(next(iter(_SCHEDULER_CACHE)))
    _SCHEDULER_CACHE[key] = found
    return found


def sigmas_for(model, scheduler: str, steps: int) -> torch.Tensor:
    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps).cpu()


class _Stop(Exception):
    """Raised by the recording callback to end a full-schedule run at the key step."""


class _RecordingModel:
    """Stands in for the guider inside a sampler: remembers the input of the last model evaluation."""

    def __init__(self, inner) -> None:
        self._inner = inner
        self.last_x: torch.Tensor | None = None

    def __call__(self, x, sigma, **kwargs):
        self.last_x = x
        return self._inner(x, sigma, **kwargs)

    def __getattr__(self, name):
        return getattr(self._inner, name)


class Capture(comfy.samplers.Sampler):
    """A stock sampler that records x and the denoised estimate after each step (model space)
    and can stop at a step. `offset` is the index of sigmas[0] in the whole schedule."""

    def __init__(self, name: str, offset: int = 0, stop_at: int | None = None, record: bool = True,
                 noise: NoisePlan | None = None, rows: np.ndarray | None = None, landing=None) -> None:
        self.name = name
        self.landing = landing  # landing.landing_guard: checks the first step's denoised estimate (may raise)
        self.landed: np.ndarray | None = None  # its values, once checked
        self.inner = comfy.samplers.sampler_object(name)
        self.offset, self.stop_at, self.record = offset, stop_at, record
        self.noise, self.rows = noise, rows  # the noise plan of the run and the batch rows of this phase
        self.xs: dict[int, torch.Tensor] = {}
        self.ds: dict[int, torch.Tensor] = {}

    def max_denoise(self, model_wrap, sigmas):
        return self.inner.max_denoise(model_wrap, sigmas)

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None, disable_pbar=False):
        if self.rows is None or self.noise is None:
            return self._sample(model_wrap, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar)
        # a sub-batch gets its own rows of a per-item conditioning (ComfyUI would give it the first rows)
        conds = model_wrap.conds
        model_wrap.conds = processed_conds_rows(conds, self.rows, self.noise.batch)
        try:
            return self._sample(model_wrap, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar)
        finally:
            model_wrap.conds = conds

    def _sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar):
        proxy = _RecordingModel(model_wrap)
        ms = model_wrap.inner_model.model_sampling
        inner = self.inner
        if self.noise is not None and self.noise.active:
            counting = self.offset == 0
            if counting:
                self.noise.draws, self.noise.key_steps = 0, (self.stop_at or len(sigmas) - 1)
            ns = self.noise.make(noise, self.rows, self.offset, count=counting)
            inner = comfy.samplers.ksampler(self.name, {"noise_sampler": ns})

        def cb(i, x0, x, total):
            step = i + self.offset
            if i == 0 and self.landing is not None:
                self.landed = self.landing(x0.detach().float().cpu().numpy())
            if self.record:
                if self.name in VP_CALLBACK:
                    state = x * math.sqrt(1.0 + float(sigmas[i]) ** 2)
                else:
                    state = proxy.last_x if proxy.last_x is not None else x
                self.xs[step] = state.detach().float().cpu().clone()
                self.ds[step] = x0.detach().float().cpu().clone()
            if callback is not None:
                callback(i, x0, x, total)
            if self.stop_at is not None and step == self.stop_at:
                raise _Stop

        try:
            out = inner.sample(proxy, sigmas, extra_args, cb, noise, latent_image, denoise_mask, disable_pbar)
        except _Stop:
            # returned like a run that ended at sigma_k (inverse_noise_scaling as KSAMPLER does)
            return ms.inverse_noise_scaling(sigmas[self.stop_at - self.offset], self.xs[self.stop_at].to(noise))
        end = self.offset + len(sigmas) - 1
        if self.record:
            self.xs[end] = ms.noise_scaling(sigmas[-1], torch.zeros_like(out), out).detach().float().cpu()
        return out


def _item_rows(t, rows: np.ndarray, batch: int):
    if torch.is_tensor(t) and batch > 1 and t.ndim > 0 and t.shape[0] == batch:
        return t[torch.as_tensor(rows, dtype=torch.long, device=t.device)]
    return t


def _cond_rows(c, rows: np.ndarray, batch: int):
    """A comfy.conds object for batch rows `rows`: itself when nothing is per item."""
    t = getattr(c, "cond", None)
    sliced = _item_rows(t, rows, batch)
    return c if sliced is t else c._copy_with(sliced)


def processed_conds_rows(conds: dict, rows: np.ndarray, batch: int) -> dict:
    """The conditionings a CFGGuider has processed (model_wrap.conds) for batch rows `rows` of a batch
    of `batch` items. A conditioning with one entry per item (a tensor whose first size is the batch)
    is sliced to those rows: ComfyUI would otherwise give a sub-batch of m items the first m entries,
    the wrong prompts. One shared by the whole batch (size 1, the usual case) is kept as it is."""
    out = {}
    for name, entries in conds.items():
        out[name] = []
        for entry in entries:
            entry = {k: _item_rows(v, rows, batch) for k, v in entry.items()}  # e.g. a per-item area mask
            if isinstance(entry.get("model_conds"), dict):
                entry["model_conds"] = {k: _cond_rows(c, rows, batch) for k, c in entry["model_conds"].items()}
            out[name].append(entry)
    return out


def key_state(cap: Capture, k: int, sigmas: torch.Tensor) -> KeyState:
    return KeyState.after_key_phase(cap.xs[k].numpy(), cap.xs[k - 1].numpy(), cap.ds[k - 1].numpy(), float(sigmas[k - 1]))


def to_latent_image(model_sampling, sigma: float, x_model: torch.Tensor) -> torch.Tensor:
    """The latent a sampler started at `sigma` with zero noise must be given to continue from state x."""
    return model_sampling.inverse_noise_scaling(torch.tensor(float(sigma)), x_model)


class Phases:
    """The stock sampler split at arbitrary steps, for one ComfyUI model and settings."""

    def __init__(self, model, steps: int, cfg: float, sampler: str, scheduler: str, negative, preview: bool = True):
        check_sampler(sampler)
        self.model, self.steps, self.cfg, self.sampler, self.scheduler, self.negative = model, steps, cfg, sampler, scheduler, negative
        self.latent_format = model.get_model_object("latent_format")
        self.model_sampling = model.get_model_object("model_sampling")
        self.sigmas = ksampler_sigmas(model, sampler, scheduler, steps)
        self.preview = latent_preview.prepare_callback(model, steps) if preview else None
        self.noise_plan: NoisePlan | None = None
        self.key_capture: Capture | None = None  # the last key phase's states (x after every step up to k)
        self.last_finish: Capture | None = None  # the last finish's sampler (its landing values)

    def to_out(self, t: torch.Tensor) -> torch.Tensor:
        return self.latent_format.process_out(t)

    def _run(self, cap: Capture, positive, latent: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor, seed: int):
        preview = None
        if self.preview is not None:
            preview = lambda i, x0, x, _total: self.preview(i + cap.offset, x0, x, self.steps)  # noqa: E731
        return comfy.samplers.sample(self.model, noise, positive, self.negative, self.cfg, self.model.load_device, cap, sigmas,
                                     model_options=self.model.model_options, latent_image=latent, callback=preview,
                                     disable_pbar=True, seed=seed)

    def trajectory(self, positive, latent: torch.Tensor, noise: torch.Tensor, seeds: list[int], stored: tuple[int, ...]):
        """Full run of a batch whose item b is sampled as a batch of one with seeds[b] (initial and
        per-step noise); returns {s: x after s steps} and {s: denoised at step s-1}, as numpy."""
        cap = Capture(self.sampler, noise=NoisePlan(self.sampler, self.sigmas, seeds[0], len(seeds), seeds))
        self._run(cap, positive, latent, noise, self.sigmas, seeds[0])
        return ({s: cap.xs[s].numpy() for s in stored}, {s: cap.ds[s - 1].numpy() for s in stored})

    def key_phase(self, positive, latent: torch.Tensor, noise: torch.Tensor, seed: int, k: int,
                  item_seeds: list[int] | None = None) -> KeyState:
        """The first k steps, on the trajectory a full run takes; `noise` as comfy.sample.prepare_noise makes it
        (`item_seeds`: each item's noise as a batch of one with its seed, as `trajectory` does)."""
        stop = stop_step_for(self.sampler, k)
        self.noise_plan = NoisePlan(self.sampler, self.sigmas, seed, latent.shape[0], item_seeds)
        cap = Capture(self.sampler, stop_at=stop, noise=self.noise_plan)
        self._run(cap, positive, latent, noise, self.sigmas if stop else self.sigmas[: k + 1], seed)
        self.key_capture = cap
        return key_state(cap, k, self.sigmas)

    def finish(self, positive, x_model: np.ndarray, start: int, seed: int, rows: np.ndarray | None = None,
               record: Capture | None = None, landing=None) -> torch.Tensor:
        """Sample the batch rows `rows` (all: None) of the last key phase from `start` to the end, on the
        full run's noise; input is the sampler state x, output in ComfyUI's latent space. `record`: a
        Capture made by `finish_capture` that keeps the states of every step (no extra model call).
        `landing`: the guard's check of the first step (landing.landing_guard; raises LandingRejected)."""
        cap = record or Capture(self.sampler, offset=start, record=False, noise=self.noise_plan, rows=rows)
        cap.landing = landing
        self.last_finish = cap
        x = to_latent_image(self.model_sampling, float(self.sigmas[start]), torch.from_numpy(np.ascontiguousarray(x_model)))
        x = self.to_out(x)
        return self._run(cap, positive, x, torch.zeros_like(x), self.sigmas[start:], seed)

    def finish_capture(self, start: int, rows: np.ndarray | None = None) -> Capture:
        """A finish that records x and the denoised estimate of every step from `start` on."""
        return Capture(self.sampler, offset=start, record=True, noise=self.noise_plan, rows=rows)

    def full(self, positive, latent: torch.Tensor, noise: torch.Tensor, seed: int, item_seeds: list[int] | None = None) -> torch.Tensor:
        """The stock KSampler's run (each item as a batch of one with `item_seeds`), for benchmarks."""
        plan = NoisePlan(self.sampler, self.sigmas, seed, latent.shape[0], item_seeds) if item_seeds else None
        return self._run(Capture(self.sampler, record=False, noise=plan), positive, latent, noise, self.sigmas, seed)


def check_interrupt() -> None:
    comfy.model_management.throw_exception_if_processing_interrupted()
