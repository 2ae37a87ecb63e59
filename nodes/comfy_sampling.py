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

import hashlib
import math

import comfy.k_diffusion.sampling as kds
import comfy.model_management
import comfy.sample
import comfy.samplers
import latent_preview
import numpy as np
import torch

from ..kb_tools.errors import KBError
from ..kb_tools.redi_loop import KeyState

# ComfyUI's UniPC reports x / sqrt(1 + sigma^2) after step i to its callback
VP_CALLBACK = frozenset({"uni_pc", "uni_pc_bh2"})
# samplers that pick their own time steps instead of the scheduler's: there is no step k to stop at
OWN_STEPS = frozenset({"dpm_fast", "dpm_adaptive"})
# samplers whose first k steps on sigmas[:k+1] equal the full run's first k steps
# (checked for every sampler by `scripts/sampler_support.py --check`)
SLICE_EXACT = frozenset({
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "dpm_2", "dpm_2_ancestral",
    "lms", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp", "dpmpp_2m", "dpmpp_2m_cfg_pp", "ddpm", "lcm", "ipndm",
    "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp", "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp",
    "gradient_estimation", "gradient_estimation_cfg_pp", "ddim",
})
# samplers that draw no noise after the initial noise (a batch's items are independent of each other)
DETERMINISTIC = frozenset({
    "euler", "euler_cfg_pp", "heun", "heunpp2", "dpm_2", "lms", "dpmpp_2m", "dpmpp_2m_cfg_pp", "ipndm", "ipndm_v", "deis",
    "res_multistep", "res_multistep_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp", "ddim", "uni_pc",
    "uni_pc_bh2", "dpm_fast", "dpm_adaptive",
})

# stochastic samplers whose noise comes from a Brownian tree over the schedule's sigma range (the rest: a seeded generator)
BROWNIAN = frozenset({"dpmpp_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde"})
BROWNIAN_GPU = frozenset({"dpmpp_sde_gpu", "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde_gpu"})


def per_item_noise_sampler(sampler: str, x: torch.Tensor, sigmas: torch.Tensor, seeds: list[int]):
    """The noise sampler `sampler` builds for a batch of one with each item's seed, for a whole batch:
    item b of a batched run then draws exactly the noise a batch-of-one run with seeds[b] draws."""
    if sampler in BROWNIAN or sampler in BROWNIAN_GPU:
        lo, hi = sigmas[sigmas > 0].min(), sigmas.max()
        items = [kds.BrownianTreeNoiseSampler(x[b : b + 1], lo, hi, seed=s, cpu=sampler in BROWNIAN) for b, s in enumerate(seeds)]
    else:
        items = [kds.default_noise_sampler(x[b : b + 1], seed=s) for b, s in enumerate(seeds)]
    return lambda sigma, sigma_next: torch.cat([ns(sigma, sigma_next) for ns in items])


def check_sampler(sampler: str) -> None:
    """Refuse samplers ReDi cannot split at a step (their own step choice)."""
    if sampler in OWN_STEPS:
        raise KBError(
            f"sampler {sampler!r} chooses its own time steps instead of the scheduler's, so there is no step k to retrieve at "
            "and ReDi cannot use it; use a fixed-step sampler such as euler, dpmpp_2m, heun, uni_pc, deis or euler_ancestral"
        )


def ksampler_sigmas(model, sampler: str, scheduler: str, steps: int) -> torch.Tensor:
    """The sigmas the stock KSampler uses (dpm_2 and UniPC drop the penultimate sigma of a steps+1 schedule)."""
    return comfy.samplers.KSampler(model, steps=steps, device="cpu", sampler=sampler, scheduler=scheduler, denoise=1.0).sigmas.cpu()


def sigmas_for(model, scheduler: str, steps: int) -> torch.Tensor:
    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps).cpu()


def model_hash(model) -> str:
    """Identity of the model's weights and weight patches (LoRA etc.), cheap to compute:
    every tensor's name and shape, and a strided sample of its values."""
    h = hashlib.sha256()
    sd = model.model.state_dict()
    for i, k in enumerate(sorted(sd)):
        t = sd[k]
        h.update(f"{k}:{tuple(t.shape)}".encode())
        if i % 4 == 0 and t.numel():
            flat = t.detach().flatten()
            h.update(flat[:: max(1, flat.numel() // 64)][:64].float().cpu().numpy().tobytes())
    for k in sorted(getattr(model, "patches", {})):
        h.update(f"patch:{k}:{[p[0] for p in model.patches[k]]}".encode())
    return h.hexdigest()[:20]


def sampling_signature(model) -> str:
    """What the model's sampling object does to a trajectory: its class (prediction type), its
    sigma range and a sample of its sigma table (zsnr, shift, v-prediction patches all change it)."""
    ms = model.get_model_object("model_sampling")
    # the classes of comfy.model_sampling it mixes (e.g. ModelSamplingDiscrete + EPS), not the dynamic class name
    parts = [c.__name__ for c in type(ms).__mro__ if c.__module__ == "comfy.model_sampling"]
    parts.append(f"min={float(ms.sigma_min):.5g} max={float(ms.sigma_max):.5g}")
    sig = getattr(ms, "sigmas", None)
    if sig is not None and sig.numel():
        pick = sig.flatten()[:: max(1, sig.numel() // 16)].float().cpu().tolist()
        parts.append("sigmas=" + ",".join(f"{v:.5g}" for v in pick))
    for name in ("shift", "multiplier", "sigma_data"):
        if hasattr(ms, name):
            parts.append(f"{name}={float(getattr(ms, name)):.5g}")
    return "; ".join(parts)


def conditioning_signature(cond) -> str:
    """A numeric signature of an encoded conditioning (its shape, per-channel means over the
    tokens and RMS of the first entry), compared with a tolerance by `redi_compat`; it works on
    both the node form [[tensor, {...}]] and the sampler's converted form [{"cross_attn": tensor}]."""
    if not cond:
        return "none"
    c = cond[0]
    t = c.get("cross_attn") if isinstance(c, dict) else c[0]
    if t is None:
        return "none"
    t = t.detach().float().cpu()
    mean = t.reshape(t.shape[0], -1, t.shape[-1]).mean(dim=1)[0]
    picks = mean[:: max(1, mean.numel() // 16)][:16].tolist()
    rms = float(t.pow(2).mean().sqrt())
    return "x".join(str(v) for v in t.shape[1:]) + ":" + ",".join(f"{v:.4f}" for v in picks) + f";{rms:.4f}"


def noise_for(latent: torch.Tensor, seeds: list[int]) -> torch.Tensor:
    """Per-item noise: item b gets exactly the noise a batch-1 run with seeds[b] gets."""
    return torch.cat([comfy.sample.prepare_noise(latent[b : b + 1], s) for b, s in enumerate(seeds)])


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
                 item_seeds: list[int] | None = None) -> None:
        self.name = name
        self.inner = comfy.samplers.sampler_object(name)
        self.offset, self.stop_at, self.record = offset, stop_at, record
        # per-item noise (a batch behaves as batches of one with these seeds); None: the stock batch noise
        self.item_seeds = item_seeds if item_seeds is not None and name not in DETERMINISTIC else None
        self.xs: dict[int, torch.Tensor] = {}
        self.ds: dict[int, torch.Tensor] = {}

    def max_denoise(self, model_wrap, sigmas):
        return self.inner.max_denoise(model_wrap, sigmas)

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None, disable_pbar=False):
        proxy = _RecordingModel(model_wrap)
        ms = model_wrap.inner_model.model_sampling
        inner = self.inner
        if self.item_seeds is not None:
            ns = per_item_noise_sampler(self.name, noise, sigmas, self.item_seeds)
            inner = comfy.samplers.ksampler(self.name, {"noise_sampler": ns})

        def cb(i, x0, x, total):
            step = i + self.offset
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


def stop_step_for(sampler: str, k: int) -> int | None:
    """None: the key phase runs sigmas[:k+1]; else it runs the whole schedule and stops at k."""
    return None if sampler in SLICE_EXACT else k


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
        cap = Capture(self.sampler, item_seeds=seeds)
        self._run(cap, positive, latent, noise, self.sigmas, seeds[0])
        return ({s: cap.xs[s].numpy() for s in stored}, {s: cap.ds[s - 1].numpy() for s in stored})

    def key_phase(self, positive, latent: torch.Tensor, noise: torch.Tensor, seed: int, k: int,
                  item_seeds: list[int] | None = None) -> KeyState:
        """The first k steps, on the trajectory a full run takes; `noise` as comfy.sample.prepare_noise makes it
        (`item_seeds`: per-item noise as in `trajectory`, for benchmarks)."""
        stop = stop_step_for(self.sampler, k)
        cap = Capture(self.sampler, stop_at=stop, item_seeds=item_seeds)
        self._run(cap, positive, latent, noise, self.sigmas if stop else self.sigmas[: k + 1], seed)
        return key_state(cap, k, self.sigmas)

    def finish(self, positive, x_model: np.ndarray, start: int, seed: int, item_seeds: list[int] | None = None) -> torch.Tensor:
        """Sample from `start` to the end; input is the sampler state x, output in ComfyUI's latent space."""
        cap = Capture(self.sampler, offset=start, record=False, item_seeds=item_seeds)
        x = to_latent_image(self.model_sampling, float(self.sigmas[start]), torch.from_numpy(np.ascontiguousarray(x_model)))
        x = self.to_out(x)
        return self._run(cap, positive, x, torch.zeros_like(x), self.sigmas[start:], seed)

    def full(self, positive, latent: torch.Tensor, noise: torch.Tensor, seed: int, item_seeds: list[int] | None = None) -> torch.Tensor:
        """The stock KSampler's run (reference for benchmarks and the support table)."""
        return self._run(Capture(self.sampler, record=False, item_seeds=item_seeds), positive, latent, noise, self.sigmas, seed)


def check_interrupt() -> None:
    comfy.model_management.throw_exception_if_processing_interrupted()
