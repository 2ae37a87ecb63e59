"""The samplers and schedulers of the host under test (ComfyUI 0.30.0 or 0.3.75, see REDI_COMFY): each one
has a measured verdict, an unmeasured one is refused at queue time with samplers that work, and no
sampler the pack accepts crashes a ReDi phase (in-process, real ComfyUI sampling on the demo model)."""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch

from redi_demo import host

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pack():
    host.load_pack()
    return importlib.import_module("redi_accelerate.comfy_adapter")


def _host_names():
    import comfy.samplers

    return list(comfy.samplers.KSampler.SAMPLERS), list(comfy.samplers.KSampler.SCHEDULERS)


def test_every_sampler_and_scheduler_of_this_host_has_a_verdict(pack):
    samplers, schedulers = _host_names()
    unmeasured = [(s, sch) for s in samplers for sch in schedulers if "has not been measured" in str(pack.sampler_problem(s, sch))]
    unmeasured += [(s, None) for s in samplers if "has not been measured" in str(pack.sampler_problem(s))]
    assert not unmeasured, f"measure them: scripts/sampler_support.py --samplers ... --write-verdicts: {unmeasured}"


def test_samplers_that_take_no_noise_sampler_are_deterministic(pack):
    """The pack hands a seeded noise sampler to every sampler outside DETERMINISTIC: a sampler function
    without that parameter would fail at run time (exp_heun_2_x0 on ComfyUI 0.30 did)."""
    import comfy.k_diffusion.sampling as kds

    samplers, _ = _host_names()
    missing = [s for s in samplers if (fn := getattr(kds, f"sample_{s}", None)) is not None
               and "noise_sampler" not in inspect.signature(fn).parameters and s not in pack.DETERMINISTIC]
    assert not missing, missing


@pytest.mark.parametrize(("sampler", "scheduler", "what"), [
    ("a_sampler_of_a_newer_comfyui", "normal", "sampler 'a_sampler_of_a_newer_comfyui' with the normal scheduler"),
    ("a_sampler_of_a_newer_comfyui", None, "sampler 'a_sampler_of_a_newer_comfyui'"),
    ("euler", "a_scheduler_of_a_newer_comfyui", "the a_scheduler_of_a_newer_comfyui scheduler"),
])
def test_unmeasured_names_refused_at_queue_time_with_samplers_that_work(pack, sampler, scheduler, what):
    nodes = importlib.import_module("redi_accelerate.nodes.redi_ksampler"), importlib.import_module("redi_accelerate.nodes.kb_nodes")
    if scheduler is None:
        messages = [importlib.import_module("redi_accelerate.nodes.redi_sampler").ReDiSampler.validate_inputs(sampler)]
    else:
        messages = [nodes[0].ReDiKSampler.validate_inputs(sampler, scheduler), nodes[1].ReDiKBBuilder.validate_inputs(sampler, scheduler)]
    for msg in messages:
        assert isinstance(msg, str), msg
        assert msg.startswith(("ReDi KSampler: ", "ReDi KB Builder: ", "ReDi Sampler: ")), msg  # the node's display name
        assert f": {what} has not been measured with ReDi" in msg, msg
        assert "euler" in msg and "heun" in msg, msg
    assert pack.sampler_problem("euler", "normal") is True


def test_no_accepted_sampler_crashes_a_redi_phase(pack):
    """Every sampler the pack accepts (with the first scheduler it accepts it with) runs the three phases
    of a ReDi run (full run, key phase, finish) with per-item seeded noise, as KB builds and ReDi KSampler do."""
    samplers, schedulers = _host_names()
    model, clip, _ = host.load_checkpoint(host.PACK_ROOT / "models" / "redi_demo_shapes.safetensors")
    kb_nodes = importlib.import_module("redi_accelerate.nodes.kb_nodes")
    cond = kb_nodes.encode_batch(clip, ["a large red circle at the center on a white background"] * 2)
    neg = clip.encode_from_tokens(clip.tokenize(""), return_pooled=True)
    latent = torch.zeros(2, 4, 8, 8)
    seeds = [3, 4]
    noise = pack.noise_for(latent, seeds)
    ran = []
    for s in samplers:
        scheduler = next((sch for sch in schedulers if pack.sampler_problem(s, sch) is True), None)
        if scheduler is None:
            continue
        ph = pack.Phases(model, 6, 6.0, s, scheduler, [[neg[0], {}]], preview=False)
        full = ph.full(cond, latent, noise, seeds[0], item_seeds=seeds)
        state = ph.key_phase(cond, latent, noise, seeds[0], 2, item_seeds=seeds)
        out = ph.finish(cond, state.x, 2, seeds[0])
        assert torch.isfinite(full).all() and torch.isfinite(out).all() and out.shape == full.shape, s
        ran.append(s)
    assert {"euler", "euler_ancestral", "heun", "dpmpp_2m"} <= set(ran), ran
    assert len(ran) >= len(samplers) - 20, ran  # about 18 are refused with every scheduler
