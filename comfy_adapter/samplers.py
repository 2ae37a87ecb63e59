"""Which of ComfyUI's samplers ReDi can split at a step, how each draws its noise, and the
measured sampler x scheduler verdicts that decide which ones ReDi refuses."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..kb_tools.errors import KBError

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


def stop_step_for(sampler: str, k: int) -> int | None:
    """None: the key phase runs sigmas[:k+1]; else it runs the whole schedule and stops at k."""
    return None if sampler in SLICE_EXACT else k


# samplers that reach step k on the KB's trajectory but whose finish from v, restarted without the
# multistep history of steps k..v, lands too far from the full run (measured on the demo model with a
# KB entry's own trajectory: see docs/how_redi_works.md)
RESTART_FAILS = {
    "deis": "16.7 dB", "ipndm": "14.9 dB", "ipndm_v": "as ipndm (the same 4th-order Adams-Bashforth history)",
    "dpmpp_2m_sde": "13.6 dB", "dpmpp_2m_sde_gpu": "13.6 dB (as dpmpp_2m_sde)",
    "dpmpp_2m_sde_heun": "as dpmpp_2m_sde", "dpmpp_2m_sde_heun_gpu": "as dpmpp_2m_sde",
    "dpmpp_3m_sde": "10.1 dB", "dpmpp_3m_sde_gpu": "as dpmpp_3m_sde", "lms": "12.3 dB",
}
WORKING_EXAMPLES = "euler, euler_ancestral or heun (with the normal scheduler)"
# sampler x scheduler pairs whose ReDi images missed the tolerance through a KB, written by
# `scripts/sampler_support.py` (docs/sampler_support.md): {"fails": {sampler: {scheduler or "*": why}},
# "works": {scheduler: [samplers]}}, measured on the SD1.x (epsilon) demo model, and under "flow" the
# same for flow-matching models, measured on the Flux DiT demo (docs/sampler_support_dit.md); a pair
# the flow table does not cover falls back to the epsilon verdict
VERDICTS_FILE = Path(__file__).with_name("sampler_verdicts.json")
KINDS = ("eps", "flow")
MEASURED_ON = {"eps": "the SD1.x demo model", "flow": "the Flux DiT demo model"}


def _verdicts() -> dict[str, dict]:
    try:
        data = json.loads(VERDICTS_FILE.read_text())
        flow = data.get("flow", {})
        return {kind: {part: dict(table.get(part, {})) for part in ("fails", "works", "verified")}
                for kind, table in (("eps", data), ("flow", flow))}
    except (OSError, ValueError):  # a damaged install: the per-scheduler refusals are missing, say so in the log
        logging.getLogger(__name__).warning("ReDi: %s is missing or unreadable; reinstall the pack", VERDICTS_FILE)
        return {kind: {"fails": {}, "works": {}, "verified": {}} for kind in KINDS}


VERDICTS = _verdicts()
# a sampler or scheduler no verdict covers (one a newer ComfyUI added) is refused until measured;
# scripts/sampler_support.py turns this off to measure it
REFUSE_UNMEASURED = True


def model_kind(model) -> str:
    """"flow" for a rectified-flow model (Flux, SD3, the DiT demo), "eps" for the rest (epsilon and v prediction)."""
    import comfy.model_sampling

    return "flow" if isinstance(model.get_model_object("model_sampling"), comfy.model_sampling.CONST) else "eps"


def check_sampler(sampler: str, scheduler: str | None = None, model=None) -> None:
    """Refuse samplers ReDi cannot split at a step (their own step choice) or cannot finish within tolerance.
    With the model, by the verdicts measured for its kind; without it (at queue time, before a model is
    known), only what every kind's verdicts refuse."""
    if sampler in RESTART_FAILS:
        raise KBError(
            f"sampler {sampler!r} does not work with ReDi: restarted at the value step without its multistep history it "
            f"ends far from the full run ({RESTART_FAILS[sampler]} PSNR from the same seed's full run even when the KB holds "
            f"the query's own trajectory, where 20 dB is the tolerance); use {WORKING_EXAMPLES}"
        )
    if sampler in OWN_STEPS:
        raise KBError(
            f"sampler {sampler!r} chooses its own time steps instead of the scheduler's, so there is no step k to retrieve at "
            f"and ReDi cannot use it; use a fixed-step sampler such as {WORKING_EXAMPLES}"
        )
    kinds = (model_kind(model),) if model is not None else KINDS
    refusals = [verdict_refusal(sampler, scheduler, kind) for kind in kinds]
    if all(refusals):
        raise KBError(refusals[0])


def _deciding_kind(sampler: str, scheduler: str | None, kind: str) -> str:
    """Whose verdicts decide this pair for a model of this kind: the flow ones where they cover the pair."""
    flow = VERDICTS["flow"]
    covered = scheduler is not None and (sampler in flow["works"].get(scheduler, ()) or scheduler in flow["fails"].get(sampler, {}))
    return "flow" if kind == "flow" and covered else "eps"


def verdict_refusal(sampler: str, scheduler: str | None, kind: str = "eps") -> str | None:
    """Why the measured verdicts refuse this sampler (with a scheduler: this pair) for models of this kind, or None."""
    deciding = _deciding_kind(sampler, scheduler, kind)
    table, on = VERDICTS[deciding], MEASURED_ON[deciding]
    fails = table["fails"].get(sampler, {})
    if "*" in fails:
        return (f"sampler {sampler!r} does not work with ReDi within tolerance ({fails['*']}, measured on "
                f"{on}; the tolerance is 2 points); use {WORKING_EXAMPLES}")
    if scheduler is not None and scheduler in fails:
        known = ("euler", "euler_ancestral", "heun", "dpmpp_2m")  # the familiar ones first
        verified = table.get("verified", {})
        works = sorted((s for s in verified.get(scheduler, []) if s != sampler), key=lambda s: (s not in known, s))[:5]
        others = [f"{s}/{k}" for k, per in sorted(verified.items()) for s in per if k != scheduler][:4]
        use = (f"use {', '.join(works)} with it, or another scheduler" if works else
               f"use another scheduler ({', '.join(others)} are verified)" if others else f"use another scheduler, or {WORKING_EXAMPLES}")
        return (f"sampler {sampler!r} with the {scheduler} scheduler does not work with ReDi within tolerance ({fails[scheduler]}, "
                f"measured on {on}; the tolerance is 20 dB, 2 points of accuracy and at most 1% of images under 15 dB); {use}")
    if deciding == "flow":  # measured on a flow model: that verdict is the whole answer
        return None
    if REFUSE_UNMEASURED and not measured(sampler, scheduler):
        works = VERDICTS["eps"]["works"].get(scheduler or "", [])
        use = ", ".join(w for w in ("euler", "euler_ancestral", "heun", "dpmpp_2m") if w in works) or WORKING_EXAMPLES
        what = f"sampler {sampler!r}" + (f" with the {scheduler} scheduler" if scheduler is not None else "")
        if scheduler is not None and not works and measured(sampler):  # a scheduler no verdict covers
            what, use = f"the {scheduler} scheduler", "the normal scheduler with euler, euler_ancestral or heun"
        return (f"{what} has not been measured with ReDi (this ComfyUI is newer than the pack's verdicts), so ReDi does not "
                f"use it yet; use {use}, or measure it with scripts/sampler_support.py --write-verdicts")
    return None


def unverified_reason(sampler: str, scheduler: str | None, model=None) -> str | None:
    """Why ReDi samples every item of this pair in full (the report's line), or None when the pair is
    verified per image for this model's kind (the flow table decides where it covers the pair). A pair
    that works by the grid's means but has not passed the per-image bar (at most 1% of images under
    15 dB, 96 items per regime with a 16-entry KB and 96 with a 1,000-entry one) is served with every
    item sampled in full: never a silently wrong image."""
    if scheduler is None:
        return None
    deciding = _deciding_kind(sampler, scheduler, model_kind(model) if model is not None else "eps")
    verified = VERDICTS[deciding]["verified"]
    if sampler in verified.get(scheduler, ()):
        return None
    known = [f"{s}/{k}" for k, per in sorted(verified.items()) for s in per if k == scheduler or s == sampler][:4]
    known = known or [f"{s}/{k}" for k, per in sorted(verified.items()) for s in per][:4]
    return (f"{sampler} with the {scheduler} scheduler is not verified per image on {MEASURED_ON[deciding]} (at most 1% of "
            f"images under 15 dB to their full run), so ReDi samples every image in full and skips no step; verified: "
            f"{', '.join(known) or 'none'} (docs/sampler_verification.md; verify a pair with scripts/sampler_support.py --verify)")


def measured(sampler: str, scheduler: str | None = None) -> bool:
    """Whether an epsilon verdict covers the sampler (with a scheduler: the pair)."""
    eps = VERDICTS["eps"]
    if scheduler is None:
        return sampler in eps["fails"] or any(sampler in w for w in eps["works"].values())
    return sampler in eps["works"].get(scheduler, ()) or bool({scheduler, "*"} & set(eps["fails"].get(sampler, {})))


def sampler_problem(sampler: str, scheduler: str | None = None, node: str | None = None) -> bool | str:
    """For the nodes' validate_inputs (a refusal at queue time): True or the message, which starts with
    the node's display name (ComfyUI's own validation report names the node by its id)."""
    try:
        check_sampler(sampler, scheduler)
    except KBError as e:
        return f"{node}: {e}" if node else str(e)
    return True
