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


@pytest.fixture(scope="module")
def models():
    """The two demo models' patchers: the SD1.x UNet (epsilon) and the Flux DiT (rectified flow)."""
    sd1 = host.load_checkpoint(host.PACK_ROOT / "models" / "redi_demo_shapes.safetensors")[0]
    dit = host.load_checkpoint(host.PACK_ROOT / "models" / "redi_demo_shapes_dit.safetensors")[0]
    return sd1, dit


def test_flow_verdicts_decide_for_flow_models(pack, models, monkeypatch):
    """A pair measured on the Flux DiT is decided by that measurement for flow models, by the SD1.x one for
    epsilon models, and at queue time (no model yet) refused only where both refuse it."""
    samplers = importlib.import_module("redi_accelerate.comfy_adapter.samplers")
    KBError = importlib.import_module("redi_accelerate.kb_tools.errors").KBError
    sd1, dit = models
    assert (samplers.model_kind(sd1), samplers.model_kind(dit)) == ("eps", "flow")
    eps = {"fails": {"euler": {"normal": "eps says no"}}, "works": {"normal": ["heun"], "beta": ["euler", "heun"]}, "verified": {}}
    flow = {"fails": {"euler": {"beta": "flow says no"}}, "works": {"normal": ["euler", "heun"], "beta": ["heun"]},
            "verified": {"beta": ["heun"]}}  # a refusal names the verified samplers of that scheduler
    monkeypatch.setattr(samplers, "VERDICTS", {"eps": eps, "flow": flow})
    with pytest.raises(KBError, match="flow says no, measured on the Flux DiT demo model.*use heun with it"):
        pack.check_sampler("euler", "beta", dit)
    pack.check_sampler("euler", "beta", sd1)
    with pytest.raises(KBError, match="eps says no, measured on the SD1.x demo model"):
        pack.check_sampler("euler", "normal", sd1)
    pack.check_sampler("euler", "normal", dit)
    assert pack.sampler_problem("euler", "beta") is True and pack.sampler_problem("euler", "normal") is True
    # a pair the flow table does not cover falls back to the epsilon verdict, for both kinds
    eps["fails"]["heun"] = {"karras": "eps only"}
    for model in (sd1, dit, None):
        with pytest.raises(KBError, match="eps only"):
            pack.check_sampler("heun", "karras", model)


def test_shipped_flow_verdicts_are_measured_pairs(pack, models):
    """Every pair in the shipped flow table is refused on the DiT with its measurement, or accepted there
    (samplers that cannot restart at the value step stay refused for every model)."""
    samplers = importlib.import_module("redi_accelerate.comfy_adapter.samplers")
    KBError = importlib.import_module("redi_accelerate.kb_tools.errors").KBError
    _, dit = models
    flow = samplers.VERDICTS["flow"]
    assert flow["works"].get("simple") and "euler" in flow["works"]["simple"], flow  # the DiT's default pair works
    for sampler, per in flow["fails"].items():
        for scheduler in per if sampler not in samplers.RESTART_FAILS else ():  # refused for every model
            with pytest.raises(KBError, match="measured on the Flux DiT demo model"):
                pack.check_sampler(sampler, scheduler, dit)
    for scheduler, names in flow["works"].items():
        for sampler in names:
            if sampler not in samplers.RESTART_FAILS:
                pack.check_sampler(sampler, scheduler, dit)
