"""ReDi Sampler: trajectory retrieval as a SAMPLER for SamplerCustomAdvanced."""

from __future__ import annotations

import logging

import comfy.sampler_helpers
import comfy.samplers
import torch
from comfy_api.latest import io

from .. import comfy_adapter
from ..comfy_adapter import kb_match
from ..kb_tools.errors import KBError
from ..redi_core.retrieval import GUARD_DEFAULTS, ReDiParams, retrieve, summary_lines
from . import kb_types
from .redi_ksampler import redi_inputs


class ReDiSamplerImpl(comfy.samplers.Sampler):
    """Wraps a stock sampler: key phase (sigmas[:k+1], or the whole schedule stopped at k for samplers
    whose first steps depend on it), retrieval, finish on sigmas[v:]."""

    def __init__(self, sampler_name, kb, key_step, value_step, neighbours, key_space, max_key_distance, max_residual, content=None,
                 max_weight_deviation=GUARD_DEFAULTS["max_weight_deviation"]):
        self.inner_name = sampler_name
        self.kb = kb
        self.content = content
        self.opts = (key_step, value_step, neighbours, key_space, max_key_distance, max_residual)
        self.max_weight_deviation = max_weight_deviation
        self.last_report: list[str] = []

    def max_denoise(self, model_wrap, sigmas):
        return comfy.samplers.sampler_object(self.inner_name).max_denoise(model_wrap, sigmas)

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None, disable_pbar=False):
        kb = self.kb
        fp = kb.fingerprint
        patcher = model_wrap.model_patcher
        steps = len(sigmas) - 1
        negative = model_wrap.original_conds.get("negative")
        # the sampler x scheduler verdict first, for the scheduler these sigmas come from
        scheduler = comfy_adapter.scheduler_of(patcher, self.inner_name, sigmas)
        if scheduler is not None:
            comfy_adapter.check_sampler(self.inner_name, scheduler)
        notes = kb_match.check_query(kb, patcher, tuple(noise.shape), steps, getattr(model_wrap, "cfg", fp.cfg), self.inner_name,
                                     scheduler, negative)
        expected = comfy_adapter.ksampler_sigmas(patcher, fp.sampler, fp.scheduler, fp.steps)
        if sigmas.shape != expected.shape or not torch.allclose(sigmas.float().cpu(), expected.float(), rtol=1e-4, atol=1e-5):
            extra = (f" ({fp.sampler} in the stock KSampler drops the penultimate sigma of a {fp.steps + 1}-step schedule; "
                     "use ReDi KSampler for this KB)") if fp.sampler in comfy.samplers.KSampler.DISCARD_PENULTIMATE_SIGMA_SAMPLERS else ""
            raise KBError(f"the sigmas differ from the KB's schedule ({fp.scheduler}, {fp.steps} steps, denoise 1.0){extra}; "
                          "feed ReDi from a scheduler node with those settings")
        if latent_image is not None and torch.count_nonzero(latent_image) > 0:
            raise KBError("ReDi Sampler samples from pure noise (txt2img): use an Empty Latent Image")
        params = kb_match.resolve_params(kb, *self.opts[:5], self.opts[5], extra_args.get("seed", -1), noise.shape[0],
                                            self.max_weight_deviation)
        k, v = params.key_step, params.value_step
        stop = comfy_adapter.stop_step_for(self.inner_name, k)
        plan = comfy_adapter.NoisePlan(self.inner_name, sigmas, extra_args.get("seed", 0), noise.shape[0])
        key = comfy_adapter.Capture(self.inner_name, stop_at=stop, noise=plan)

        saved_conds = model_wrap.conds
        if self.content is not None:
            # the key phase runs under the content-only conditioning (zero-shot stylization)
            content = {"positive": comfy.sampler_helpers.convert_cond(self.content),
                       "negative": [c.copy() for c in model_wrap.original_conds.get("negative", [])]}
            model_wrap.conds = comfy.samplers.process_conds(model_wrap.inner_model, noise, content, patcher.load_device,
                                                            latent_image, denoise_mask, extra_args.get("seed"))
        try:
            x_k = key.sample(model_wrap, sigmas if stop else sigmas[: k + 1], dict(extra_args), callback, noise, latent_image,
                             denoise_mask, disable_pbar)
        finally:
            model_wrap.conds = saved_conds
        state = comfy_adapter.key_state(key, k, sigmas)
        ret = retrieve(kb, state, params, sigma_v=float(sigmas[v]), noise=comfy_adapter.noise_levels_of(patcher, sigmas, k, v))
        out = x_k.clone()
        ms = model_wrap.inner_model.model_sampling
        for start, idx, start_states in ret.starts(state, params):
            src = comfy_adapter.to_latent_image(ms, float(sigmas[start]), torch.from_numpy(start_states)).to(x_k)
            finish = comfy_adapter.Capture(self.inner_name, offset=start, record=False, noise=plan, rows=idx)

            def finish_cb(i, x0, x, _n, start=start):
                if callback is not None:
                    callback(i + start, x0, x, steps)

            out[idx] = finish.sample(model_wrap, sigmas[start:], dict(extra_args), finish_cb, torch.zeros_like(src), src,
                                     None if denoise_mask is None else denoise_mask[idx], disable_pbar)
        self.last_report = summary_lines(ret, params, steps) + notes
        logging.info("[ReDi Sampler] %s", "\n".join(self.last_report))
        kb_types.send_report(getattr(self, "report_node", None), self.last_report)
        return out


class ReDiSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ReDiSampler",
            display_name="ReDi Sampler",
            category="ReDi/sampling",
            description="A SAMPLER for SamplerCustomAdvanced that adds trajectory retrieval (ReDi) to a stock sampler. "
            "Feed it the KB's scheduler and steps (e.g. BasicScheduler) and a guider with the KB's cfg.",
            inputs=[
                io.Combo.Input("sampler_name", options=comfy.samplers.SAMPLER_NAMES, default="euler", tooltip="Stock sampler for both phases; must equal the KB's."),
                *redi_inputs(),
                io.Conditioning.Input("content_positive", optional=True, tooltip="Optional content-only conditioning (from ReDi Style Split) for the first k steps and the retrieval; the guider's conditioning drives the rest (zero-shot stylization)."),
            ],
            outputs=[io.Sampler.Output(tooltip="Connect to SamplerCustomAdvanced's sampler input.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, sampler_name) -> bool | str:
        return comfy_adapter.sampler_problem(sampler_name, node="ReDi Sampler")

    @classmethod
    def execute(cls, sampler_name, kb, key_step, value_step, neighbours, key_space, max_key_distance, max_residual,
                content_positive=None, max_weight_deviation=GUARD_DEFAULTS["max_weight_deviation"]) -> io.NodeOutput:
        comfy_adapter.check_sampler(sampler_name)
        ReDiParams(key_step, value_step, neighbours, "latent", max_key_distance, max_residual, max_weight_deviation).validate(kb.fingerprint.steps, kb)
        impl = ReDiSamplerImpl(sampler_name, kb, key_step, value_step, neighbours, key_space, max_key_distance,
                               max_residual, content_positive, max_weight_deviation)
        impl.report_node = kb_types.node_id_of(cls)  # its report is shown on this node after sampling
        return io.NodeOutput(impl)
