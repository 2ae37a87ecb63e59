"""ReDi Sampler: trajectory retrieval as a SAMPLER for SamplerCustomAdvanced."""

from __future__ import annotations

import logging

import comfy.sampler_helpers
import comfy.samplers
import torch
from comfy_api.latest import io

from ..kb_tools.errors import KBError
from ..kb_tools.redi_loop import KeyState, ReDiParams, retrieve, summary_lines
from . import comfy_sampling, kb_types, redi_compat
from .redi_ksampler import redi_inputs


class ReDiSamplerImpl(comfy.samplers.Sampler):
    """Wraps a stock sampler: key phase on sigmas[:k+1], retrieval, finish on sigmas[v:]."""

    def __init__(self, sampler_name, kb, key_step, value_step, neighbours, key_space, max_key_distance, max_residual, content=None):
        self.inner_name = sampler_name
        self.kb = kb
        self.content = content
        self.opts = (key_step, value_step, neighbours, key_space, max_key_distance, max_residual)
        self.last_report: list[str] = []

    def max_denoise(self, model_wrap, sigmas):
        return comfy.samplers.sampler_object(self.inner_name).max_denoise(model_wrap, sigmas)

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None, disable_pbar=False):
        kb = self.kb
        fp = kb.fingerprint
        patcher = model_wrap.model_patcher
        steps = len(sigmas) - 1
        redi_compat.check_query(kb, patcher, tuple(noise.shape), steps, getattr(model_wrap, "cfg", fp.cfg), self.inner_name, None)
        expected = comfy_sampling.sigmas_for(patcher, fp.scheduler, fp.steps)
        if not torch.allclose(sigmas.float().cpu(), expected.float(), rtol=1e-4, atol=1e-5):
            raise KBError(f"the sigmas differ from the KB's schedule ({fp.scheduler}, {fp.steps} steps, denoise 1.0); feed ReDi from a scheduler node with those settings")
        if latent_image is not None and torch.count_nonzero(latent_image) > 0:
            raise KBError("ReDi Sampler samples from pure noise (txt2img): use an Empty Latent Image")
        params = redi_compat.resolve_params(kb, *self.opts[:5], self.opts[5], extra_args.get("seed", -1), noise.shape[0])
        k, v = params.key_step, params.value_step
        inner = comfy.samplers.sampler_object(self.inner_name)
        xs, ds = {}, {}

        def key_cb(i, x0, x, _n):
            xs[i], ds[i] = x.detach().float().cpu(), x0.detach().float().cpu()
            if callback is not None:
                callback(i, x0, x, steps)

        saved_conds = model_wrap.conds
        if self.content is not None:
            # the key phase runs under the content-only conditioning (zero-shot stylization)
            content = {"positive": comfy.sampler_helpers.convert_cond(self.content),
                       "negative": [c.copy() for c in model_wrap.original_conds.get("negative", [])]}
            model_wrap.conds = comfy.samplers.process_conds(model_wrap.inner_model, noise, content, patcher.load_device,
                                                            latent_image, denoise_mask, extra_args.get("seed"))
        try:
            x_k = inner.sample(model_wrap, sigmas[: k + 1], extra_args, key_cb, noise, latent_image, denoise_mask, disable_pbar)
        finally:
            model_wrap.conds = saved_conds
        state = KeyState.after_key_phase(x_k.float().cpu().numpy(), xs[k - 1].numpy(), ds[k - 1].numpy(), sigmas[k - 1])
        ret = retrieve(kb, state, params, sigma_v=float(sigmas[v]))
        out = x_k.clone()
        for start, idx, start_latents in ret.starts(state, params):
            src = torch.from_numpy(start_latents).to(x_k)

            def finish_cb(i, x0, x, _n, start=start):
                if callback is not None:
                    callback(i + start, x0, x, steps)

            args = dict(extra_args)
            out[idx] = inner.sample(model_wrap, sigmas[start:], args, finish_cb, torch.zeros_like(src), src,
                                    None if denoise_mask is None else denoise_mask[idx], disable_pbar)
        self.last_report = summary_lines(ret, params, steps)
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
    def execute(cls, sampler_name, kb, key_step, value_step, neighbours, key_space, max_key_distance, max_residual,
                content_positive=None) -> io.NodeOutput:
        ReDiParams(key_step, value_step, neighbours, "latent").validate(kb.fingerprint.steps, kb)
        impl = ReDiSamplerImpl(sampler_name, kb, key_step, value_step, neighbours, key_space, max_key_distance,
                               max_residual, content_positive)
        impl.report_node = cls.hidden.unique_id  # its report is shown on this node after sampling
        return io.NodeOutput(impl)
