"""The demo model's ComfyUI config: an SD1.x-architecture UNet, a CLIP-architecture
text encoder with ComfyUI's SD1 tokenizer, and ComfyUI's TAESD autoencoder, all small.

`register()` puts the config at the front of ComfyUI's model list so that the stock
CheckpointLoaderSimple recognises the shipped checkpoint by its tensor shapes
(context_dim 96 and model_channels 64 match no released SD model).
"""

from __future__ import annotations

import json
from pathlib import Path

import comfy.latent_formats
import comfy.sd1_clip
import comfy.supported_models
import comfy.supported_models_base

PREVIEW_FILE = Path(__file__).with_name("latent_preview.json")

UNET_CONFIG = {
    "use_checkpoint": False,
    "image_size": 32,
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 64,
    "num_res_blocks": [2, 2],
    "channel_mult": [1, 2],
    "transformer_depth": [1, 1, 1, 1],
    "transformer_depth_output": [1, 1, 1, 1, 1, 1],
    "transformer_depth_middle": 1,
    "use_linear_in_transformer": False,
    "context_dim": 96,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
}

TEXT_CONFIG = {
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 49407,
    "hidden_act": "quick_gelu",
    "hidden_size": 96,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 384,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 4,
    "num_hidden_layers": 3,
    "pad_token_id": 1,
    "projection_dim": 96,
    "torch_dtype": "float32",
    "vocab_size": 49408,
}


class DemoLatentFormat(comfy.latent_formats.LatentFormat):
    """Latents leave the autoencoder already normalised (its vae_scale/vae_shift),
    so the scale factor is 1. The RGB factors for previews are fitted at training."""

    scale_factor = 1.0
    latent_channels = 4

    def __init__(self) -> None:
        if PREVIEW_FILE.is_file():
            fit = json.loads(PREVIEW_FILE.read_text())
            self.latent_rgb_factors = fit["latent_rgb_factors"]
            self.latent_rgb_factors_bias = fit["latent_rgb_factors_bias"]


class DemoTextModel(comfy.sd1_clip.SDClipModel):
    def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):  # noqa: B006 - ComfyUI's signature
        super().__init__(
            device=device,
            dtype=dtype,
            textmodel_json_config=TEXT_CONFIG,
            layer="last",
            return_projected_pooled=False,
            model_options=model_options,
        )


class DemoClip(comfy.sd1_clip.SD1ClipModel):
    def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):  # noqa: B006 - ComfyUI's signature
        super().__init__(device=device, dtype=dtype, model_options=model_options, clip_model=DemoTextModel, **kwargs)


class DemoTextEncoder:
    """The demo models' text encoder: ComfyUI's SD1 tokenizer and the small CLIP above (a mixin for
    a model config)."""

    def clip_target(self, state_dict={}):  # noqa: B006 - ComfyUI's signature
        return comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, DemoClip)


class ReDiDemoShapes(DemoTextEncoder, comfy.supported_models.SD15):
    """SD1.x-architecture demo model trained on the procedural shapes dataset."""

    unet_config = {
        "context_dim": UNET_CONFIG["context_dim"],
        "model_channels": UNET_CONFIG["model_channels"],
        "use_linear_in_transformer": False,
        "adm_in_channels": None,
        "use_temporal_attention": False,
        "in_channels": 4,
    }
    unet_extra_config = {"num_heads": -1, "num_head_channels": 32}
    latent_format = DemoLatentFormat
    memory_usage_factor = 0.1


def register(config: type = ReDiDemoShapes) -> None:
    """Let ComfyUI's checkpoint detection recognise a demo model's config, ahead of the released
    models whose layout it shares (idempotent)."""
    models = comfy.supported_models.models
    if config not in models:
        models.insert(0, config)


def new_config() -> ReDiDemoShapes:
    """A config instance for building the model from scratch (training)."""
    return ReDiDemoShapes(dict(UNET_CONFIG))
