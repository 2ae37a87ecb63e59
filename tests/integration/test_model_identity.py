"""Model identity (comfy_adapter.identity.model_hash) on the real ComfyUI model patcher, in-process:
LoRAs made here for the demo model and loaded by ComfyUI's own LoRA code, merges by the stock
ModelMerge nodes, and in-place weight patching by loading a model (what a sampling run does)."""

import hashlib
import importlib

import pytest
import torch

from redi_demo import host

pytestmark = pytest.mark.integration

CKPTS = {"sd1": "redi_demo_shapes.safetensors", "dit": "redi_demo_shapes_dit.safetensors"}


@pytest.fixture(scope="module", params=list(CKPTS))
def env(request):
    """Each demo model in turn: the SD1.x UNet and the Flux DiT (whose LoRA keys ComfyUI maps its own way)."""
    host.load_pack()
    identity = importlib.import_module("redi_accelerate.comfy_adapter.identity")
    model, clip, _ = host.load_checkpoint(host.PACK_ROOT / "models" / CKPTS[request.param])
    return identity, model


def make_lora(model, seed: int, rank: int = 2, layers: int = 6) -> dict[str, torch.Tensor]:
    """A LoRA file's state dict for a demo model (the keys ComfyUI's loader maps)."""
    import comfy.lora

    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    sd = model.model.state_dict()
    names = sorted(n for n, k in key_map.items() if isinstance(k, str) and n.startswith("lora_unet_") and k in sd and sd[k].ndim == 2)[:layers]
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for n in names:
        out_f, in_f = sd[key_map[n]].shape
        lora[f"{n}.lora_down.weight"] = torch.randn(rank, in_f, generator=g) * 0.1
        lora[f"{n}.lora_up.weight"] = torch.randn(out_f, rank, generator=g) * 0.1
    assert lora, "no LoRA-able layer found"
    return lora


def with_lora(model, lora, strength: float):
    import comfy.sd

    m, _ = comfy.sd.load_lora_for_models(model, None, lora, strength, 0.0)
    return m


def merge(a, b, ratio: float):
    from comfy_extras.nodes_model_merging import ModelMergeSimple

    return ModelMergeSimple().merge(a, b, ratio)[0]


def load_in_place(model) -> None:
    """What a sampling run does to the weights: ComfyUI patches them in place while loaded."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([model])


def legacy_hash(model) -> str:
    """The identity KBs recorded before weight patches were hashed by content (plain models only)."""
    h = hashlib.sha256()
    sd = model.model.state_dict()
    for i, k in enumerate(sorted(sd)):
        t = sd[k]
        h.update(f"{k}:{tuple(t.shape)}".encode())
        if i % 4 == 0 and t.numel():
            flat = t.detach().flatten()
            h.update(flat[:: max(1, flat.numel() // 64)][:64].float().cpu().numpy().tobytes())
    return h.hexdigest()[:20]


def test_plain_model_keeps_the_identity_older_kbs_recorded(env):
    identity, model = env
    import comfy.model_management

    comfy.model_management.unload_all_models()
    assert identity.model_hash(model) == legacy_hash(model)


def test_loras_are_told_apart_by_content_and_strength(env):
    identity, model = env
    a, b = make_lora(model, 1), make_lora(model, 2)
    ha, hb = identity.model_hash(with_lora(model, a, 1.0)), identity.model_hash(with_lora(model, b, 1.0))
    assert ha != hb, "two different LoRAs of the same strength share an identity"
    assert identity.model_hash(with_lora(model, a, 0.5)) != ha
    assert identity.model_hash(with_lora(model, a, 1.0)) == ha, "the same LoRA loaded twice got two identities"
    assert ha != identity.model_hash(model)


def test_lora_order_does_not_matter(env):
    identity, model = env
    a, b = make_lora(model, 3), make_lora(model, 4)
    ab = with_lora(with_lora(model, a, 0.8), b, 0.6)
    ba = with_lora(with_lora(model, b, 0.6), a, 0.8)
    assert identity.model_hash(ab) == identity.model_hash(ba)


def test_identity_survives_in_place_patching_in_any_order(env):
    identity, model = env
    lora = with_lora(model, make_lora(model, 5), 1.0)
    plain_before, lora_before = identity.model_hash(model), identity.model_hash(lora)
    for m in (lora, model, lora, model):  # LoRA, plain, LoRA, plain: each loaded (patched in place) in turn
        load_in_place(m)
        assert identity.model_hash(model) == plain_before, "the plain model's identity changed after another clone was loaded"
        assert identity.model_hash(lora) == lora_before, "the LoRA model's identity changed with what was loaded before it"


def test_merges_are_told_apart_and_stable(env):
    identity, model = env
    other1, other2 = with_lora(model, make_lora(model, 6), 1.0), with_lora(model, make_lora(model, 7), 1.0)
    m1, m2 = merge(model, other1, 0.5), merge(model, other2, 0.5)
    h1, h2 = identity.model_hash(m1), identity.model_hash(m2)
    assert h1 != h2, "two different merges of the same ratio share an identity"
    assert identity.model_hash(merge(model, other1, 0.3)) != h1
    plain = identity.model_hash(model)
    for m in (m1, model, m2, m1):
        load_in_place(m)
        assert identity.model_hash(m1) == h1 and identity.model_hash(m2) == h2 and identity.model_hash(model) == plain
