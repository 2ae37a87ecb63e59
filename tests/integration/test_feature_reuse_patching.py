"""FeatureReuse on the real ComfyUI model patcher, in-process (no mocks): it composes with
LoRA-style weight patches and FreeU, reruns reproducibly, and leaves the input model alone."""

import importlib

import pytest
import torch

from redi_demo import host
from redi_demo.train import init_weights

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def env():
    host.load_pack()
    import comfy.sample

    fr = importlib.import_module("redi_accelerate.nodes.feature_reuse")
    model, clip, _ = host.load_checkpoint(host.PACK_ROOT / "models" / "redi_demo_shapes.safetensors")
    pos = clip.encode_from_tokens_scheduled(clip.tokenize("a large red circle at the center on a white background"))
    neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    lat = torch.zeros(2, 4, 8, 8)

    def run(m, sampler="euler", steps=10):
        return comfy.sample.sample(m, comfy.sample.prepare_noise(lat, 1), steps, 6.0, sampler, "normal", pos, neg, lat, disable_pbar=True)

    def patch(m, interval=2, mixing=True, blocks="all"):
        return fr.ReDiFeatureReuse.execute(m, interval, 0.0, 1.0, blocks, "input,middle,output", mixing, 0.5, 0, "fixed").result[0]

    return model, run, patch, clip


def test_interval_one_returns_the_model_unchanged(env):
    model, run, patch, _ = env
    assert patch(model, interval=1) is model


def test_reuse_changes_little_and_reruns_identically(env):
    model, run, patch, _ = env
    base = run(model, steps=20)
    p = patch(model, mixing=False)
    a, b = run(p, steps=20), run(p, steps=20)
    assert torch.equal(a, b)  # the cache resets between runs
    rel = (a - base).abs().mean() / base.abs().mean()
    assert 0 < rel < 0.25, rel
    assert torch.equal(run(model, steps=20), base)  # the input model is untouched


@pytest.mark.parametrize("sampler", ["euler_ancestral", "dpmpp_2m", "heun", "uni_pc"])
def test_every_sampler_kind_runs(env, sampler):
    model, run, patch, _ = env
    out = run(patch(model), sampler)
    assert torch.isfinite(out).all()


def test_composes_with_weight_patches(env):
    model, run, patch, _ = env
    key = "diffusion_model.input_blocks.1.0.in_layers.2.weight"
    w = model.model.state_dict()[key.replace("diffusion_model.", "diffusion_model.")]
    lora = model.clone()
    lora.add_patches({key: (torch.randn_like(w) * 0.5,)}, 1.0)
    plain, patched = run(patch(model, mixing=False)), run(patch(lora, mixing=False))
    assert not torch.allclose(plain, patched), "the weight patch was lost under FeatureReuse"
    # the same weight patch applied after FeatureReuse reaches the wrapped conv too
    later = patch(model, mixing=False).clone()
    later.add_patches({key: (torch.randn_like(w) * 0.5,)}, 1.0)
    assert not torch.allclose(plain, run(later))


def _state(patched):
    import comfy.patcher_extension

    fr = importlib.import_module("redi_accelerate.nodes.feature_reuse")
    wrapper = patched.wrappers[comfy.patcher_extension.WrappersMP.OUTER_SAMPLE][fr.WRAPPER_KEY][0]
    return wrapper.__self__.state


def test_cond_and_uncond_batched_or_not(env):
    """A prompt five CLIP chunks long cannot share a batch with the one-chunk negative, so
    ComfyUI runs cond and uncond as separate UNet calls: each keeps its own cache."""
    import comfy.sample

    model, run, patch, clip = env
    long_prompt = ", ".join(["a large red circle at the center on a white background"] * 30)
    pos = clip.encode_from_tokens_scheduled(clip.tokenize(long_prompt))
    neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    assert pos[0][0].shape[1] >= 5 * 77 and neg[0][0].shape[1] == 77
    lat = torch.zeros(1, 4, 8, 8)

    def run_long(m):
        return comfy.sample.sample(m, comfy.sample.prepare_noise(lat, 1), 20, 6.0, "euler", "normal", pos, neg, lat, disable_pbar=True)

    batched, unbatched = patch(model, mixing=False), patch(model, mixing=False)
    run(batched, steps=20)
    fast, full = run_long(unbatched), run_long(model)
    # 20 euler steps, interval 2: keyframes at the even steps
    assert _state(batched).calls == {"key": 10, "reuse": 10, "jump": 0}
    assert _state(unbatched).calls == {"key": 20, "reuse": 20, "jump": 0}
    assert _state(unbatched).skipped == {k: 2 * v for k, v in _state(batched).skipped.items()}
    assert torch.equal(fast, run_long(unbatched))
    rel = (fast - full).abs().mean() / full.abs().mean()
    assert 0 < rel < 0.25, rel


def test_composes_with_freeu(env):
    from comfy_extras.nodes_freelunch import FreeU_V2

    model, run, patch, _ = env
    freeu = FreeU_V2().patch(model, 1.3, 1.4, 0.9, 0.2)[0]
    out = run(patch(freeu))
    assert torch.isfinite(out).all() and not torch.allclose(out, run(patch(model)))


def _random_model(cfg, cond, lat, steps, cfg_scale, scheduler):
    """A ComfyUI model of `cfg` with random weights, and a sampler run on it."""
    import comfy.model_patcher
    import comfy.sample

    torch.manual_seed(0)
    base = cfg.get_model({})
    init_weights(base.diffusion_model)
    assert all(torch.isfinite(p).all() for p in base.diffusion_model.parameters())
    model = comfy.model_patcher.ModelPatcher(base, torch.device("cpu"), torch.device("cpu"))

    def run(m):
        noise = comfy.sample.prepare_noise(lat, 0)
        return comfy.sample.sample(m, noise, steps, cfg_scale, "euler", scheduler, cond(), cond(), lat, disable_pbar=True)

    return model, run


def test_small_sdxl_architecture(env):
    """An SDXL-architecture UNet (linear transformer projections, depth-2 transformers,
    ADM size conditioning) built at small scale from ComfyUI's own SDXL config."""
    import comfy.supported_models

    _, _, patch, _ = env
    cfg = comfy.supported_models.SDXL({
        "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
        "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "out_channels": 4, "model_channels": 32,
        "num_res_blocks": [2, 2], "transformer_depth": [0, 0, 2, 2], "transformer_depth_output": [0, 0, 0, 2, 2, 2],
        "channel_mult": [1, 2], "transformer_depth_middle": 2, "use_linear_in_transformer": True, "context_dim": 64,
        "use_temporal_resblock": False, "use_temporal_attention": False,
    })
    cfg.unet_config["num_head_channels"] = 16
    g = torch.Generator().manual_seed(1)
    ctx, pooled = torch.randn(1, 77, 64, generator=g) * 0.1, torch.randn(1, 1280, generator=g) * 0.1
    model, run = _random_model(cfg, lambda: [[ctx, {"pooled_output": pooled}]], torch.zeros(1, 4, 8, 8), 6, 5.0, "normal")
    full = run(model)
    patched = patch(model, mixing=False)
    out = run(patched)
    assert torch.isfinite(out).all() and not torch.equal(out, full)
    assert torch.equal(run(model), full)


def test_small_flux_dit(env):
    """A Flux-architecture DiT (double and single stream blocks) at small scale, from
    ComfyUI's own Flux config: its blocks reuse their keyframe residuals."""
    import dataclasses

    import comfy.ldm.flux.model
    import comfy.supported_models

    _, _, patch, _ = env
    unet_config = {
        "image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2, "vec_in_dim": 16,
        "context_in_dim": 32, "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 4, "depth": 2,
        "depth_single_blocks": 3, "axes_dim": [4, 6, 6], "theta": 10000, "qkv_bias": True, "guidance_embed": False,
    }
    if "txt_ids_dims" in {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}:
        unet_config["txt_ids_dims"] = []  # newer hosts (0.30): the text tokens' position ids, none for Flux.1 (as detected)
    cfg = comfy.supported_models.Flux(unet_config)
    g = torch.Generator().manual_seed(1)
    ctx, pooled = torch.randn(1, 7, 32, generator=g), torch.randn(1, 16, generator=g)
    model, run = _random_model(cfg, lambda: [[ctx, {"pooled_output": pooled}]], torch.zeros(1, 16, 8, 8), 8, 1.0, "simple")
    full = run(model)
    patched = patch(model, mixing=False)
    out = run(patched)
    assert torch.isfinite(full).all() and torch.isfinite(out).all() and not torch.equal(out, full)
    rel = (out - full).abs().mean() / full.abs().mean()
    assert rel < 0.5, rel
    assert _state(patched).skipped == {"dit": 4 * 5}  # 4 reuse steps x (2 double + 3 single blocks)
    assert torch.equal(run(model), full)
    with pytest.raises(ValueError, match="DiTs"):
        patch(model, blocks="resblocks")


def test_img2img_denoise_below_one(env):
    import comfy.sample

    model, _, patch, _ = env
    lat = torch.randn(1, 4, 8, 8) * 0.5
    clip_cond = [[torch.zeros(1, 77, 96), {}]]

    def run(m):
        return comfy.sample.sample(m, comfy.sample.prepare_noise(lat, 2), 10, 6.0, "euler", "normal", clip_cond, clip_cond, lat,
                                   denoise=0.6, disable_pbar=True)

    full, fast = run(model), run(patch(model))
    assert torch.isfinite(fast).all() and fast.shape == full.shape
    assert (fast - full).abs().mean() < full.abs().mean()


def test_patching_beside_a_loaded_feature_reuse_model(env):
    """A FeatureReuse built while another one's patches are applied to the shared weights wraps
    the original blocks, and a FeatureReuse on a FeatureReuse model replaces it."""
    import comfy.patcher_extension

    fr = importlib.import_module("redi_accelerate.nodes.feature_reuse")
    model, run, patch, _ = env
    first = patch(model)
    run(first)  # its object patches stay applied while the model stays loaded
    transformers_only = patch(model, blocks="transformers", mixing=False)  # saw no transformers before the fix
    out = run(transformers_only)
    assert _state(transformers_only).skipped and set(_state(transformers_only).skipped) == {"transformer"}
    assert torch.equal(out, run(patch(model, blocks="transformers", mixing=False)))
    again = patch(first, interval=3)
    assert len(again.wrappers[comfy.patcher_extension.WrappersMP.OUTER_SAMPLE][fr.WRAPPER_KEY]) == 1
    assert torch.equal(run(again), run(patch(model, interval=3)))
