"""The pack's adapter to ComfyUI's sampling: everything that calls into `comfy` for ReDi.

Layers: `nodes/` (schema, validation, messages) -> `comfy_adapter` (this package) ->
`redi_core` (pure algorithms) -> `kb_tools.storage` (the KB on disk). This package is the
only one besides `nodes/` that imports ComfyUI; the names below are its interface.
"""

from .identity import conditioning_signature, model_hash, sampling_signature
from .noise import NoisePlan, noise_for
from .samplers import (
    DETERMINISTIC,
    OWN_STEPS,
    RECORDED_RIGHT_BEFORE_V2,
    RESTART_FAILS,
    check_sampler,
    sampler_problem,
    stop_step_for,
    unverified_reason,
)
from .sampling import (
    Capture,
    Phases,
    check_interrupt,
    key_state,
    ksampler_sigmas,
    noise_levels_of,
    processed_conds_rows,
    scheduler_of,
    sigmas_for,
    to_latent_image,
)

__all__ = [
    "DETERMINISTIC", "OWN_STEPS", "RECORDED_RIGHT_BEFORE_V2", "RESTART_FAILS", "Capture", "NoisePlan", "Phases", "check_interrupt",
    "check_sampler", "conditioning_signature", "key_state", "ksampler_sigmas", "model_hash", "noise_for",
    "noise_levels_of", "processed_conds_rows", "sampler_problem", "sampling_signature", "scheduler_of", "sigmas_for", "stop_step_for",
    "to_latent_image", "unverified_reason",
]
