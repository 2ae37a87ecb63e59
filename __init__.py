"""ReDi Accelerate: training-free faster diffusion sampling for ComfyUI.

ComfyUI calls `comfy_entrypoint()`; the node modules (which import ComfyUI) are
imported only there, so the pure packages (`kb_tools`, `redi_core`) and the tests
import this pack's code without a ComfyUI install.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes.extension import ReDiExtension

    return ReDiExtension()
