"""ReDi KSampler: the stock KSampler, split at the key step, with trajectory retrieval."""

from __future__ import annotations

import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import torch
from comfy_api.latest import io

from .. import comfy_adapter
from ..comfy_adapter import kb_match
from ..redi_core.retrieval import GUARD_DEFAULTS, retrieve, summary_lines
from . import kb_types


def redi_inputs() -> list:
    """Inputs shared by ReDi KSampler and ReDi Sampler."""
    return [
        kb_types.KBType.Input("kb", tooltip="Knowledge base from ReDi KB Builder or ReDi KB Loader (same model, size, sampler, scheduler, steps, cfg)."),
        io.Int.Input("key_step", default=4, min=1, max=1000, tooltip="Steps sampled before retrieval (k). Later keys match more precisely but skip less. Must be a stored step of the KB."),
        io.Int.Input("value_step", default=10, min=2, max=1000, tooltip="Step the blended neighbours jump to (v > k). Steps k..v are skipped: more skipping is faster and drifts further from the full result. Must be a stored step. Where the scheduler leaves little noise at v (e.g. karras or exponential at 20 steps, v=10), the guard uses only close neighbours and samples the rest in full (the report says so)."),
        io.Int.Input("neighbours", default=1, min=1, max=64, tooltip="Neighbours H blended with least-squares weights. 1 rescales the nearest trajectory (the authors' setting)."),
        io.Combo.Input("key_space", options=kb_match.KEY_SPACE_OPTIONS, default="auto", tooltip="latent: match noisy latents (the paper; needs the KB's seed). denoised: match the model's denoised estimates and re-noise with this seed's own noise (any seed). auto: latent when the seed is the KB's fixed seed, else denoised."),
        io.Float.Input("max_key_distance", default=GUARD_DEFAULTS["max_key_distance"], min=0.0, max=10.0, step=0.01,
                       tooltip="Quality guard: when the nearest key is farther than this (relative to the query's norm), the item is sampled in full from the key step instead, and the report says so. The default is calibrated on the demo model (docs/how_redi_works.md); 0 turns the guard's distance checks off, the noise-level check included."),
        io.Float.Input("max_residual", default=GUARD_DEFAULTS["max_residual"], min=0.0, max=10.0, step=0.01,
                       tooltip="Quality guard: when the least-squares blend misses the query by more than this (relative, 0..1), the item is sampled in full from the key step. 0 (the default) turns this check off: on the demo model good new-seed retrievals reach 0.99, so it separates nothing there; useful with H > 1."),
        io.Float.Input("max_weight_deviation", default=GUARD_DEFAULTS["max_weight_deviation"], min=0.0, max=100.0, step=0.01, optional=True,
                       tooltip="Quality guard: when the blend weights sum further than this from 1 (with H=1: the nearest trajectory rescaled by far more or less than 1, a sign of a mismatched trajectory), the item is sampled in full from the key step. 0 turns this check off."),
    ]


class NFECounter:
    """Counts the UNet evaluations of one sampling run (an APPLY_MODEL wrapper)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, executor, *args, **kwargs):
        self.calls += 1
        return executor(*args, **kwargs)

    def attach(self, model):
        m = model.clone()
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "redi_nfe_counter", self)
        return m


class ReDiKSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ReDiKSampler",
            display_name="ReDi KSampler",
            category="ReDi/sampling",
            description="KSampler with trajectory retrieval (ReDi): samples the first k steps, blends the nearest stored "
            "trajectories at step v, skips the steps between and finishes with the same sampler.",
            inputs=[
                io.Model.Input("model", tooltip="The model the knowledge base was built with."),
                io.Int.Input("seed", default=1024, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True, tooltip="Noise seed. The KB's own fixed seed gives the closest matches."),
                io.Int.Input("steps", default=20, min=2, max=1000, tooltip="Total steps; must equal the KB's."),
                io.Float.Input("cfg", default=6.0, min=0.0, max=100.0, step=0.1, round=0.01, tooltip="Guidance scale; must equal the KB's."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler", tooltip="Stock sampler for both phases; must equal the KB's."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="normal", tooltip="Scheduler; must equal the KB's."),
                io.Conditioning.Input("positive", tooltip="Prompt conditioning for the steps after retrieval (and before it when no content conditioning is given)."),
                io.Conditioning.Input("negative", tooltip="Negative conditioning (use the KB's negative prompt)."),
                io.Latent.Input("latent_image", tooltip="Empty latent of the KB's size (txt2img; ReDi starts from pure noise)."),
                *redi_inputs(),
                io.Conditioning.Input("content_positive", optional=True, tooltip="Optional content-only conditioning (from ReDi Style Split) for the first k steps and the retrieval; the full prompt then drives the rest (zero-shot stylization)."),
            ],
            outputs=[io.Latent.Output(tooltip="The sampled latent.")],
        )

    @classmethod
    def validate_inputs(cls, sampler_name, scheduler) -> bool | str:
        return comfy_adapter.sampler_problem(sampler_name, scheduler, node="ReDi KSampler")

    @classmethod
    def execute(cls, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, kb, key_step,
                value_step, neighbours, key_space, max_key_distance, max_residual, content_positive=None,
                max_weight_deviation=GUARD_DEFAULTS["max_weight_deviation"]) -> io.NodeOutput:
        latent = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])
        notes = kb_match.check_query(kb, model, tuple(latent.shape), steps, cfg, sampler_name, scheduler, negative)
        if latent_image.get("noise_mask") is not None or torch.count_nonzero(latent) > 0:
            raise ValueError("ReDi KSampler samples from pure noise (txt2img): connect an Empty Latent Image; for img2img use the stock KSampler")
        params = kb_match.resolve_params(kb, key_step, value_step, neighbours, key_space, max_key_distance, max_residual, seed,
                                            latent.shape[0], max_weight_deviation)
        counter = NFECounter()
        counted = counter.attach(model)
        phases = comfy_adapter.Phases(counted, steps, cfg, sampler_name, scheduler, negative)
        noise = comfy.sample.prepare_noise(latent, seed)
        state = phases.key_phase(content_positive if content_positive is not None else positive, latent, noise, seed, params.key_step)
        key_calls = counter.calls
        ret = retrieve(kb, state, params, sigma_v=float(phases.sigmas[params.value_step]),
                       noise=comfy_adapter.noise_levels_of(model, phases.sigmas, params.key_step, params.value_step))
        out = torch.zeros(latent.shape)
        for start, idx, src in ret.starts(state, params):
            out[idx] = phases.finish(positive, src, start, seed, rows=idx).float().cpu()
        lines = summary_lines(ret, params, steps) + [nfe_line(counter.calls, key_calls, sampler_name, params.key_step)] + notes
        result = dict(latent_image)
        result["samples"] = out
        return io.NodeOutput(result, ui=kb_types.report(lines))


def nfe_line(total: int, key_calls: int, sampler: str, k: int) -> str:
    """The UNet calls this run really made (no estimate of a full run's count)."""
    extra = "" if comfy_adapter.stop_step_for(sampler, k) is None else f", the whole schedule run to step {k} as the KB's trajectory"
    return f"UNet calls: {total} (key phase {key_calls}{extra}; finish {total - key_calls})"
