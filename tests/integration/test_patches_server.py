"""Model identity and denoiser patches through the real server: LoRA files made here for the demo
model and loaded by the stock LoraLoaderModelOnly, merges by ModelMergeSimple, guidance patches
of each class, and the ReDi Sampler's sampler x scheduler verdict for the scheduler in use."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from redi_demo import workflows

pytestmark = pytest.mark.integration

PROMPTS = "\n".join(workflows.kb_prompts(8, seed=11).splitlines()[:8])


def write_lora(path, seed: int) -> None:
    """A rank-2 LoRA on the demo UNet's attention projections, in the file format LoRA loaders read."""
    ckpt = workflows_ckpt()
    g = torch.Generator().manual_seed(seed)
    lora = {}
    with safe_open(str(ckpt), "pt") as f:
        for k in f.keys():
            if k.startswith("model.diffusion_model.") and k.endswith(("attn1.to_q.weight", "attn2.to_v.weight")):
                w = f.get_tensor(k)
                name = "lora_unet_" + k[len("model.diffusion_model."):-len(".weight")].replace(".", "_")
                lora[f"{name}.lora_down.weight"] = torch.randn(2, w.shape[1], generator=g) * 0.3
                lora[f"{name}.lora_up.weight"] = torch.randn(w.shape[0], 2, generator=g) * 0.3
    assert lora
    save_file(lora, str(path))


def workflows_ckpt():
    from redi_demo.host import PACK_ROOT

    return PACK_ROOT / "models" / workflows.CKPT


@pytest.fixture(scope="module")
def loras(server):
    folder = server.workdir / "models" / "loras"
    folder.mkdir(parents=True, exist_ok=True)
    for name, seed in (("redi_test_a.safetensors", 1), ("redi_test_b.safetensors", 2)):
        write_lora(folder / name, seed)
    return "redi_test_a.safetensors", "redi_test_b.safetensors"


def model_node(kind: str, loras=None, strength: float = 1.0) -> dict:
    """The nodes that patch the checkpoint's model ("1") for a graph; the patched model is `model_ref(kind)`."""
    if kind == "plain":
        return {}
    if kind in ("lora_a", "lora_b"):
        name = loras[0] if kind == "lora_a" else loras[1]
        return {"20": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": name, "strength_model": strength}}}
    if kind in ("merge_a", "merge_b"):
        name = loras[0] if kind == "merge_a" else loras[1]
        return {"21": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": name, "strength_model": 1.0}},
                "20": {"class_type": "ModelMergeSimple", "inputs": {"model1": ["1", 0], "model2": ["21", 0], "ratio": 0.5}}}
    patch = {"rescale": ("RescaleCFG", {"multiplier": 0.7}), "rescale1": ("RescaleCFG", {"multiplier": 1.0}),
             "freeu": ("FreeU_V2", {"b1": 1.3, "b2": 1.4, "s1": 0.9, "s2": 0.2}),
             "apg": ("APG", {"eta": 0.0, "norm_threshold": 2.0, "momentum": -0.5}),
             "zsnr": ("ModelSamplingDiscrete", {"sampling": "eps", "zsnr": True})}[kind]
    return {"20": {"class_type": patch[0], "inputs": {"model": ["1", 0], **patch[1]}}}


def model_ref(kind: str) -> list:
    return ["1", 0] if kind == "plain" else ["20", 0]


def build(server, kb_name: str, kind: str, loras=None) -> None:
    g = workflows.redi_build_kb(PROMPTS)
    g.update(model_node(kind, loras))
    g["6"]["inputs"].update(model=model_ref(kind), kb_name=kb_name, batch_size=8)
    entry = server.run(g)
    assert entry["status"]["status_str"] == "success", (server.error_of(entry) or {}).get("exception_message")


def query(server, kb_name: str, kind: str, loras=None) -> tuple[str, str]:
    g = workflows.redi_ksampler(prompts=PROMPTS)
    del g["6"]
    g["30"] = {"class_type": "ReDiKBLoader", "inputs": {"kb_name": kb_name}}
    g.update(model_node(kind, loras))
    g["7"]["inputs"].update(model=model_ref(kind), kb=["30", 0])
    entry = server.run(g)
    status = entry["status"]["status_str"]
    err = server.error_of(entry)
    return status, (err or {}).get("exception_message", "")


def stock_run(server, kind: str, loras=None) -> None:
    g = workflows.demo_txt2img()
    g.update(model_node(kind, loras))
    g["5"]["inputs"]["model"] = model_ref(kind)
    entry = server.run(g)
    assert entry["status"]["status_str"] == "success", (server.error_of(entry) or {}).get("exception_message")


def test_lora_kb_serves_its_lora_only_in_any_order(server, loras):
    build(server, "ident_lora_a", "lora_a", loras)
    build(server, "ident_plain", "plain")
    for kind, kb, ok in (("lora_a", "ident_lora_a", True), ("plain", "ident_plain", True), ("lora_a", "ident_lora_a", True),
                         ("lora_b", "ident_lora_a", False), ("plain", "ident_lora_a", False), ("lora_a", "ident_plain", False),
                         ("plain", "ident_plain", True)):
        status, msg = query(server, kb, kind, loras)
        assert (status == "success") == ok, (kind, kb, msg)
        if not ok:
            assert "built with another model" in msg, msg


def test_merges_told_apart_and_stock_runs_leave_identities_alone(server, loras):
    build(server, "ident_merge_a", "merge_a", loras)
    stock_run(server, "merge_b", loras)  # another merge loaded (patched in place) before the queries
    assert query(server, "ident_merge_a", "merge_a", loras)[0] == "success"
    status, msg = query(server, "ident_merge_a", "merge_b", loras)
    assert status == "error" and "built with another model" in msg, msg
    stock_run(server, "merge_a", loras)
    assert query(server, "ident_plain", "plain", loras)[0] == "success"
    assert query(server, "ident_merge_a", "merge_a", loras)[0] == "success"


@pytest.mark.parametrize(("kind", "served", "needle"), [("freeu", True, ""), ("rescale", False, "RescaleCFG")])
def test_guidance_patches_served_or_fingerprinted(server, kind, served, needle):
    if not (server.kb_dir / "ident_plain").is_dir():
        build(server, "ident_plain", "plain")
    status, msg = query(server, "ident_plain", kind)
    assert (status == "success") == served, msg
    if not served:
        assert needle in msg and "build a KB with this patch" in msg, msg
        build(server, f"ident_{kind}", kind)  # a KB built with the same patch serves it
        assert query(server, f"ident_{kind}", kind)[0] == "success"


def test_redi_sampler_names_the_scheduler_in_use(server):
    if not (server.kb_dir / "ident_plain").is_dir():
        build(server, "ident_plain", "plain")
    g = workflows.redi_sampler_custom()
    g["6"]["inputs"]["kb_name"] = "ident_plain"
    g["7"]["inputs"]["sampler_name"] = "dpmpp_2m"
    g["12"]["inputs"]["scheduler"] = "ddim_uniform"
    entry = server.run(g)
    assert entry["status"]["status_str"] == "error"
    msg = server.error_of(entry)["exception_message"]
    assert "'dpmpp_2m' with the ddim_uniform scheduler" in msg, msg


@pytest.mark.parametrize(("kind", "needle"), [("apg", "APG: accuracy 94%"), ("rescale1", "RescaleCFG: multiplier 1.0"),
                                              ("zsnr", "zero-terminal-SNR sampling")])
def test_patches_redi_fails_on_are_refused_with_the_measurement(server, kind, needle):
    if not (server.kb_dir / "ident_plain").is_dir():
        build(server, "ident_plain", "plain")
    status, msg = query(server, "ident_plain", kind)
    assert status == "error" and needle in msg and "ReDi does not work with this model's patches" in msg, msg
    g = workflows.redi_build_kb(PROMPTS)  # the KB Builder refuses them too, before sampling anything
    g.update(model_node(kind))
    g["6"]["inputs"].update(model=model_ref(kind), kb_name=f"ident_refused_{kind}", batch_size=8)
    entry = server.run(g)
    assert entry["status"]["status_str"] == "error" and needle in server.error_of(entry)["exception_message"]
    assert not (server.kb_dir / f"ident_refused_{kind}").exists()
