"""ReDi Record: a model patch that feeds a KB library from the stock KSampler and SamplerCustomAdvanced."""

from __future__ import annotations

import comfy.patcher_extension
from comfy_api.latest import io

from ..comfy_adapter.recording import RecordPatch
from ..kb_tools.library import DEFAULT_CAP, Library, library_root
from . import kb_types

WRAPPER_KEY = "redi_record"


class ReDiRecord(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ReDiRecord",
            display_name="ReDi Record",
            category="ReDi/knowledge base",
            description="Makes every ordinary generation count: the stock KSampler or SamplerCustomAdvanced sampling with this model "
            "adds each finished txt2img trajectory to the matching KB of a library (models/redi_kb/LIBRARY), in the background, "
            "at no extra UNet call. ReDi KSampler with the same library then retrieves from it.",
            inputs=[
                io.Model.Input("model", tooltip="The model to record with (it is cloned; the input model is not changed)."),
                io.String.Input("library", default="my_library", tooltip="Library folder under models/redi_kb; the KB that fits each run (model, sampler, scheduler, steps, cfg, size, negative prompt) is found or created in it."),
                io.Boolean.Input("enabled", default=True, tooltip="Off returns the model unchanged (nothing recorded)."),
                io.Int.Input("max_trajectories", default=DEFAULT_CAP, min=2, max=10_000_000, tooltip="Size cap of each library KB; at the cap a new generation keeps a coverage-preserving half of the old KB (see `python -m kb_tools library prune`)."),
            ],
            outputs=[io.Model.Output(tooltip="The model with the recording wrapper; connect it to KSampler or a guider.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, library, enabled, max_trajectories=DEFAULT_CAP) -> io.NodeOutput:
        if not enabled:
            return io.NodeOutput(model, ui=kb_types.report(["ReDi Record: off (the model is returned unchanged; nothing is recorded)"]))
        lib = Library(library_root(kb_types.kb_roots()[0], library.strip()), max_trajectories)
        node = kb_types.node_id_of(cls)
        m = model.clone()
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY,
                               RecordPatch(lib, report=lambda lines: kb_types.send_report(node, lines)))
        note = (f"ReDi Record: library {library.strip()}; each txt2img run of a stock sampler with this model is added to "
                "the KB that fits it (the report here says which, after sampling)")
        return io.NodeOutput(m, ui=kb_types.report([note]))
