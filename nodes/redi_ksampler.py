"""ReDi KSampler: the stock KSampler, split at the key step, with trajectory retrieval."""

from __future__ import annotations

import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import torch
from comfy_api.latest import io

from .. import comfy_adapter
from ..comfy_adapter import kb_match, recording
from ..kb_tools.errors import KBError
from ..kb_tools.library import DEFAULT_CAP, Library, library_root
from ..redi_core import adaptive
from ..redi_core.landing import finish_groups
from ..redi_core.retrieval import GUARD_DEFAULTS, retrieve, summary_lines
from . import kb_types

HELD = "this sampler and scheduler are not verified per image (see the first line)"


def redi_inputs(kb_optional: bool = False) -> list:
    """Inputs shared by ReDi KSampler and ReDi Sampler."""
    return [
        kb_types.KBType.Input("kb", optional=kb_optional, tooltip="Knowledge base from ReDi KB Builder or ReDi KB Loader (same model, size, sampler, scheduler, steps, cfg)."
                              + (" Leave it unconnected when a library is named below." if kb_optional else "")),
        io.Int.Input("key_step", default=4, min=1, max=1000, tooltip="Steps sampled before retrieval (k). Later keys match more precisely but skip less. Must be a stored step of the KB."),
        io.Int.Input("value_step", default=10, min=2, max=1000, tooltip="Step the blended neighbours jump to (v > k). Steps k..v are skipped: more skipping is faster and drifts further from the full result. Must be a stored step. Where the scheduler leaves little noise at v (e.g. karras or exponential at 20 steps, v=10), the guard uses only close neighbours and samples the rest in full (the report says so)."),
        io.Int.Input("neighbours", default=1, min=1, max=64, tooltip="Neighbours H blended with least-squares weights. 1 rescales the nearest trajectory (the authors' setting)."),
        io.Combo.Input("key_space", options=kb_match.KEY_SPACE_OPTIONS, default="auto", tooltip="denoised: match the model's denoised estimates and re-noise with this seed's own noise (any seed). latent: match noisy latents (the paper's setting; needs the KB's seed). auto: the space verified per image: denoised, except at the KB's own seed on a flow model (Flux, SD3), where latent keys measured better (docs/how_redi_works.md)."),
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
                *redi_inputs(kb_optional=True),
                io.Conditioning.Input("content_positive", optional=True, tooltip="Optional content-only conditioning (from ReDi Style Split) for the first k steps and the retrieval; the full prompt then drives the rest (zero-shot stylization)."),
                *library_inputs(),
            ],
            outputs=[io.Latent.Output(tooltip="The sampled latent.")],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt],
        )

    @classmethod
    def validate_inputs(cls, sampler_name, scheduler) -> bool | str:
        return comfy_adapter.sampler_problem(sampler_name, scheduler, node="ReDi KSampler")

    @classmethod
    def execute(cls, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, key_step,
                value_step, neighbours, key_space, max_key_distance, max_residual, kb=None, content_positive=None,
                max_weight_deviation=GUARD_DEFAULTS["max_weight_deviation"], library="", speed=adaptive.FIXED, learn=True,
                max_trajectories=DEFAULT_CAP, store_prompt_text=False) -> io.NodeOutput:
        latent = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])
        if latent_image.get("noise_mask") is not None or torch.count_nonzero(latent) > 0:
            raise ValueError("ReDi KSampler samples from pure noise (txt2img): connect an Empty Latent Image; for img2img use the stock KSampler")
        lib = lkb = None
        notes: list[str] = []
        if library.strip():
            lib = Library(library_root(kb_types.kb_roots()[0], library.strip()), max_trajectories)
            fp = recording.run_fingerprint(model, tuple(latent.shape), sampler_name, scheduler, steps, cfg, negative)
            comfy_adapter.check_sampler(sampler_name, scheduler, model)
            lkb = lib.find_or_create(fp)
            if lkb.count == 0:  # a new (or still empty) library KB: every KB Loader may list it now
                kb_types.send_kb_list()
            kb = lib.open(lkb)
            speed = adaptive.library_preset(speed)
        elif kb is None:
            raise KBError("ReDi KSampler needs a knowledge base: connect ReDi KB Loader to `kb`, or name a library in `library` (e.g. my_library)")
        else:
            notes = kb_match.check_query(kb, model, tuple(latent.shape), steps, cfg, sampler_name, scheduler, negative)
        record = lib is not None and learn and content_positive is None and sampler_name in recording.FINISH_EXACT
        counter = NFECounter()
        counted = counter.attach(model)
        phases = comfy_adapter.Phases(counted, steps, cfg, sampler_name, scheduler, negative)
        noise = comfy.sample.prepare_noise(latent, seed)
        key_positive = content_positive if content_positive is not None else positive
        hold = comfy_adapter.unverified_reason(sampler_name, scheduler, model)  # a pair not verified per image: all in full
        if speed == adaptive.FIXED:
            params = kb_match.resolve_params(kb, key_step, value_step, neighbours, key_space, max_key_distance, max_residual, seed,
                                             latent.shape[0], model, max_weight_deviation)
            state = phases.key_phase(key_positive, latent, noise, seed, params.key_step)
            key_calls = counter.calls
            ret = retrieve(kb, state, params, sigma_v=float(phases.sigmas[params.value_step]),
                           noise=comfy_adapter.noise_levels_of(model, phases.sigmas, params.key_step, params.value_step))
            if hold:
                ret.hold(HELD)
            groups = [(start, idx, src) for start, idx, src in ret.starts(state, params)]
            k = params.key_step
        else:
            stored = lkb.fingerprint.stored_steps if lkb is not None else kb.fingerprint.stored_steps
            k, tiers = adaptive.plan(speed, steps, stored, len(kb) if kb is not None else 0)
            state = phases.key_phase(key_positive, latent, noise, seed, k)
            key_calls = counter.calls
            explore, spacing = exploration(lkb, kb, k, speed, record)
            ret = adaptive.retrieve_adaptive(kb, state, k, tiers, phases.sigmas.float().tolist(), neighbours, max_weight_deviation,
                                             explore=explore, spacing=spacing)
            if hold:
                ret.hold(HELD, state)
            groups = list(ret.starts())
        out = torch.zeros(latent.shape)
        recorded = 0

        def run(start, idx, src, landing):
            nonlocal recorded
            cap = phases.finish_capture(start, idx) if record and start == k else None
            out[idx] = phases.finish(positive, src, start, seed, rows=idx, record=cap, landing=landing).float().cpu()
            if cap is not None:
                got = recording.finished_rows(phases.key_capture, cap, k, lkb.fingerprint.stored_steps, idx)
                if got is not None:
                    sigs = recording.item_signatures(positive, latent.shape[0])
                    text = kb_types.prompt_text_of(cls, "positive") if store_prompt_text else None
                    recording.submit(lib, lkb, got[0], got[1], [sigs[i] for i in idx], seed, idx.tolist(), [text] * len(idx))
                    recorded += len(idx)
            return phases.last_finish.landed

        if speed == adaptive.FIXED:
            finish_groups(run, groups, ret, state, params)
            lines = summary_lines(ret, params, steps)
        else:
            for start, idx, src in groups:
                run(start, idx, src, None)
            lines = adaptive.summary_lines(ret, speed, tiers, steps, explore)
        if hold:
            lines = [f"ReDi: {hold}"] + lines
        if lib is not None:
            lines = [library_line(library.strip(), lkb, kb, record, recorded, learn, sampler_name, content_positive is not None,
                                  "stock KSampler")] + lines
        lines += [nfe_line(counter.calls, key_calls, sampler_name, k)] + notes
        result = dict(latent_image)
        result["samples"] = out
        return io.NodeOutput(result, ui=kb_types.report(lines))


def library_inputs() -> list:
    return [
        io.String.Input("library", default="", optional=True, tooltip="Work from a KB library instead of a connected KB: a folder name under models/redi_kb. For each run it uses the KB that fits the model, sampler, scheduler, steps, cfg, size and negative prompt, and creates an empty one when none does. Empty: use the connected KB (as before)."),
        io.Combo.Input("speed", options=adaptive.PRESET_OPTIONS, default=adaptive.FIXED, optional=True, tooltip="Speed vs fidelity: each image's value step follows how close its nearest stored trajectory is (close: jump further; far: less; poor: sample in full). fidelity skips least, speed most; fidelity and balanced are measured within the quality targets, speed puts a few more images far from the full run. On a KB of 5,000 or more trajectories balanced and speed jump further (measured). 'fixed k/v' uses key_step and value_step for every image (with a library: fidelity)."),
        io.Boolean.Input("learn", default=True, optional=True, tooltip="With a library: add every image sampled in full (an empty or sparse KB, the guard's fallback) to the library's KB as it finishes, at no extra UNet call. Images that jumped are never added. While learning, the library also explores: it samples in full (and records) every image while its KB is small (under 100 trajectories with balanced or speed) and an image whose nearest stored trajectory is much farther than the KB's usual spacing."),
        io.Boolean.Input("store_prompt_text", default=False, optional=True, tooltip="With learn: store the prompt text of the CLIPTextEncode wired into `positive` with each recorded trajectory (shown in the report's neighbour lines). Off (the default): store only a conditioning signature hash, so the library can be shared without your prompts."),
        io.Int.Input("max_trajectories", default=DEFAULT_CAP, min=2, max=10_000_000, optional=True, tooltip="Size cap of each library KB. At the cap the library starts a new generation of the KB that keeps a coverage-preserving half of the old one (the format cannot delete entries); `python -m kb_tools library prune` removes old generations."),
    ]


def library_line(name: str, lkb, kb, record: bool, recorded: int, learn: bool, sampler_name: str, has_content: bool,
                 stock: str) -> str:
    """The report's first line with a library: which KB it used, its size, and whether (or why not) this run recorded."""
    held = 0 if kb is None else len(kb)
    learn_note = (f"recording {recorded} full trajectories (in the background)" if record else
                  "not recording" + ("" if learn else " (learn is off)") +
                  ("" if sampler_name in recording.FINISH_EXACT else f" ({sampler_name} has a multistep history: use ReDi Record on a {stock})") +
                  (" (content conditioning: the key phase is not the full prompt's)" if has_content else ""))
    return f"library {name}: KB {lkb.name}, {held} trajectories; {learn_note}"


def exploration(lkb, kb, key_step: int, preset: str, record: bool) -> tuple[adaptive.Exploration | None, float | None]:
    """The preset's exploration rule and the KB's spacing, for a library that records this run
    (exploring without recording would cost UNet calls for nothing): (None, None) otherwise."""
    if not record or lkb is None:
        return None, None
    explore = adaptive.EXPLORATION[preset]
    spacing = None
    if kb is not None and explore.density_applies(len(kb)):
        spacing = adaptive.SPACING.get(kb, key_step, str(lkb.path))
    return explore, spacing


def nfe_line(total: int, key_calls: int, sampler: str, k: int) -> str:
    """The UNet calls this run really made (no estimate of a full run's count)."""
    extra = "" if comfy_adapter.stop_step_for(sampler, k) is None else f", the whole schedule run to step {k} as the KB's trajectory"
    return f"UNet calls: {total} (key phase {key_calls}{extra}; finish {total - key_calls})"
