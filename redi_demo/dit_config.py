"""The DiT demo model's ComfyUI config: ComfyUI's own Flux transformer (double- and single-stream
blocks, rotary position embedding, rectified flow with Flux's shift) at a small width, with the
SD1.x demo's small CLIP text encoder (token context and pooled vector) and its TAESD autoencoder.

ComfyUI's checkpoint detection reads the Flux layout from the tensor shapes but assumes the
released model's head count, rotary axes and output channels; `register()` puts this config at
the front of ComfyUI's model list so that the stock CheckpointLoaderSimple recognises the shipped
file (a 96-wide text context and 4 input channels match no released Flux) and sets those three.
"""

from __future__ import annotations

import comfy.supported_models

from . import model_config
from .model_config import TEXT_CONFIG, DemoLatentFormat, DemoTextEncoder

HIDDEN = 192
HEADS = 6
# rotary axes (index, row, column) of one head: sums to HIDDEN // HEADS, each even
AXES = [8, 12, 12]

DIT_CONFIG = {
    "image_model": "flux",
    "in_channels": 4,
    "out_channels": 4,
    "vec_in_dim": TEXT_CONFIG["hidden_size"],
    "context_in_dim": TEXT_CONFIG["hidden_size"],
    "hidden_size": HIDDEN,
    "mlp_ratio": 4.0,
    "num_heads": HEADS,
    "depth": 2,
    "depth_single_blocks": 4,
    "axes_dim": AXES,
    "theta": 10000,
    "patch_size": 2,
    "qkv_bias": True,
    "guidance_embed": False,
}


class ReDiDemoDiT(DemoTextEncoder, comfy.supported_models.Flux):
    """Flux-architecture demo DiT trained on the procedural shapes dataset."""

    unet_config = {
        "image_model": "flux",
        "guidance_embed": False,
        "in_channels": DIT_CONFIG["in_channels"],
        "context_in_dim": DIT_CONFIG["context_in_dim"],
        "vec_in_dim": DIT_CONFIG["vec_in_dim"],
        "hidden_size": HIDDEN,
    }
    unet_extra_config = {"num_heads": HEADS, "axes_dim": AXES, "out_channels": DIT_CONFIG["out_channels"]}
    latent_format = DemoLatentFormat
    memory_usage_factor = 0.1


def register() -> None:
    """Let ComfyUI's checkpoint detection recognise the DiT demo model (idempotent)."""
    model_config.register(ReDiDemoDiT)


def new_config() -> ReDiDemoDiT:
    """A config instance for building the model from scratch (training)."""
    config = dict(DIT_CONFIG)
    if "txt_ids_dims" in _flux_param_names():
        config["txt_ids_dims"] = []  # ComfyUI 0.30+: Flux.1's text tokens carry no position ids
    return ReDiDemoDiT(config)


def _flux_param_names() -> set[str]:
    import dataclasses

    import comfy.ldm.flux.model

    return {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}
