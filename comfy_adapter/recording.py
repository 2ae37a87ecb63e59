"""Learning from use: the full trajectories a run computes anyway, handed to a KB library.

Two sources, no extra UNet call in either:
- ReDi KSampler: an item the guard refused (or an empty library) is finished from the key step;
  for a one-step sampler that is the full run's trajectory (the key phase recorded x up to k,
  the finish records the rest). Items that jumped are never recorded.
- ReDi Record (a model patch): the stock KSampler or SamplerCustomAdvanced run, wrapped at
  OUTER_SAMPLE; the sampler is run through `Capture`, which records every step and returns the
  same latent.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable

import comfy.samplers
import numpy as np
import torch

from ..kb_tools.library import RECORDER, Library, LibraryKB, Recording, item_digest, library_steps
from ..kb_tools.storage.disk_format import Entry, Fingerprint
from . import identity
from .samplers import OWN_STEPS, RESTART_FAILS
from .sampling import Capture, scheduler_of

# samplers with no multistep history: a finish from step k continues the full run's trajectory exactly
# (with the run's own noise plan for the ancestral ones)
FINISH_EXACT = frozenset({
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "dpm_2", "dpm_2_ancestral",
    "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp", "ddpm", "lcm", "ddim",
})
log = logging.getLogger("redi.record")
_HASHES: dict[tuple, str] = {}


def cached_model_hash(model) -> str:
    """identity.model_hash, once per (weights object, patches)."""
    key = (id(model.model), tuple(sorted((k, len(v)) for k, v in getattr(model, "patches", {}).items())), getattr(model, "patches_uuid", None))
    if key not in _HASHES:
        _HASHES[key] = identity.model_hash(model)
    return _HASHES[key]


def run_fingerprint(model, latent_shape: tuple[int, ...], sampler: str, scheduler: str, steps: int, cfg: float, negative) -> Fingerprint:
    """The fingerprint of a run, as a library KB records it."""
    return Fingerprint(
        model_hash=cached_model_hash(model), model_name=type(model.model.model_config).__name__,
        latent_shape=tuple(int(v) for v in latent_shape[1:]), sampler=sampler, scheduler=scheduler, steps=int(steps),
        cfg=float(cfg), stored_steps=library_steps(steps), seed_mode="range", seed=0, negative_hash="",
        sampling=identity.sampling_signature(model), negative_cond=identity.conditioning_signature(negative),
    )


def item_signatures(positive, batch: int) -> list[str]:
    """The conditioning signature of each batch row (a shared conditioning gives every row the same)."""
    c = positive[0]
    t = c.get("cross_attn") if isinstance(c, dict) else c[0]
    if t is None or t.shape[0] != batch or batch == 1:
        return [identity.conditioning_signature(positive)] * batch
    out = []
    for b in range(batch):
        row = [{"cross_attn": t[b : b + 1]}] if isinstance(c, dict) else [[t[b : b + 1], {}]]
        out.append(identity.conditioning_signature(row))
    return out


def label(signature: str, text: str | None) -> str:
    """What an entry stores as its prompt: the text when given and allowed, else a signature hash."""
    return text if text else "cond:" + hashlib.sha256(signature.encode()).hexdigest()[:16]


def stored_rows(xs: dict[int, torch.Tensor], ds: dict[int, torch.Tensor], stored: tuple[int, ...],
                rows: np.ndarray) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]] | None:
    """x after s steps and the denoised estimate at step s-1 for every stored step, for batch rows
    `rows` (None when a step is missing: then the run was not a full trajectory)."""
    try:
        x = {s: xs[s].numpy()[rows] for s in stored}
        d = {s: ds[s - 1].numpy()[rows] for s in stored}
    except KeyError:
        return None
    return x, d


def submit(library: Library, kb: LibraryKB, x: dict[int, np.ndarray], d: dict[int, np.ndarray], signatures: list[str],
           seed: int, rows: list[int], texts: list[str | None] | None = None) -> Recording:
    """Queue trajectories for the background recorder (returns at once)."""
    texts = texts or [None] * len(rows)
    entries = [Entry(label(sig, t), int(seed), -1) for sig, t in zip(signatures, texts)]
    digests = [item_digest(sig, seed, r) for sig, r in zip(signatures, rows)]
    return RECORDER.submit(Recording(library, kb, x, d, entries, digests))


def sampler_name_of(sampler) -> str | None:
    """The stock sampler's name behind a KSAMPLER object (None: a custom or configured sampler)."""
    if isinstance(sampler, Capture):
        return None
    fn = getattr(sampler, "sampler_function", None)
    if fn is None or getattr(sampler, "extra_options", None) or getattr(sampler, "inpaint_options", None):
        return None
    name = getattr(fn, "__name__", "").removeprefix("sample_")
    if name in comfy.samplers.KSAMPLER_NAMES and name not in OWN_STEPS and name not in RESTART_FAILS:
        return name
    return None


class RecordPatch:
    """OUTER_SAMPLE wrapper of ReDi Record: runs the stock sampler through Capture and records the
    finished trajectories into the library (in the background)."""

    def __init__(self, library: Library, report: Callable[[list[str]], None] | None = None) -> None:
        self.library = library
        self.last: Recording | None = None
        self.last_note = ""
        self.report = report  # shows what was recorded on the node, after sampling

    def _say(self) -> None:
        if self.report is not None and self.last_note:
            try:
                self.report([self.last_note])
            except Exception as e:  # a report must never fail the user's generation
                log.warning("ReDi Record: report not shown (%s)", e)

    def __call__(self, executor, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False,
                 seed=None, **kwargs):
        guider = executor.class_obj
        why = self._refusal(guider, latent_image, sampler, sigmas, denoise_mask)
        if why:
            self.last_note = f"ReDi Record: not recorded ({why})"
            log.info(self.last_note)
            out = executor(noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed, **kwargs)
            self._say()
            return out
        name = sampler_name_of(sampler)
        cap = Capture(name)
        out = executor(noise, latent_image, cap, sigmas, denoise_mask, callback, disable_pbar, seed, **kwargs)
        try:
            self._record(guider, cap, name, sigmas, latent_image, seed)
        except Exception as e:  # recording must never fail the user's generation
            self.last_note = f"ReDi Record: not recorded ({e})"
            log.warning(self.last_note)
        self._say()
        return out

    def _refusal(self, guider, latent_image, sampler, sigmas, denoise_mask) -> str:
        if sampler_name_of(sampler) is None:
            return "a custom or configured sampler (record the stock samplers that ReDi supports)"
        if denoise_mask is not None or getattr(latent_image, "is_nested", False) or latent_image.ndim != 4 or torch.count_nonzero(latent_image):
            return "not a txt2img run from an empty latent"
        if "positive" not in guider.original_conds:
            return "no positive conditioning"
        return ""

    def _record(self, guider, cap: Capture, name: str, sigmas: torch.Tensor, latent_image: torch.Tensor, seed) -> None:
        patcher = guider.model_patcher
        scheduler = scheduler_of(patcher, name, sigmas)
        if scheduler is None:
            self.last_note = "ReDi Record: not recorded (custom sigmas or denoise < 1: not a stock full schedule)"
            return
        steps = len(sigmas) - 1
        negative = guider.original_conds.get("negative")
        cfg = float(getattr(guider, "cfg", 1.0))
        fp = run_fingerprint(patcher, tuple(latent_image.shape), name, scheduler, steps, cfg, negative)
        kb = self.library.find_or_create(fp)
        batch = latent_image.shape[0]
        rows = np.arange(batch)
        got = stored_rows(cap.xs, cap.ds, kb.fingerprint.stored_steps, rows)
        if got is None:
            self.last_note = "ReDi Record: not recorded (a stored step is missing from the run)"
            return
        sigs = item_signatures(guider.original_conds["positive"], batch)
        self.last = submit(self.library, kb, got[0], got[1], sigs, int(seed or 0), rows.tolist())
        self.last_note = f"ReDi Record: {batch} trajectories queued for KB {kb.name} ({kb.count} before)"


def finished_rows(key_cap: Capture, fin_cap: Capture, k: int, stored: tuple[int, ...],
                  rows: np.ndarray) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]] | None:
    """The stored steps of batch rows `rows`, sampled from the start to step k by the key phase
    (`key_cap`, whole batch) and on from k by a recording finish (`fin_cap`, those rows only)."""
    try:
        x = {s: (key_cap.xs[s].numpy()[rows] if s <= k else fin_cap.xs[s].numpy()) for s in stored}
        d = {s: (key_cap.ds[s - 1].numpy()[rows] if s - 1 < k else fin_cap.ds[s - 1].numpy()) for s in stored}
    except KeyError:
        return None
    return x, d
