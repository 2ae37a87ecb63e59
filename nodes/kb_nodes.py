"""ReDi KB Builder and ReDi KB Loader nodes."""

from __future__ import annotations

import os

import comfy.patcher_extension
import comfy.samplers
import comfy.utils
import numpy as np
import torch
from comfy_api.latest import io

from .. import comfy_adapter
from ..comfy_adapter import kb_match
from ..kb_tools import builder
from ..kb_tools.errors import KBError
from ..kb_tools.storage.disk_format import DEFAULT_STORED_STEPS, LOG, MANIFEST, Fingerprint, text_hash
from ..kb_tools.storage.knowledge_base import KnowledgeBase
from ..kb_tools.storage.paths import confined_file, read_text_lines
from . import kb_types


def encode_batch(clip, prompts: list[str]):
    """CLIP-encode prompts into one batched conditioning, or None when their token
    lengths differ (very long prompts); then items are sampled one by one."""
    conds, pooled = [], []
    for p in prompts:
        c, pl = clip.encode_from_tokens(clip.tokenize(p), return_pooled=True)
        conds.append(c)
        pooled.append(pl)
    if len({c.shape[1] for c in conds}) != 1:
        return None
    extra = {"pooled_output": torch.cat(pooled)} if pooled[0] is not None else {}
    return [[torch.cat(conds), extra]]


def parse_steps(text: str, steps: int) -> tuple[int, ...]:
    try:
        vals = tuple(sorted({int(v) for v in text.replace(" ", "").split(",") if v}))
    except ValueError as e:
        raise KBError(f"steps to store must be comma-separated integers like '4,6,10', not {text!r}") from e
    if not vals:
        raise KBError("give at least one step to store, e.g. '5,10'")
    bad = [v for v in vals if not 1 <= v <= steps]
    if bad:
        raise KBError(f"steps to store {bad} are outside 1..{steps} (the sampling steps); fix the list or raise steps")
    return vals


def read_prompts(prompts: str, prompts_file: str, input_dir: str | None = None) -> list[str]:
    """The prompt lines plus those of `prompts_file`, which must lie in `input_dir`
    (ComfyUI's input folder by default)."""
    lines = prompts.splitlines()
    if prompts_file.strip():
        if input_dir is None:
            import folder_paths

            input_dir = folder_paths.get_input_directory()
        name = prompts_file.strip()
        lines += read_text_lines(confined_file(name, input_dir), name)
    return builder.clean_prompts(lines)


class ReDiKBBuilder(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ReDiKBBuilder",
            display_name="ReDi KB Builder",
            category="ReDi/knowledge base",
            description="Samples every prompt with a stock sampler and stores its trajectory in a knowledge base "
            "(models/redi_kb/NAME). Resumable: re-running with the same prompts continues a stopped build; new prompts are appended.",
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="The model the KB is for. A KB only serves this exact model (weights and patches)."),
                io.Clip.Input("clip", tooltip="Text encoder used to encode the prompts."),
                io.String.Input("prompts", multiline=True, default="", tooltip="One prompt per line. Lines starting with # are ignored. More (and more varied) prompts give closer neighbours."),
                io.String.Input("negative", multiline=True, default="", tooltip="Negative prompt for every trajectory. Queries should use the same one."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler", tooltip="Sampler of the stored trajectories. ReDi KSampler must use the same."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="normal", tooltip="Scheduler of the stored trajectories. ReDi KSampler must use the same."),
                io.Int.Input("steps", default=20, min=2, max=1000, tooltip="Sampling steps of the stored trajectories. ReDi KSampler must use the same."),
                io.Float.Input("cfg", default=6.0, min=0.0, max=100.0, step=0.1, round=0.01, tooltip="Guidance scale of the stored trajectories. ReDi KSampler must use the same."),
                io.Int.Input("width", default=512, min=16, max=8192, step=8, tooltip="Image width; the KB serves only this size."),
                io.Int.Input("height", default=512, min=16, max=8192, step=8, tooltip="Image height; the KB serves only this size."),
                io.Int.Input("batch_size", default=8, min=1, max=256, tooltip="Prompts sampled together. Each finished batch is saved at once, so a stopped build loses at most one batch."),
                io.Combo.Input("seed_mode", options=["fixed", "range"], default="fixed", tooltip="fixed: every trajectory uses `seed` (the paper's setting; queries with that seed match best). range: trajectory i uses seed + i (serves queries with any seed through denoised keys)."),
                io.Int.Input("seed", default=1024, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False, tooltip="The fixed seed, or the first seed of the range. It stays as set after each run (a KB is built with one seed)."),
                io.String.Input("stored_steps", default=DEFAULT_STORED_STEPS, tooltip="Steps whose latents are stored, comma-separated. Key and value steps of ReDi KSampler must be among them (its defaults are 4 and 10). Each step adds about 4 bytes per latent value per trajectory (fp16 latent and denoised estimate)."),
                io.String.Input("kb_name", default="my_kb", tooltip="Folder name under models/redi_kb. An existing KB of the same settings is continued or extended."),
                io.String.Input("prompts_file", default="", optional=True, tooltip="Optional name of a text file in ComfyUI's input folder with more prompts, one per line (files outside the input folder are refused)."),
            ],
            outputs=[kb_types.KBType.Output(display_name="kb", tooltip="The knowledge base, for ReDi KSampler or ReDi Sampler.")],
        )

    @classmethod
    def validate_inputs(cls, sampler_name, scheduler) -> bool | str:
        return comfy_adapter.sampler_problem(sampler_name, scheduler, node="ReDi KB Builder")

    @classmethod
    def execute(cls, model, clip, prompts, negative, sampler_name, scheduler, steps, cfg, width, height, batch_size,
                seed_mode, seed, stored_steps, kb_name, prompts_file="") -> io.NodeOutput:
        stored = parse_steps(stored_steps, steps)
        prompt_list = read_prompts(prompts, prompts_file)
        path = kb_types.kb_path_for_write(kb_name)
        pbar = comfy.utils.ProgressBar(max(1, len(prompt_list) * steps))
        resumed: list[str] = []
        announced: list[bool] = []

        def step_progress(done: int, total: int) -> None:
            if not announced:  # the first call comes once the KB's folder exists: every KB Loader may list it now
                announced.append(True)
                kb_types.send_kb_list()
            pbar.update_absolute(done, max(1, total))

        try:
            manifest = build_kb(model, clip, path, prompt_list, negative, sampler_name, scheduler, steps, cfg, width, height,
                                batch_size, seed_mode, seed, stored, step_progress=step_progress,
                                resumed=lambda n, total: resumed.append(resumed_line(n, total)))
        finally:
            kb_types.send_kb_list()
        kb = KnowledgeBase.open(path)
        lines = [f"KB {kb.name}: {manifest.count} trajectories", *resumed,
                 f"stored steps {list(stored)}, {sampler_name}/{scheduler}, {steps} steps, cfg {cfg}"]
        return io.NodeOutput(kb, ui=kb_types.report(lines))


def resumed_line(stored: int, total: int) -> str:
    """The builder's report line when a build finds the first `stored` of its `total` prompts already in the KB."""
    if stored >= total:
        return f"already complete: {stored} of {total} trajectories stored, nothing sampled"
    return f"resumed: {stored} of {total} trajectories already stored, {total - stored} sampled now"


class StepProgress:
    """Progress per sampling step of every trajectory, not per finished batch: an APPLY_MODEL
    wrapper reads the step from the sigma it is called with. Calls `report(steps done, total steps)`
    where a total step is one trajectory's step."""

    def __init__(self, sigmas: torch.Tensor, steps: int, report) -> None:
        self.sigmas, self.steps, self.report = sigmas[:-1].float(), steps, report
        self.done = 0  # trajectories finished (or found already built) before the running batch
        self.batch = 0  # trajectories in the running batch
        self.total = 0

    def batch_done(self, done: int, total: int) -> None:
        self.done, self.total = done, total
        self.report(done * self.steps, total * self.steps)

    def __call__(self, executor, x, t, *args, **kwargs):
        i = int(torch.argmin((self.sigmas - float(t.flatten()[0])).abs()))
        self.report(self.done * self.steps + self.batch * (i + 1), self.total * self.steps)
        return executor(x, t, *args, **kwargs)

    def attach(self, model):
        m = model.clone()
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "redi_kb_progress", self)
        return m


def build_kb(model, clip, path, prompt_list, negative, sampler_name, scheduler, steps, cfg, width, height, batch_size,
             seed_mode, seed, stored, progress=lambda done, total: None, step_progress=None, dtype="float16",
             refuse_unsupported: bool = True, resumed=lambda stored, total: None):
    """The one build path, for the node and for `python -m kb_tools build`. `progress(trajectories done,
    total)` is called per finished batch; `step_progress(steps done, total)` per sampling step (both
    count the trajectories a resumed build finds stored); `resumed(stored, total)` once when a build
    resumes. The KB's manifest keeps the negative prompt's text (the KB Loader shows it)."""
    if width % 8 or height % 8:
        raise KBError(f"width and height must be multiples of 8, not {width}x{height}")
    comfy_adapter.check_sampler(sampler_name, scheduler, model)
    if refuse_unsupported:  # (the support script measures such models, so it builds their KBs)
        kb_match.check_model_supported(model)
    latent_channels = model.get_model_object("latent_format").latent_channels
    neg, neg_pooled = clip.encode_from_tokens(clip.tokenize(negative), return_pooled=True)
    negative_cond = [[neg, {"pooled_output": neg_pooled} if neg_pooled is not None else {}]]
    fp = Fingerprint(
        model_hash=comfy_adapter.model_hash(model), model_name=type(model.model.model_config).__name__,
        latent_shape=(latent_channels, height // 8, width // 8), sampler=sampler_name, scheduler=scheduler,
        steps=steps, cfg=float(cfg), stored_steps=stored, seed_mode=seed_mode, seed=int(seed),
        negative_hash=text_hash(negative), sampling=comfy_adapter.sampling_signature(model),
        negative_cond=comfy_adapter.conditioning_signature(negative_cond),
    )
    sampling_model, on_batch = model, progress
    if step_progress is not None:
        tracker = StepProgress(comfy_adapter.sigmas_for(model, scheduler, steps), steps, step_progress)
        sampling_model = tracker.attach(model)

        def on_batch(done, total):
            tracker.batch_done(done, total)
            progress(done, total)
    phases = comfy_adapter.Phases(sampling_model, steps, cfg, sampler_name, scheduler, negative_cond, preview=False)

    def run_batch(batch, seeds):
        # every item gets the initial and per-step noise of a batch-of-one run with its seed
        cond = encode_batch(clip, batch)
        if cond is None:
            parts = [run_batch([p], [s]) for p, s in zip(batch, seeds)]
            return ({s: np.concatenate([p[0][s] for p in parts]) for s in stored}, {s: np.concatenate([p[1][s] for p in parts]) for s in stored})
        if step_progress is not None:
            tracker.batch = len(batch)
        latent = torch.zeros((len(batch), latent_channels, height // 8, width // 8))
        return phases.trajectory(cond, latent, comfy_adapter.noise_for(latent, seeds), seeds, stored)

    return builder.build(path, fp, prompt_list, batch_size, run_batch, progress=on_batch,
                         check_interrupt=comfy_adapter.check_interrupt, dtype=dtype, resumed=resumed, negative_prompt=negative)


def _quoted(text: str, limit: int = 300) -> str:
    text = text.replace("\n", " ")
    return '"' + (text if len(text) <= limit else text[:limit] + "...") + '"'


def _sampling_line(signature: str) -> str:
    """The model's sampling as the fingerprint records it, without its sigma table sample."""
    if not signature:
        return "sampling: not recorded (a KB built before it was fingerprinted)"
    return "sampling: " + "; ".join(p for p in signature.split("; ") if not p.startswith("sigmas="))


def _negative_cond_line(signature: str) -> str:
    if not signature:
        return "negative conditioning: not recorded"
    shape, _, rest = signature.partition(":")
    rms = rest.rpartition(";")[2]
    return f"negative conditioning: {shape} tokens x dims, rms {rms}" if rms and shape else f"negative conditioning: {signature[:40]}"


def loader_report(kb) -> list[str]:
    """Every setting the KB's fingerprint holds (what a run must match), for the KB Loader's report."""
    fp = kb.fingerprint
    h, w = fp.latent_shape[1] * 8, fp.latent_shape[2] * 8
    negative = kb.header.negative_prompt
    if negative is not None:
        neg = f"negative prompt: {_quoted(negative)}" if negative.strip() else "negative prompt: empty"
    elif fp.negative_hash:
        neg = f"negative prompt: hash {fp.negative_hash[:12]} (its text is not stored in this KB: built before the text was kept)"
    else:
        neg = "negative prompt: text not recorded (runs are matched by the negative conditioning below)"
    return [
        f"KB {kb.name}: {len(kb)} trajectories, latent {list(fp.latent_shape)} ({w}x{h} image)",
        f"{fp.sampler}/{fp.scheduler}, {fp.steps} steps, cfg {fp.cfg}, stored steps {list(fp.stored_steps)}, seed {fp.seed_mode} {fp.seed}",
        f"model {fp.model_name} (hash {fp.model_hash[:12]})",
        _sampling_line(fp.sampling),
        neg,
        _negative_cond_line(fp.negative_cond),
    ]


class ReDiKBLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ReDiKBLoader",
            display_name="ReDi KB Loader",
            category="ReDi/knowledge base",
            description="Opens a knowledge base from models/redi_kb (reads its manifest and log only; every stored row is checked against its checksum when a query reads it; `python -m kb_tools validate` checks everything).",
            inputs=[
                io.Combo.Input("kb_name", options=kb_types.list_kbs(), tooltip="A knowledge base under models/redi_kb. The list follows the server: a KB built while ComfyUI runs appears by itself."),
            ],
            outputs=[kb_types.KBType.Output(display_name="kb", tooltip="The knowledge base, for ReDi KSampler or ReDi Sampler.")],
        )

    @classmethod
    def execute(cls, kb_name) -> io.NodeOutput:
        kb = KnowledgeBase.open(kb_types.kb_path_for_read(kb_name))
        return io.NodeOutput(kb, ui=kb_types.report(loader_report(kb)))

    @classmethod
    def fingerprint_inputs(cls, kb_name):
        try:
            path = kb_types.kb_path_for_read(kb_name)
            log = os.path.join(path, LOG)  # every commit appends to the log (the manifest never changes)
            return os.stat(log).st_mtime_ns if os.path.exists(log) else os.stat(os.path.join(path, MANIFEST)).st_mtime_ns
        except (KBError, OSError):
            return float("nan")
