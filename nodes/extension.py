"""The pack's ComfyExtension: registers the demo model and lists every node."""

from __future__ import annotations

import logging
import os

import folder_paths
from comfy_api.latest import ComfyExtension, io

from ..redi_demo import dit_config, model_config
from . import kb_routes, kb_types, template_order

PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_MODELS_DIR = os.path.join(PACK_DIR, "models")


def register_folders_and_models() -> None:
    """The shipped demo checkpoint shows up in the stock CheckpointLoaderSimple, ComfyUI's
    checkpoint detection recognises its (small) SD1.x and Flux configs, models/redi_kb exists, and the
    KB file routes for distributed builds are added. Idempotent."""
    folder_paths.add_model_folder_path("checkpoints", DEMO_MODELS_DIR)
    model_config.register()
    dit_config.register()
    kb_types.register_folder()
    kb_routes.register()
    template_order.register()


class ReDiExtension(ComfyExtension):
    async def on_load(self) -> None:
        register_folders_and_models()

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        # ComfyUI 0.3.75 never calls on_load, so registration happens here too.
        register_folders_and_models()
        logging.info("[ReDi] demo model registered; checkpoints also read from %s", DEMO_MODELS_DIR)
        from .node_list import NODES

        return list(NODES)
