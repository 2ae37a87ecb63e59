"""ReDi's sampling phases on ComfyUI's stock samplers (used by the KB Builder,
the ReDi KSampler and the headless `kb_tools build`).

All latents handed to kb_tools are in the model's internal space (after
`process_latent_in`), the space the samplers and their callbacks work in.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import comfy.model_management
import comfy.sample
import comfy.samplers
import latent_preview
import numpy as np
import torch

from ..kb_tools.redi_loop import KeyState


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


def noise_for(latent: torch.Tensor, seeds: list[int]) -> torch.Tensor:
    """Per-item noise: item b gets exactly the noise a batch-1 run with seeds[b] gets."""
    return torch.cat([comfy.sample.prepare_noise(latent[b : b + 1], s) for b, s in enumerate(seeds)])


@dataclass
class _Recorder:
    """Sampler callback that keeps (x before the step, denoised) per step and forwards previews."""

    offset: int
    total: int
    preview: object
    xs: dict
    ds: dict

    def __call__(self, i, x0, x, _n):
        step = i + self.offset
        self.xs[step] = x.detach().float().cpu()
        self.ds[step] = x0.detach().float().cpu()
        if self.preview is not None:
            self.preview(step, x0, x, self.total)


def sample_range(model, noise, steps, cfg, sampler, scheduler, positive, negative, latent_out, start, last, seed, rec, force_full):
    """The stock sampler over steps [start, last) of a `steps`-step schedule (ComfyUI latent space)."""
    return comfy.sample.sample(
        model, noise, steps, cfg, sampler, scheduler, positive, negative, latent_out,
        denoise=1.0, disable_noise=start > 0, start_step=start, last_step=last,
        force_full_denoise=force_full, callback=rec, disable_pbar=True, seed=seed,
    )


class Phases:
    """The stock sampler split at arbitrary steps, for one ComfyUI model and settings."""

    def __init__(self, model, steps: int, cfg: float, sampler: str, scheduler: str, negative, preview: bool = True):
        self.model, self.steps, self.cfg, self.sampler, self.scheduler, self.negative = model, steps, cfg, sampler, scheduler, negative
        self.latent_format = model.get_model_object("latent_format")
        self.sigmas = sigmas_for(model, scheduler, steps)
        self.preview = latent_preview.prepare_callback(model, steps) if preview else None

    def to_model(self, t: torch.Tensor) -> torch.Tensor:
        return self.latent_format.process_in(t)

    def to_out(self, t: torch.Tensor) -> torch.Tensor:
        return self.latent_format.process_out(t)

    def trajectory(self, positive, latent: torch.Tensor, noise: torch.Tensor, seed: int, stored: tuple[int, ...]):
        """Full run; returns {s: x after s steps} and {s: denoised at step s-1}, as numpy."""
        xs, ds = {}, {}
        rec = _Recorder(0, self.steps, self.preview, xs, ds)
        out = sample_range(self.model, noise, self.steps, self.cfg, self.sampler, self.scheduler,
                      positive, self.negative, latent, 0, self.steps, seed, rec, True)
        xs[self.steps] = self.to_model(out.float().cpu())
        return ({s: xs[s].numpy() for s in stored}, {s: ds[s - 1].numpy() for s in stored})

    def key_phase(self, positive, latent: torch.Tensor, noise: torch.Tensor, seed: int, k: int) -> KeyState:
        """The first k steps; `noise` as comfy.sample.prepare_noise makes it."""
        xs, ds = {}, {}
        rec = _Recorder(0, self.steps, self.preview, xs, ds)
        out = sample_range(self.model, noise, self.steps, self.cfg, self.sampler, self.scheduler,
                      positive, self.negative, latent, 0, k, seed, rec, False)
        return KeyState.after_key_phase(self.to_model(out.float().cpu()).numpy(), xs[k - 1].numpy(), ds[k - 1].numpy(), self.sigmas[k - 1])

    def finish(self, positive, x_model: np.ndarray, start: int, seed: int) -> torch.Tensor:
        """Sample from `start` to the end; input in model space, output in ComfyUI's latent space."""
        rec = _Recorder(start, self.steps, self.preview, {}, {})
        x = self.to_out(torch.from_numpy(np.ascontiguousarray(x_model)))
        noise = torch.zeros_like(x)
        return sample_range(self.model, noise, self.steps, self.cfg, self.sampler, self.scheduler,
                       positive, self.negative, x, start, self.steps, seed, rec, True)


def check_interrupt() -> None:
    comfy.model_management.throw_exception_if_processing_interrupted()
