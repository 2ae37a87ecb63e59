"""ReDi Style Split: a prompt into content and style, and their conditionings."""

from __future__ import annotations

import comfy.model_management
from comfy_api.latest import io

from ..redi_core.style_split import compile_patterns, split_prompt
from . import kb_types


def _interrupted() -> bool:
    """ComfyUI's /interrupt, asked between pattern searches: raises its interrupt exception
    (the executor then stops the run as interrupted)."""
    comfy.model_management.throw_exception_if_processing_interrupted()
    return False


def _encode(clip, text: str):
    tokens = clip.tokenize(text)
    return clip.encode_from_tokens_scheduled(tokens)


class ReDiStyleSplit(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ReDiStyleSplit",
            display_name="ReDi Style Split",
            category="ReDi/prompt",
            description="Splits a prompt into content and style (', in the style of X', 'X style', 'by Artist', "
            "'as a watercolor painting', '(oil painting:1.2)', BREAK, a separator, your own patterns). Feed content_conditioning "
            "to ReDi KSampler's content_positive and full_conditioning to its positive for zero-shot stylization.",
            inputs=[
                io.Clip.Input("clip", tooltip="Text encoder for the two conditionings."),
                io.String.Input("prompt", multiline=True, default="", tooltip="The full prompt, content and style together."),
                io.String.Input("separator", default="", tooltip="Optional explicit separator (e.g. '|'): text before it is content, after it style. Empty: detect style phrases."),
                io.String.Input("extra_patterns", multiline=True, default="", optional=True, tooltip="Optional regular expressions, one per line: comma-separated parts of the prompt that match one are style."),
            ],
            outputs=[
                io.String.Output(display_name="content", tooltip="The content part of the prompt."),
                io.String.Output(display_name="style", tooltip="The style part (empty when none was found)."),
                io.Conditioning.Output(display_name="content_conditioning", tooltip="Conditioning of the content alone (for ReDi's key phase and retrieval)."),
                io.Conditioning.Output(display_name="full_conditioning", tooltip="Conditioning of content + style (for the steps after retrieval)."),
            ],
        )

    @classmethod
    def execute(cls, clip, prompt, separator, extra_patterns="") -> io.NodeOutput:
        # the user patterns get NODE_BUDGET_S in total; a refusal raises and is shown on the node
        res = split_prompt(prompt, separator, compile_patterns(extra_patterns), should_stop=_interrupted)
        full = res.full
        content_cond = _encode(clip, res.content)
        full_cond = _encode(clip, full) if res.style else content_cond
        lines = [f"content: {res.content or '(empty)'}", f"style: {res.style or '(no style found)'}"]
        if res.matched:
            lines.append("rules: " + ", ".join(res.matched))
        return io.NodeOutput(res.content, res.style, content_cond, full_cond, ui=kb_types.report(lines))
