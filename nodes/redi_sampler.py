"""ReDi Sampler: trajectory retrieval as a SAMPLER for SamplerCustomAdvanced."""

from __future__ import annotations

import logging

import comfy.sampler_helpers
import comfy.samplers
import torch
from comfy_api.latest import io

from .. import comfy_adapter
from ..comfy_adapter import kb_match, recording
from ..kb_tools.errors import KBError
from ..kb_tools.library import DEFAULT_CAP, Library, library_root
from ..redi_core import adaptive
from ..redi_core.landing import finish_groups
from ..redi_core.retrieval import GUARD_DEFAULTS, ReDiParams, retrieve, summary_lines
from . import kb_types
from .redi_ksampler import HELD, exploration, library_inputs, library_line, redi_inputs


class ReDiSamplerImpl(comfy.samplers.Sampler):
    """Wraps a stock sampler: key phase (sigmas[:k+1], or the whole schedule stopped at k for samplers
    whose first steps depend on it), retrieval, finish on sigmas[v:]. With a `library` (no KB), the KB
    that fits the run is found or created at sampling time (the sampler sees the model, schedule, cfg
    and negative conditioning only then), each item's value step follows its retrieval (`speed`), and
    with `learn` every item sampled in full is recorded into that KB."""

    def __init__(self, sampler_name, kb, key_step, value_step, neighbours, key_space, max_key_distance, max_residual, content=None,
                 max_weight_deviation=GUARD_DEFAULTS["max_weight_deviation"], library: Library | None = None,
                 speed: str = adaptive.FIXED, learn: bool = True, library_name: str = ""):
        self.inner_name = sampler_name
        self.kb = kb
        self.content = content
        self.opts = (key_step, value_step, neighbours, key_space, max_key_distance, max_residual)
        self.max_weight_deviation = max_weight_deviation
        self.library, self.speed, self.learn, self.library_name = library, speed, learn, library_name
        self.last_report: list[str] = []

    def max_denoise(self, model_wrap, sigmas):
        return comfy.samplers.sampler_object(self.inner_name).max_denoise(model_wrap, sigmas)

    def _library_kb(self, model_wrap, sigmas, noise, latent_image):
        """The library's KB that fits this run (created empty when none does), the KB opened for retrieval,
        and the scheduler the sigmas come from."""
        patcher = model_wrap.model_patcher
        scheduler = comfy_adapter.scheduler_of(patcher, self.inner_name, sigmas)
        if scheduler is None:
            raise KBError("ReDi Sampler with a library needs a stock schedule at denoise 1.0 (e.g. BasicScheduler): these sigmas "
                          "come from no stock scheduler, so no library KB can be chosen for them")
        comfy_adapter.check_sampler(self.inner_name, scheduler, patcher)
        if latent_image is not None and torch.count_nonzero(latent_image) > 0:
            raise KBError("ReDi Sampler samples from pure noise (txt2img): use an Empty Latent Image")
        fp = recording.run_fingerprint(patcher, tuple(noise.shape), self.inner_name, scheduler, len(sigmas) - 1,
                                       float(getattr(model_wrap, "cfg", 1.0)), model_wrap.original_conds.get("negative"))
        lkb = self.library.find_or_create(fp)
        return lkb, self.library.open(lkb), scheduler

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None, disable_pbar=False):
        if self.library is not None:
            return self._sample_library(model_wrap, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar)
        kb = self.kb
        fp = kb.fingerprint
        patcher = model_wrap.model_patcher
        steps = len(sigmas) - 1
        negative = model_wrap.original_conds.get("negative")
        # the sampler x scheduler verdict first, for the scheduler these sigmas come from
        scheduler = comfy_adapter.scheduler_of(patcher, self.inner_name, sigmas)
        if scheduler is not None:
            comfy_adapter.check_sampler(self.inner_name, scheduler, patcher)
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
        if self.speed != adaptive.FIXED:
            return self._sample_adaptive(model_wrap, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar,
                                         kb, None, self.speed, notes, scheduler or fp.scheduler)
        params = kb_match.resolve_params(kb, *self.opts[:6], extra_args.get("seed", -1), noise.shape[0], patcher,
                                         self.max_weight_deviation)
        k, v = params.key_step, params.value_step
        x_k, key, plan = self._key_phase(model_wrap, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar, k)
        state = comfy_adapter.key_state(key, k, sigmas)
        ret = retrieve(kb, state, params, sigma_v=float(sigmas[v]), noise=comfy_adapter.noise_levels_of(patcher, sigmas, k, v))
        hold = comfy_adapter.unverified_reason(self.inner_name, scheduler or fp.scheduler, patcher)
        if hold:
            ret.hold(HELD)
            notes = [f"ReDi: {hold}"] + notes
        out = self._finish(model_wrap, sigmas, extra_args, callback, x_k, plan, ret.starts(state, params), denoise_mask, disable_pbar,
                           checked=(ret, state, params))
        return self._report(out, summary_lines(ret, params, steps) + notes)

    def _key_phase(self, model_wrap, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar, k):
        """The first k steps (recorded), on the full run's noise; returns (x_k, the key Capture, the noise plan)."""
        patcher = model_wrap.model_patcher
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
        return x_k, key, plan

    def _finish(self, model_wrap, sigmas, extra_args, callback, x_k, plan, groups, denoise_mask, disable_pbar,
                record_from: int | None = None, captures: dict | None = None, checked: tuple | None = None):
        """Each group (start step, rows, start states) sampled from its start to the end; the group that
        starts at `record_from` is recorded into `captures[start]` (no extra model call). `checked`: the
        fixed path's (retrieval, key state, params), whose jumped items get the guard's landing check."""
        steps = len(sigmas) - 1
        out = x_k.clone()
        ms = model_wrap.inner_model.model_sampling

        def run(start, idx, start_states, landing):
            src = comfy_adapter.to_latent_image(ms, float(sigmas[start]), torch.from_numpy(start_states)).to(x_k)
            record = record_from is not None and start == record_from
            finish = comfy_adapter.Capture(self.inner_name, offset=start, record=record, noise=plan, rows=idx, landing=landing)
            if record and captures is not None:
                captures[start] = (finish, idx)

            def finish_cb(i, x0, x, _n):
                if callback is not None:
                    callback(i + start, x0, x, steps)

            out[idx] = finish.sample(model_wrap, sigmas[start:], dict(extra_args), finish_cb, torch.zeros_like(src), src,
                                     None if denoise_mask is None else denoise_mask[idx], disable_pbar)
            return finish.landed

        if checked is not None:
            finish_groups(run, list(groups), *checked)
        else:
            for start, idx, start_states in groups:
                run(start, idx, start_states, None)
        return out

    def _report(self, out, lines: list[str]):
        self.last_report = lines
        logging.info("[ReDi Sampler] %s", "\n".join(self.last_report))
        kb_types.send_report(getattr(self, "report_node", None), self.last_report)
        return out

    def _sample_library(self, model_wrap, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar):
        lkb, kb, scheduler = self._library_kb(model_wrap, sigmas, noise, latent_image)
        speed = adaptive.library_preset(self.speed)
        return self._sample_adaptive(model_wrap, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar,
                                     kb, lkb, speed, [], scheduler)

    def _sample_adaptive(self, model_wrap, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar,
                         kb, lkb, speed: str, notes: list[str], scheduler: str):
        """Each item's value step from its retrieval (a speed preset), on a connected KB or a library KB
        (`lkb`; then items sampled in full are recorded when learning)."""
        steps = len(sigmas) - 1
        stored = lkb.fingerprint.stored_steps if lkb is not None else kb.fingerprint.stored_steps
        k, tiers = adaptive.plan(speed, steps, stored, len(kb) if kb is not None else 0)
        record = (lkb is not None and self.learn and self.content is None and self.inner_name in recording.FINISH_EXACT
                  and denoise_mask is None)
        x_k, key, plan = self._key_phase(model_wrap, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar, k)
        state = comfy_adapter.key_state(key, k, sigmas)
        explore, spacing = exploration(lkb, kb, k, speed, record)
        ret = adaptive.retrieve_adaptive(kb, state, k, tiers, sigmas.float().cpu().tolist(), self.opts[2], self.max_weight_deviation,
                                         explore=explore, spacing=spacing)
        hold = comfy_adapter.unverified_reason(self.inner_name, scheduler, model_wrap.model_patcher)
        if hold:
            ret.hold(HELD, state)
            notes = [f"ReDi: {hold}"] + notes
        captures: dict = {}
        out = self._finish(model_wrap, sigmas, extra_args, callback, x_k, plan, ret.starts(), denoise_mask, disable_pbar,
                           record_from=k if record else None, captures=captures)
        lines = adaptive.summary_lines(ret, speed, tiers, steps, explore)
        if lkb is None:
            return self._report(out, lines + notes)
        recorded = 0
        if k in captures:
            fin, idx = captures[k]
            got = recording.finished_rows(key, fin, k, lkb.fingerprint.stored_steps, idx)
            if got is not None:
                sigs = recording.item_signatures(model_wrap.original_conds["positive"], noise.shape[0])
                recording.submit(self.library, lkb, got[0], got[1], [sigs[i] for i in idx], int(extra_args.get("seed", 0) or 0),
                                 idx.tolist())
                recorded = len(idx)
        first = library_line(self.library_name, lkb, kb, record, recorded, self.learn, self.inner_name, self.content is not None,
                             "stock sampler")
        return self._report(out, [first] + lines + notes)


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
                *redi_inputs(kb_optional=True),
                io.Conditioning.Input("content_positive", optional=True, tooltip="Optional content-only conditioning (from ReDi Style Split) for the first k steps and the retrieval; the guider's conditioning drives the rest (zero-shot stylization)."),
                *[i for i in library_inputs() if i.id != "store_prompt_text"],  # the sampler has no prompt input to read text from
            ],
            outputs=[io.Sampler.Output(tooltip="Connect to SamplerCustomAdvanced's sampler input.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, sampler_name) -> bool | str:
        return comfy_adapter.sampler_problem(sampler_name, node="ReDi Sampler")

    @classmethod
    def execute(cls, sampler_name, key_step, value_step, neighbours, key_space, max_key_distance, max_residual, kb=None,
                content_positive=None, max_weight_deviation=GUARD_DEFAULTS["max_weight_deviation"], library="", speed=adaptive.FIXED,
                learn=True, max_trajectories=DEFAULT_CAP) -> io.NodeOutput:
        comfy_adapter.check_sampler(sampler_name)
        lib = None
        if library.strip():
            lib = Library(library_root(kb_types.kb_roots()[0], library.strip()), max_trajectories)
            kb = None  # the library's KB is chosen per run, when the sampler sees the schedule, cfg and negative prompt
        elif kb is None:
            raise KBError("ReDi Sampler needs a knowledge base: connect ReDi KB Loader to `kb`, or name a library in `library` (e.g. my_library)")
        elif speed == adaptive.FIXED:
            ReDiParams(key_step, value_step, neighbours, "latent", max_key_distance, max_residual, max_weight_deviation).validate(kb.fingerprint.steps, kb)
        else:
            adaptive.plan(speed, kb.fingerprint.steps, kb.fingerprint.stored_steps)  # refuses a KB with no value step after the key step
        impl = ReDiSamplerImpl(sampler_name, kb, key_step, value_step, neighbours, key_space, max_key_distance,
                               max_residual, content_positive, max_weight_deviation, lib, speed, learn, library.strip())
        impl.report_node = kb_types.node_id_of(cls)  # its report is shown on this node after sampling
        return io.NodeOutput(impl)
