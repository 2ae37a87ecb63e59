"""ReDi FeatureReuse: FRDiff as a model patcher (object patches + wrappers on a clone)."""

from __future__ import annotations

import logging

import comfy.patcher_extension
from comfy.ldm.modules.attention import SpatialTransformer
from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock
from comfy_api.latest import io

from ..redi_core.frdiff import (
    SCHEDULES,
    CachedDiTBlock,
    CachedFirstConv,
    CachedTransformer,
    FRDiffConfig,
    FRDiffState,
    step_index,
    unwrap,
)
from . import kb_types

WRAPPER_KEY = "redi_frdiff"
PARTS = ("input", "middle", "output")


def _parts(text: str) -> set[str]:
    parts = {p.strip() for p in text.split(",") if p.strip()}
    bad = parts - set(PARTS)
    if bad or not parts:
        raise ValueError(f"parts must be a comma-separated subset of {', '.join(PARTS)}, not {text!r}")
    return parts


def find_blocks(diffusion_model, kinds: str, parts: set[str]) -> list[tuple[str, str, object]]:
    """(kind, path, module) of every reusable block of a UNet. A block that a FeatureReuse
    patch stands in for (on this model or on another patcher of the same weights that is
    loaded now) counts as the block it wraps."""
    out = []
    for path, mod in diffusion_model.named_modules():
        part = path.split("_", 1)[0]
        if part not in parts:
            continue
        mod = unwrap(mod)
        if isinstance(mod, ResBlock) and kinds in ("all", "resblocks") and not mod.updown:
            out.append(("resblock", path, mod))
        elif isinstance(mod, SpatialTransformer) and kinds in ("all", "transformers"):
            out.append(("transformer", path, mod))
    return out


def find_dit_blocks(diffusion_model, kinds: str, parts: set[str]) -> list[tuple[str, int]]:
    """("double_block" | "single_block", index) of every reusable block of a DiT (Flux:
    double and single stream blocks; SD3: joint blocks). The parts map to the first,
    middle and last third of the block sequence."""
    if kinds == "resblocks":
        return []
    doubles = getattr(diffusion_model, "double_blocks", None) or getattr(diffusion_model, "joint_blocks", None) or []
    singles = getattr(diffusion_model, "single_blocks", None) or []
    seq = [("double_block", i) for i in range(len(doubles))] + [("single_block", i) for i in range(len(singles))]
    n = len(seq)
    return [b for j, b in enumerate(seq) if PARTS[min(3 * j // max(n, 1), 2)] in parts]


def _transformer_handler(layer, x, emb, context, transformer_options, *args):
    out = layer.run(x, context, transformer_options)
    if "transformer_index" in transformer_options:
        transformer_options["transformer_index"] += 1
    return out


class _Wrappers:
    def __init__(self, state: FRDiffState, model_sampling) -> None:
        self.state = state
        self.t_max = float(model_sampling.timestep(model_sampling.sigma_max))
        self.model_sampling = model_sampling
        self.report_node: str | None = None  # the node that shows the report after sampling
        # every sampling pass of the prompt being executed (a ReDi KSampler's key phase and finish,
        # the passes of a two-pass graph), reported together; a new prompt starts a new list
        self.prompt_id: str | None = None
        self.passes: list[dict] = []

    def outer_sample(self, executor, *args, **kwargs):
        guider = getattr(executor, "class_obj", None)
        if "easycache" in getattr(guider, "model_options", {}).get("transformer_options", {}):
            raise ValueError(
                "FeatureReuse and EasyCache/LazyCache are both on this model: each skips UNet work from its own cache and "
                "judges its skips by outputs the other has already approximated, so their errors compound (on the demo "
                "model the stack drifts 2-2.5x further from the full run than either alone). Keep one of them: remove the "
                "EasyCache/LazyCache node or the ReDi FeatureReuse node."
            )
        self.state.reset()
        try:
            return executor(*args, **kwargs)
        finally:
            c, st = self.state.calls, self.state
            total = sum(c.values())
            if total:
                logging.info(
                    "[ReDi FeatureReuse] %d UNet calls: %d keyframes, %d with reused blocks, %d jumps (no network call); blocks reused %s",
                    total, c["key"], c["reuse"], c["jump"], dict(st.skipped),
                )
                pid = kb_types.current_prompt_id()
                if pid is None or pid != self.prompt_id:
                    self.prompt_id, self.passes = pid, []
                self.passes.append(dict(c))
                kb_types.send_report(self.report_node, report_lines(self.passes))
            self.state.drop_caches()

    def diffusion_model(self, executor, x, timesteps, *args, **kwargs):
        # UNets and DiTs pass transformer_options at different positions; find it by its content
        opts = kwargs.get("transformer_options")
        if opts is None:
            opts = next((a for a in reversed(args) if isinstance(a, dict) and "sigmas" in a), {})
        step, r = 0, 0.0  # no sigma known: a keyframe
        if "sigmas" in opts:
            sigma = opts["sigmas"].flatten()[0]
            step = step_index(opts.get("sample_sigmas"), float(sigma))
            r = 1.0 - float(self.model_sampling.timestep(sigma)) / max(self.t_max, 1e-8)
        key = (tuple(opts.get("cond_or_uncond", ())), tuple(x.shape), x.dtype, x.device)
        if self.state.begin_call(step, r, key, x) == "jump":
            return self.state.keyframe_score().clone()
        out = executor(x, timesteps, *args, **kwargs)
        return self.state.end_call(out)


def report_lines(passes: list[dict]) -> list[str]:
    """FeatureReuse's report: the UNet calls of every sampling pass of one prompt (a ReDi KSampler's
    key phase and finish, both passes of a two-pass graph), their sum first."""
    total = {k: sum(p[k] for p in passes) for k in ("key", "reuse", "jump")}
    n = sum(total.values())
    head = f"{n} UNet calls" + (f" in {len(passes)} sampling passes" if len(passes) > 1 else "")
    lines = [f"{head}: {total['key']} full keyframes, {total['reuse']} with reused blocks,",
             f"{total['jump']} answered from the cached score (no network call)"]
    if len(passes) > 1:
        lines += [f"pass {i}: {sum(p.values())} calls ({p['key']} keyframes, {p['reuse']} reused, {p['jump']} cached score)"
                  for i, p in enumerate(passes, 1)]
    return lines


class ReDiFeatureReuse(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ReDiFeatureReuse",
            display_name="ReDi FeatureReuse (FRDiff)",
            category="ReDi/model patches",
            description="Training-free speed-up (FRDiff): between keyframe steps, UNet blocks reuse their cached features "
            "and the score is mixed with the last keyframe's. Works on SD1.x/SDXL UNets and Flux/SD3 DiTs (whose transformer "
            "blocks reuse what they added at the last keyframe); interval 1 returns the model unchanged.",
            inputs=[
                io.Model.Input("model", tooltip="A UNet model (SD1.x, SD2.x, SDXL) or a Flux/SD3 DiT."),
                io.Int.Input("interval", default=3, min=1, max=10, tooltip="The longest gap between full keyframes: with the fixed schedule every interval-th step is a keyframe; with the adaptive schedule (the default) at most interval - 1 steps in a row reuse. Larger is faster and drifts more. 1 disables reuse (the model is returned unchanged)."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01, tooltip="Sampling progress where reuse may begin; earlier steps are all keyframes. Reuse at the first, high-noise steps costs the most quality, above all with few steps: 0.1-0.2 keeps them exact for a small loss of speed. Before a ReDi sampler use 0.25 or more: its key phase must stay on the KB's trajectories (docs/feature_reuse.md, ReDi + FeatureReuse)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01, tooltip="Sampling progress where reuse ends; later steps are all keyframes (for example 0.9 keeps the last details exact)."),
                io.Combo.Input("blocks", options=["all", "resblocks", "transformers"], default="all", tooltip="Block kinds that reuse features: ResBlocks skip only their first convolution; transformers skip attention and MLPs (the larger saving). DiTs have transformer blocks only."),
                io.String.Input("parts", default="input,middle,output", tooltip="UNet parts whose blocks reuse features (comma-separated subset of input, middle, output; for a DiT: the first, middle and last third of its blocks). Fewer parts: closer to the full result, less speed-up."),
                io.Boolean.Input("score_mixing", default=True, tooltip="Mix each reuse step's score with the last keyframe's by lambda(t). Early steps then skip the network entirely (faster, keeps the layout); late steps use reuse (keeps detail). Off: pure feature reuse."),
                io.Float.Input("mix_bias", default=1.0, min=0.0, max=1.0, step=0.01, tooltip="Progress where lambda(t) switches from the keyframe score to the reuse score: off-keyframe steps before it skip the network (their score is the last keyframe's), the ones after it run the network with reused features. 1.0 (default, with the adaptive schedule): skip wherever the output barely moves, reuse features only in the last step; measured at a seed per image it beats fewer steps and EasyCache at the same cost (docs/feature_reuse.md). 0.8 with the fixed schedule: the earlier default. 0.5: FRDiff's switch."),
                io.Int.Input("order", default=0, min=0, max=2, optional=True, tooltip="How reuse steps get their features: 0 copies the last keyframe's (FRDiff); 1 and 2 extrapolate each cached feature (and the mixed keyframe score) from the last 2 or 3 keyframes by finite differences (TaylorSeer). Same speed; needs a little more memory."),
                io.Combo.Input("schedule", options=list(SCHEDULES), default="adaptive", optional=True, tooltip="Which steps are keyframes. adaptive (default): a keyframe when the model's output is predicted to have moved more than threshold since the last one (EasyCache's estimate), and at least every interval steps. fixed: every interval-th step. ramp: dense at the first, high-noise steps, the gap growing to interval at end_percent."),
                io.Float.Input("threshold", default=0.12, min=0.0, max=2.0, step=0.01, optional=True, tooltip="adaptive schedule only: the predicted relative change of the model output that forces a keyframe. Lower: more keyframes (slower, closer to the full run). 0.12 (default): about 0.55 of a full run's cost on an SD1.5-size UNet with 20 euler steps; 0.11 is closer, 0.14 faster and already losing accuracy."),
            ],
            outputs=[io.Model.Output(tooltip="The patched model (the input model is not changed).")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, interval, start_percent, end_percent, blocks, parts, score_mixing, mix_bias,
                order=0, schedule="adaptive", threshold=0.12) -> io.NodeOutput:
        if start_percent > end_percent:
            raise ValueError(f"start_percent ({start_percent}) must not exceed end_percent ({end_percent})")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, not {schedule!r}")
        part_set = _parts(parts)
        config = FRDiffConfig(interval, start_percent, end_percent, score_mixing, mix_bias,
                              order=int(order), schedule=schedule, threshold=float(threshold))
        if config.neutral:
            return io.NodeOutput(model)
        if "easycache" in model.model_options.get("transformer_options", {}):
            raise ValueError("this model already has EasyCache/LazyCache: FeatureReuse and EasyCache both skip UNet work and "
                             "their errors compound; use one of them (remove the EasyCache node or this one)")
        diffusion_model = model.get_model_object("diffusion_model")
        found = find_blocks(diffusion_model, blocks, part_set)
        dit = find_dit_blocks(diffusion_model, blocks, part_set)
        if not found and not dit:
            raise ValueError(
                f"FeatureReuse found no reusable blocks ({blocks}, parts {parts}) in {type(diffusion_model).__name__}; "
                "it supports UNet models (SD1.x, SD2.x, SDXL: any block kind) and Flux/SD3 DiTs (blocks 'all' or 'transformers')"
            )
        m = model.clone()
        for wrapper_type in (comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL):
            m.remove_wrappers_with_key(wrapper_type, WRAPPER_KEY)  # a FeatureReuse on a FeatureReuse model replaces it
        state = FRDiffState(config)
        for kind, path, _ in found:
            # the original module, never another FeatureReuse's stand-in: a model patcher of the same
            # weights may be loaded with its object patches applied while this node runs
            if kind == "resblock":
                name = f"diffusion_model.{path}.in_layers"
                m.add_object_patch(name, CachedFirstConv(unwrap(m.get_model_object(name)), state, path))
            else:
                name = f"diffusion_model.{path}"
                m.add_object_patch(name, CachedTransformer(unwrap(m.get_model_object(name)), state, path))
        if found:
            m.set_model_forward_timestep_embed_patch((CachedTransformer, _transformer_handler))
        earlier = m.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
        for name, index in dit:
            m.set_model_patch_replace(CachedDiTBlock(state, f"{name}.{index}", unwrap(earlier.get((name, index)))), "dit", name, index)
        wrappers = _Wrappers(state, m.get_model_object("model_sampling"))
        wrappers.report_node = kb_types.node_id_of(cls)
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, wrappers.outer_sample)
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, wrappers.diffusion_model)
        return io.NodeOutput(m)
