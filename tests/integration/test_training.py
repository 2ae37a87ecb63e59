"""The demo model's training script on ComfyUI's real classes, in-process and tiny:
the autoencoder's colour-path init, and a run that resumes and exports a checkpoint
the stock loader reads."""

import json

import pytest
import safetensors.torch
import torch

from redi_demo import host

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def train():
    host.load_pack()
    from redi_demo import train

    return train


def test_colour_path_reconstructs_flat_colours_at_init(train):
    from comfy.taesd.taesd import TAESD

    torch.manual_seed(0)
    ae = TAESD(latent_channels=train.LATENT_CHANNELS)
    train._ae_init(ae)
    rgb = torch.tensor([0.2, 0.55, 0.9]).view(1, 3, 1, 1)
    with torch.no_grad():
        out = ae.taesd_decoder(ae.taesd_encoder(rgb.expand(1, 3, 64, 64)))
    inner = out[:, :, 16:48, 16:48]
    # the decoder's Clamp (tanh) bends the colour slightly; a random init is off by far more
    assert (inner - rgb).abs().max() < 0.03, inner.mean(dim=(2, 3))


def test_tiny_run_resumes_and_exports_a_loadable_checkpoint(train, tmp_path, capsys):
    out, preview = tmp_path / "tiny.safetensors", tmp_path / "preview.json"
    args = ["--work", str(tmp_path / "work"), "--out", str(out), "--preview", str(preview), "--ae-batch", "2",
            "--batch", "2", "--pool", "4", "--log-every", "1", "--check-every", "0", "--threads", "1"]
    train.main(args + ["--ae-steps", "2", "--ae-texture-steps", "1", "--unet-steps", "1"])
    first = capsys.readouterr().out
    assert "[ae] step 3/3" in first and "[unet] step 1/1" in first

    train.main(args + ["--ae-steps", "2", "--ae-texture-steps", "1", "--unet-steps", "2"])
    second = capsys.readouterr().out
    assert "[ae] step" not in second, "the finished autoencoder stage ran again instead of resuming"
    assert "[unet] step 2/2" in second and "[unet] step 1/" not in second

    fit = json.loads(preview.read_text())
    assert len(fit["latent_rgb_factors"]) == train.LATENT_CHANNELS and len(fit["latent_rgb_factors_bias"]) == 3
    model, clip, vae = host.load_checkpoint(out)
    assert type(model.model.model_config).__name__ == "ReDiDemoShapes"
    # every UNet weight is in the file and loads as saved (ComfyUI 0.30 takes them from the caller)
    saved = safetensors.torch.load_file(out)
    unet = model.model.diffusion_model.state_dict()
    assert {f"model.diffusion_model.{k}" for k in unet} <= set(saved)
    assert all(torch.equal(v.half(), saved[f"model.diffusion_model.{k}"]) for k, v in unet.items() if v.is_floating_point())
    assert vae.latent_channels == train.LATENT_CHANNELS


def test_dit_tiny_run_resumes_and_exports_a_flux_checkpoint(tmp_path, capsys):
    """The DiT's training script: two steps on the shipped SD1.x model's text encoder and autoencoder,
    resumed, then exported in Flux's layout; the stock loader reads it back as the DiT config."""
    host.load_pack()
    import comfyui_version

    from redi_demo import train_dit

    out = tmp_path / "tiny_dit.safetensors"
    args = ["--work", str(tmp_path / "work"), "--out", str(out), "--batch", "2", "--pool", "4", "--log-every", "1",
            "--check-every", "0", "--threads", "1"]
    if tuple(int(v) for v in comfyui_version.__version__.split(".")[:2]) >= (0, 30):
        # ComfyUI 0.30's Flux rotary embedding is a comfy_kitchen op without a backward: a clear refusal, not a trace
        with pytest.raises(SystemExit, match="REDI_COMFY=0.3.75"):
            train_dit.main(args + ["--steps", "1"])
        return
    train_dit.main(args + ["--steps", "1"])
    assert "[dit] step 1/1" in capsys.readouterr().out
    train_dit.main(args + ["--steps", "2"])
    second = capsys.readouterr().out
    assert "[dit] step 2/2" in second and "[dit] step 1/" not in second, second

    model, clip, vae = host.load_checkpoint(out)
    assert type(model.model.model_config).__name__ == "ReDiDemoDiT"
    dm = model.model.diffusion_model
    assert type(dm).__name__ == "Flux" and len(dm.double_blocks) >= 1 and len(dm.single_blocks) >= 1
    saved = safetensors.torch.load_file(out)
    assert any(k.endswith("img_attn.norm.key_norm.scale") for k in saved)  # Flux's own key names
    cond, pooled = clip.encode_from_tokens(clip.tokenize("a small red circle at the top left"), return_pooled=True)
    assert pooled is not None and pooled.shape[-1] == dm.params.vec_in_dim and cond.shape[-1] == dm.params.context_in_dim
    assert vae.latent_channels == 4
