"""Checks that a query fits a knowledge base, with messages that say how to fix it."""

from __future__ import annotations

import comfy.model_sampling

from ..kb_tools.errors import KBError
from ..kb_tools.storage.knowledge_base import KnowledgeBase
from ..redi_core.retrieval import GUARD_DEFAULTS, ReDiParams, signatures_match
from . import identity, patches, samplers

KEY_SPACE_OPTIONS = ["auto", "latent", "denoised"]
# what key_space auto uses for a query at the KB's fixed seed, per model kind: the key space verified per
# image there (docs/sampler_verification.md, _dit.md). SD1.x: latent keys left 1-4 of 96 images under 15 dB
# on a 16-entry KB where denoised keys left none; the DiT: denoised keys left 1 (14.5 dB) where latent keys
# left none. At any other seed auto uses denoised keys.
AUTO_AT_KB_SEED = {"eps": "denoised", "flow": "latent"}


def check_query(kb: KnowledgeBase, model, latent_shape: tuple[int, ...], steps: int, cfg: float, sampler: str,
                scheduler: str | None, negative=None) -> list[str]:
    """Raise KBError listing every mismatch with its fix; returns notes for the report (fields an
    older KB does not record)."""
    fp = kb.fingerprint
    if len(latent_shape) != 4:
        raise KBError(f"ReDi works on image latents (batch, channels, height, width); this latent has shape {list(latent_shape)}")
    samplers.check_sampler(sampler, scheduler if scheduler is not None else fp.scheduler, model)
    check_model_supported(model)
    problems, notes = [], []
    if identity.model_hash(model) != fp.model_hash:
        problems.append(f"model: KB {kb.name} was built with another model ({fp.model_name}, hash {fp.model_hash}) or other LoRA/patches; build a KB with this model")
    sampling = identity.sampling_signature(model)
    if not fp.sampling and fp.sampler not in samplers.RECORDED_RIGHT_BEFORE_V2:
        problems.append(f"KB {kb.name} was built by an earlier version of this pack, which recorded wrong {fp.sampler} trajectories "
                        "(a stale or rescaled sampler state, or batch-dependent noise); rebuild it with this version")
    elif not fp.sampling:
        notes.append(f"KB {kb.name} predates the sampling fingerprint: model-sampling patches (zsnr, v-prediction, shift) are not checked; rebuild it to check them")
    elif sampling != fp.sampling:
        problems.append(
            f"model sampling: the model's sampling differs from the KB's ({_diff(sampling, fp.sampling)}): a ModelSampling* patch "
            "(zsnr, v_prediction, shift, ...) or a guidance patch (APG, RescaleCFG, CFGZeroStar, ...) changes every trajectory; "
            "use the model exactly as it was when the KB was built, or build a KB with this patch"
        )
    if negative is not None:
        if not fp.negative_cond:
            notes.append(f"KB {kb.name} predates the negative-prompt fingerprint: the negative prompt is not checked; rebuild it to check it")
        elif not signatures_match(identity.conditioning_signature(negative), fp.negative_cond):
            problems.append("negative: the negative conditioning differs from the KB's negative prompt; encode the KB's negative prompt "
                            "(the KB Loader shows the KB's settings) or build a KB with this negative prompt")
    if tuple(latent_shape[1:]) != tuple(fp.latent_shape):
        c, h, w = fp.latent_shape
        problems.append(f"size: the latent is {list(latent_shape[1:])} but the KB holds {[c, h, w]} (a {w * 8}x{h * 8} image); use that width/height")
    for name, ours, theirs in (("steps", steps, fp.steps), ("sampler", sampler, fp.sampler), ("cfg", float(cfg), fp.cfg)):
        if ours != theirs:
            problems.append(f"{name}: set to {ours!r}, the KB was built with {theirs!r}; use {theirs!r}")
    if scheduler is not None and scheduler != fp.scheduler:
        problems.append(f"scheduler: set to {scheduler!r}, the KB was built with {fp.scheduler!r}; use {fp.scheduler!r}")
    if problems:
        raise KBError("this sampling does not fit the knowledge base:\n- " + "\n- ".join(problems))
    return notes


# ModelSamplingDiscrete(zsnr=true) rescales the schedule to zero terminal SNR: sigma_max about 4096
ZSNR_SIGMA_MAX = 1000.0


def check_model_supported(model) -> None:
    """Refuse models ReDi was measured to fail on even with a KB built on the same model and patches."""
    reasons = patches.refused_patches(model)
    ms = model.get_model_object("model_sampling")
    if not isinstance(ms, comfy.model_sampling.CONST) and float(ms.sigma_max) > ZSNR_SIGMA_MAX:
        reasons.append(f"zero-terminal-SNR sampling (ModelSamplingDiscrete zsnr, sigma_max {float(ms.sigma_max):.0f}): 16-17 dB from "
                       "the full run and accuracy 36-38% against 58-65%, from a KB built on the same model")
    if reasons:
        raise KBError("ReDi does not work with this model's patches (measured on the demo model, scripts/sampler_support.py --patch):\n- "
                      + "\n- ".join(reasons) + "\nremove the patch before ReDi, or use the stock KSampler for this model")


def _diff(ours: str, theirs: str) -> str:
    a, b = ours.split("; "), theirs.split("; ")
    for x, y in zip(a, b):
        if x != y:
            return f"model has {x[:80]!r}, KB has {y[:80]!r}"
    if len(a) != len(b):
        extra = a[len(b):] or b[len(a):]
        return f"{'the model' if len(a) > len(b) else 'the KB'} also has {'; '.join(extra)[:120]!r}"
    return f"model {ours[:60]!r}, KB {theirs[:60]!r}"


def resolve_params(kb: KnowledgeBase, key_step: int, value_step: int, neighbours: int, key_space: str,
                   max_key_distance: float, max_residual: float, seed: int, batch: int, model,
                   max_weight_deviation: float = GUARD_DEFAULTS["max_weight_deviation"]) -> ReDiParams:
    if key_space == "auto":
        fp = kb.fingerprint
        at_kb_seed = fp.seed_mode == "fixed" and seed == fp.seed and batch == 1
        key_space = AUTO_AT_KB_SEED[samplers.model_kind(model)] if at_kb_seed else "denoised"
    params = ReDiParams(key_step, value_step, neighbours, key_space, max_key_distance, max_residual, max_weight_deviation)
    params.validate(kb.fingerprint.steps, kb)
    return params
