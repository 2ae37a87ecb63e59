"""Checks that a query fits a knowledge base, with messages that say how to fix it."""

from __future__ import annotations

from ..kb_tools.errors import KBError
from ..kb_tools.knowledge_base import KnowledgeBase
from ..kb_tools.redi_loop import ReDiParams
from . import comfy_sampling

KEY_SPACE_OPTIONS = ["auto", "latent", "denoised"]


def check_query(kb: KnowledgeBase, model, latent_shape: tuple[int, ...], steps: int, cfg: float, sampler: str, scheduler: str | None) -> None:
    fp = kb.fingerprint
    if len(latent_shape) != 4:
        raise KBError(f"ReDi works on image latents (batch, channels, height, width); this latent has shape {list(latent_shape)}")
    problems = []
    if comfy_sampling.model_hash(model) != fp.model_hash:
        problems.append(f"model: KB {kb.name} was built with another model ({fp.model_name}, hash {fp.model_hash}) or other LoRA/patches; build a KB with this model")
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


def resolve_params(kb: KnowledgeBase, key_step: int, value_step: int, neighbours: int, key_space: str,
                   max_key_distance: float, max_residual: float, seed: int, batch: int) -> ReDiParams:
    if key_space == "auto":
        fp = kb.fingerprint
        key_space = "latent" if fp.seed_mode == "fixed" and seed == fp.seed and batch == 1 else "denoised"
    params = ReDiParams(key_step, value_step, neighbours, key_space, max_key_distance, max_residual)
    params.validate(kb.fingerprint.steps, kb)
    return params
