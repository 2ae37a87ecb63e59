"""A finish of some batch rows (the items ReDi's guard refused, or the ones it accepted) uses
those rows' own conditioning when each item has its own prompt; in-process, real ComfyUI sampling."""

import importlib

import numpy as np
import pytest
import torch

from redi_demo import host

pytestmark = pytest.mark.integration

PROMPTS = ["a large red circle at the center on a white background", "a small blue square at the top left on a black background",
           "a green triangle at the bottom right on a grey background"]


@pytest.fixture(scope="module")
def env():
    host.load_pack()
    cs = importlib.import_module("redi_accelerate.comfy_adapter")
    kb_nodes = importlib.import_module("redi_accelerate.nodes.kb_nodes")
    model, clip, _ = host.load_checkpoint(host.PACK_ROOT / "models" / "redi_demo_shapes.safetensors")
    neg = clip.encode_from_tokens(clip.tokenize(""), return_pooled=True)
    return cs, model, kb_nodes.encode_batch(clip, PROMPTS), [[neg[0], {}]]


@pytest.mark.parametrize("rows", [[1, 2], [2], [0, 2]])
def test_finish_of_some_rows_uses_their_own_prompts(env, rows):
    cs, model, cond, negative = env
    latent = torch.zeros(3, 4, 8, 8)
    noise = cs.noise_for(latent, [7, 7, 7])
    ph = cs.Phases(model, 10, 6.0, "euler", "normal", negative, preview=False)
    full = ph.full(cond, latent, noise, 7)
    state = ph.key_phase(cond, latent, noise, 7, 4)
    idx = np.array(rows)
    part = ph.finish(cond, state.x[idx], 4, 7, rows=idx)
    # euler is deterministic: finishing from the key step gives the full run's rows
    assert torch.allclose(part, full[idx], atol=1e-5), (part - full[idx]).abs().max()


def test_shared_conditioning_is_left_alone(env):
    import comfy.conds

    cs, _, cond, _ = env
    per_item, shared = comfy.conds.CONDCrossAttn(cond[0][0]), comfy.conds.CONDCrossAttn(cond[0][0][:1])
    mask = torch.ones(3, 8, 8)
    conds = {"positive": [{"model_conds": {"c_crossattn": per_item}, "mask": mask}], "negative": [{"model_conds": {"c_crossattn": shared}}]}
    out = cs.processed_conds_rows(conds, np.array([2]), 3)
    assert out["negative"][0]["model_conds"]["c_crossattn"] is shared
    assert torch.equal(out["positive"][0]["model_conds"]["c_crossattn"].cond, cond[0][0][2:3])
    assert out["positive"][0]["mask"].shape[0] == 1
    assert conds["positive"][0]["model_conds"]["c_crossattn"] is per_item  # the guider's own conds are not changed


def test_redi_sampler_finishes_each_subset_with_its_own_prompts(env, tmp_path):
    """ReDi Sampler (SamplerCustomAdvanced): a KB of the first prompt accepts row 0 and refuses
    rows 1 and 2 (distance bound), which are then sampled from the key step: on their own prompts."""
    import comfy.sample

    from kb_tools.storage.knowledge_base import KnowledgeBase

    cs, model, cond, negative = env
    redi_sampler = importlib.import_module("redi_accelerate.nodes.redi_sampler")
    kb_nodes = importlib.import_module("redi_accelerate.nodes.kb_nodes")
    _, clip, _ = host.load_checkpoint(host.PACK_ROOT / "models" / "redi_demo_shapes.safetensors")
    kb_nodes.build_kb(model, clip, tmp_path / "kb", PROMPTS[:1], "", "euler", "normal", 10, 6.0, 64, 64, 1, "fixed", 7, (4, 6))
    kb = KnowledgeBase.load(tmp_path / "kb")
    latent = torch.zeros(3, 4, 8, 8)
    noise = cs.noise_for(latent, [7, 7, 7])
    full = cs.Phases(model, 10, 6.0, "euler", "normal", negative, preview=False).full(cond, latent, noise, 7)
    sampler = redi_sampler.ReDiSamplerImpl("euler", kb, 4, 6, 1, "latent", 0.05, 0.0)
    sigmas = cs.ksampler_sigmas(model, "euler", "normal", 10)
    out = comfy.sample.sample_custom(model, noise, 6.0, sampler, sigmas, cond, negative, latent, disable_pbar=True, seed=7)
    assert "guard: 2 of 3 items sampled in full from step 4 (no steps skipped)" in sampler.last_report, sampler.last_report
    assert any(line.startswith("[0] skipped 2 of 10 steps") for line in sampler.last_report), sampler.last_report
    assert torch.allclose(out[1:], full[1:], atol=1e-4), (out[1:] - full[1:]).abs().max()
    assert torch.allclose(out[:1], full[:1], atol=2e-2), (out[:1] - full[:1]).abs().max()
