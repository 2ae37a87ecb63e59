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
import json
import logging
import math
from pathlib import Path

import comfy.k_diffusion.sampling as kds
import comfy.model_management
import comfy.model_sampling
import comfy.sample
import comfy.samplers
import latent_preview
import numpy as np
import torch

from ..kb_tools import noise_levels
from ..kb_tools.errors import KBError
from ..kb_tools.redi_loop import KeyState

# ComfyUI's UniPC reports x / sqrt(1 + sigma^2) after step i to its callback
VP_CALLBACK = frozenset({"uni_pc", "uni_pc_bh2"})
# samplers that pick their own time steps instead of the scheduler's: there is no step k to stop at
OWN_STEPS = frozenset({"dpm_fast", "dpm_adaptive"})
# samplers whose first k steps on sigmas[:k+1] equal the full run's first k steps
# (checked for every sampler by `scripts/sampler_support.py --check`)
SLICE_EXACT = frozenset({
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "dpm_2", "dpm_2_ancestral", "lms",
    "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp", "dpmpp_2m", "dpmpp_2m_cfg_pp", "ddpm", "lcm", "ipndm", "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp", "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp",
    "gradient_estimation", "gradient_estimation_cfg_pp", "ddim", "er_sde", "seeds_2",
})
# samplers that draw no noise after the initial noise (a batch's items are independent of each other)
DETERMINISTIC = frozenset({
    "euler", "euler_cfg_pp", "heun", "heunpp2", "dpm_2", "lms", "dpmpp_2m", "dpmpp_2m_cfg_pp", "ipndm", "ipndm_v", "deis",
    "res_multistep", "res_multistep_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp", "ddim", "uni_pc",
    "uni_pc_bh2", "dpm_fast", "dpm_adaptive", "exp_heun_2_x0",
})

# samplers whose trajectories KBs built before issue 15 recorded correctly (deterministic, truthful callbacks)
RECORDED_RIGHT_BEFORE_V2 = DETERMINISTIC - {"ipndm", "ipndm_v", "deis", "uni_pc", "uni_pc_bh2", "dpm_fast", "dpm_adaptive"}
# stochastic samplers whose noise comes from a Brownian tree over the schedule's sigma range (the rest: a seeded generator)
BROWNIAN = frozenset({"dpmpp_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde"})
BROWNIAN_GPU = frozenset({"dpmpp_sde_gpu", "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde_gpu"})


class NoisePlan:
    """The noise a stochastic sampler draws after the initial noise, arranged so that every phase of a
    ReDi run draws what the full run draws at the same steps:

    - Brownian-tree samplers (the SDE ones) get the tree over the WHOLE schedule's sigma range (a run
      on sigmas[v:] would build it over [sigma_min, sigma_v] and draw other increments);
    - generator samplers (ancestral, lcm, ...) get the seeded generator advanced past the draws the
      full run makes before the phase's first step (counted in the key phase, per step);
    - `item_seeds`: each item draws what a batch of one with its seed draws (KB builds, benchmarks);
      otherwise the batch shares the stock generator and a subset of items takes its rows."""

    def __init__(self, sampler: str, sigmas: torch.Tensor, seed: int, batch: int, item_seeds: list[int] | None = None) -> None:
        self.sampler, self.sigmas, self.seed, self.batch, self.item_seeds = sampler, sigmas.cpu(), seed, batch, item_seeds
        self.draws = 0  # noise-sampler calls of the key phase
        self.key_steps = 0

    @property
    def active(self) -> bool:
        return self.sampler not in DETERMINISTIC

    def skip_for(self, start: int) -> int:
        return 0 if start == 0 or not self.key_steps else round(self.draws / self.key_steps * start)

    def make(self, x: torch.Tensor, idx: np.ndarray | None, start: int, count: bool):
        """A noise sampler for a phase starting at step `start`, for the batch rows `idx` of `x`'s batch."""
        rows = np.arange(x.shape[0]) if idx is None else np.asarray(idx)
        shape = (self.batch, *x.shape[1:])
        proto = torch.zeros(shape, dtype=x.dtype, device=x.device)
        brownian = self.sampler in BROWNIAN or self.sampler in BROWNIAN_GPU
        if brownian:
            cpu = self.sampler in BROWNIAN
            sig = self.sigmas if cpu else self.sigmas.to(x.device)
            lo, hi = sig[sig > 0].min(), sig.max()
            if self.item_seeds is not None:
                fns = [kds.BrownianTreeNoiseSampler(proto[:1], lo, hi, seed=self.item_seeds[r], cpu=cpu) for r in rows]
            else:
                tree = kds.BrownianTreeNoiseSampler(proto, lo, hi, seed=self.seed, cpu=cpu)
                fns = [lambda s, sn, tree=tree: tree(s, sn)[torch.as_tensor(rows)]]
        else:
            skip = self.skip_for(start)
            if self.item_seeds is not None:
                fns = [_skipped(kds.default_noise_sampler(proto[:1], seed=self.item_seeds[r]), skip) for r in rows]
            else:
                gen = _skipped(kds.default_noise_sampler(proto, seed=self.seed), skip)
                fns = [lambda s, sn, gen=gen: gen(s, sn)[torch.as_tensor(rows)]]

        def sample(sigma, sigma_next):
            if count:
                self.draws += 1
            return torch.cat([f(sigma, sigma_next) for f in fns])

        return sample


def _skipped(noise_sampler, n: int):
    for _ in range(n):
        noise_sampler(None, None)
    return noise_sampler


# samplers that reach step k on the KB's trajectory but whose finish from v, restarted without the
# multistep history of steps k..v, lands too far from the full run (measured on the demo model with a
# KB entry's own trajectory: see README "Sampler and scheduler support")
RESTART_FAILS = {
    "deis": "16.7 dB", "ipndm": "14.9 dB", "ipndm_v": "as ipndm (the same 4th-order Adams-Bashforth history)",
    "dpmpp_2m_sde": "13.6 dB", "dpmpp_2m_sde_gpu": "13.6 dB (as dpmpp_2m_sde)",
    "dpmpp_2m_sde_heun": "as dpmpp_2m_sde", "dpmpp_2m_sde_heun_gpu": "as dpmpp_2m_sde",
    "dpmpp_3m_sde": "10.1 dB", "dpmpp_3m_sde_gpu": "as dpmpp_3m_sde", "lms": "12.3 dB",
}
WORKING_EXAMPLES = "euler, euler_ancestral, heun or dpmpp_2m"
# sampler x scheduler pairs whose ReDi images missed the tolerance through a KB, written by
# `scripts/sampler_support.py` (docs/sampler_support.md): {"fails": {sampler: {scheduler or "*": why}},
# "works": {scheduler: [samplers]}}
VERDICTS_FILE = Path(__file__).with_name("sampler_verdicts.json")


def _verdicts() -> dict:
    try:
        data = json.loads(VERDICTS_FILE.read_text())
        return {"fails": dict(data.get("fails", {})), "works": dict(data.get("works", {}))}
    except (OSError, ValueError):  # a damaged install: the per-scheduler refusals are missing, say so in the log
        logging.getLogger(__name__).warning("ReDi: %s is missing or unreadable; reinstall the pack", VERDICTS_FILE)
        return {"fails": {}, "works": {}}


VERDICTS = _verdicts()
MEASURED_FAILS: dict[str, dict[str, str]] = VERDICTS["fails"]
# a sampler or scheduler no verdict covers (one a newer ComfyUI added) is refused until measured;
# scripts/sampler_support.py turns this off to measure it
REFUSE_UNMEASURED = True


def check_sampler(sampler: str, scheduler: str | None = None) -> None:
    """Refuse samplers ReDi cannot split at a step (their own step choice) or cannot finish within tolerance."""
    if sampler in RESTART_FAILS:
        raise KBError(
            f"sampler {sampler!r} does not work with ReDi: restarted at the value step without its multistep history it "
            f"ends far from the full run ({RESTART_FAILS[sampler]} PSNR from the same seed's full run even when the KB holds "
            f"the query's own trajectory, where 20 dB is the tolerance); use {WORKING_EXAMPLES}"
        )
    fails = MEASURED_FAILS.get(sampler, {})
    if "*" in fails:
        raise KBError(
            f"sampler {sampler!r} does not work with ReDi within tolerance ({fails['*']}, measured on the "
            f"demo model; the tolerance is 2 points); use {WORKING_EXAMPLES}"
        )
    if scheduler is not None and scheduler in fails:
        known = ("euler", "euler_ancestral", "heun", "dpmpp_2m")  # the familiar ones first
        works = sorted((s for s in VERDICTS["works"].get(scheduler, []) if s != sampler), key=lambda s: (s not in known, s))[:5]
        use = f"use {', '.join(works)} with it, or another scheduler" if works else f"use another scheduler, or {WORKING_EXAMPLES}"
        raise KBError(
            f"sampler {sampler!r} with the {scheduler} scheduler does not work with ReDi within tolerance ({fails[scheduler]}, "
            f"measured on the demo model; the tolerance is 20 dB and 2 points of accuracy); {use}"
        )
    if sampler in OWN_STEPS:
        raise KBError(
            f"sampler {sampler!r} chooses its own time steps instead of the scheduler's, so there is no step k to retrieve at "
            f"and ReDi cannot use it; use a fixed-step sampler such as {WORKING_EXAMPLES}"
        )
    if REFUSE_UNMEASURED and not measured(sampler, scheduler):
        works = VERDICTS["works"].get(scheduler or "", [])
        use = ", ".join(w for w in ("euler", "euler_ancestral", "heun", "dpmpp_2m") if w in works) or WORKING_EXAMPLES
        what = f"sampler {sampler!r}" + (f" with the {scheduler} scheduler" if scheduler is not None else "")
        if scheduler is not None and not works and measured(sampler):  # a scheduler no verdict covers
            what, use = f"the {scheduler} scheduler", f"the normal or karras scheduler with {WORKING_EXAMPLES}"
        raise KBError(
            f"{what} has not been measured with ReDi (this ComfyUI is newer than the pack's verdicts), so ReDi does not "
            f"use it yet; use {use}, or measure it with scripts/sampler_support.py --write-verdicts"
        )


def measured(sampler: str, scheduler: str | None = None) -> bool:
    """Whether a verdict covers the sampler (with a scheduler: the pair)."""
    if scheduler is None:
        return sampler in MEASURED_FAILS or any(sampler in w for w in VERDICTS["works"].values())
    return sampler in VERDICTS["works"].get(scheduler, ()) or bool({scheduler, "*"} & set(MEASURED_FAILS.get(sampler, {})))


def sampler_problem(sampler: str, scheduler: str | None = None) -> bool | str:
    """For the nodes' validate_inputs (a refusal at queue time): True or the message."""
    try:
        check_sampler(sampler, scheduler)
    except KBError as e:
        return str(e)
    return True


def noise_levels_of(model, sigmas: torch.Tensor, key_step: int, value_step: int) -> noise_levels.NoiseLevels:
    """The schedule's noise ratios at the key and value steps, for the quality guard."""
    flow = isinstance(model.get_model_object("model_sampling"), comfy.model_sampling.CONST)
    return noise_levels.NoiseLevels.of(sigmas.float().cpu().tolist(), key_step, value_step, flow)


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
                 noise: NoisePlan | None = None, rows: np.ndarray | None = None) -> None:
        self.name = name
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
        self.noise_plan: NoisePlan | None = None

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
        return key_state(cap, k, self.sigmas)

    def finish(self, positive, x_model: np.ndarray, start: int, seed: int, rows: np.ndarray | None = None) -> torch.Tensor:
        """Sample the batch rows `rows` (all: None) of the last key phase from `start` to the end, on the
        full run's noise; input is the sampler state x, output in ComfyUI's latent space."""
        cap = Capture(self.sampler, offset=start, record=False, noise=self.noise_plan, rows=rows)
        x = to_latent_image(self.model_sampling, float(self.sigmas[start]), torch.from_numpy(np.ascontiguousarray(x_model)))
        x = self.to_out(x)
        return self._run(cap, positive, x, torch.zeros_like(x), self.sigmas[start:], seed)

    def full(self, positive, latent: torch.Tensor, noise: torch.Tensor, seed: int, item_seeds: list[int] | None = None) -> torch.Tensor:
        """The stock KSampler's run (each item as a batch of one with `item_seeds`), for benchmarks."""
        plan = NoisePlan(self.sampler, self.sigmas, seed, latent.shape[0], item_seeds) if item_seeds else None
        return self._run(Capture(self.sampler, record=False, noise=plan), positive, latent, noise, self.sigmas, seed)


def check_interrupt() -> None:
    comfy.model_management.throw_exception_if_processing_interrupted()
