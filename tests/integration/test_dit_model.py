"""The Flux DiT demo model through the real server: the stock loader lists and loads it, ReDi
and FeatureReuse run on it, and a KB never crosses between the two demo models or a shift."""

import copy
import json
from pathlib import Path

import pytest

from redi_demo import workflows

pytestmark = pytest.mark.integration


def _report(entry: dict) -> list[str]:
    return [ln for out in entry["outputs"].values() for ln in out.get("redi_report", [])]


def _ok(server, graph: dict) -> dict:
    entry = server.run(graph)
    assert entry["status"]["status_str"] == "success", json.dumps(server.error_of(entry), indent=1)[:3000]
    return entry


def _error(server, graph: dict) -> str:
    entry = server.run(graph)
    assert entry["status"]["status_str"] == "error", entry["status"]
    assert server.get("/system_stats")  # the server is still up
    return server.error_of(entry)["exception_message"]


KB_PROMPTS = workflows.kb_prompts(16, seed=5)


@pytest.fixture(scope="module")
def dit_kb(server):
    """The DiT's own KB, built by template 11's builder (16 prompts keep it short)."""
    return _ok(server, workflows.dit_redi_ksampler(prompts=KB_PROMPTS))


def test_stock_loader_lists_the_dit(server):
    info = server.get("/object_info/CheckpointLoaderSimple")
    names = info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
    assert workflows.DIT.ckpt in names, names


def test_redi_skips_steps_on_the_dit(server, dit_kb):
    """A stored prompt at the KB's seed: its own trajectory is the nearest, so the jump is taken."""
    entry = _ok(server, workflows.dit_redi_ksampler(KB_PROMPTS.splitlines()[0], seed=1024, prompts=KB_PROMPTS))
    lines = _report(entry)
    k, v = workflows.REDI_OPTS["key_step"], workflows.REDI_OPTS["value_step"]
    calls = [ln for ln in lines if ln.startswith("UNet calls:")]
    assert calls and int(calls[0].split()[2]) == k + workflows.STEPS - v, lines
    assert any(f"skipped {v - k} of {workflows.STEPS} steps" in ln for ln in lines), lines


def test_feature_reuse_reuses_dit_blocks(server):
    g = workflows.dit_feature_reuse(seed=11)
    g["14"]["inputs"].update(schedule="fixed", interval=2, score_mixing=False)  # every other step reuses the blocks
    _ok(server, g)
    log = server.log()
    assert "[ReDi FeatureReuse]" in log
    line = log.split("[ReDi FeatureReuse]")[-1].splitlines()[0]
    assert "10 keyframes, 10 with reused blocks" in line and "'dit': 60" in line, line  # 10 reuse steps x 6 blocks


def test_feature_reuse_survives_a_later_model_patch(server):
    """A node after FeatureReuse clones the model (ModelSamplingFlux here, LoRA loaders too): the DiT's
    blocks are still reused (a clone once copied the reuse state, and nothing was reused)."""
    g = workflows.dit_feature_reuse(seed=12)
    g["14"]["inputs"].update(schedule="fixed", interval=2, score_mixing=False)
    g["20"] = {"class_type": "ModelSamplingFlux", "inputs": {"model": ["14", 0], "max_shift": 1.15, "base_shift": 0.5,
                                                             "width": 64, "height": 64}}
    g["5"]["inputs"]["model"] = ["20", 0]
    _ok(server, g)
    line = server.log().split("[ReDi FeatureReuse]")[-1].splitlines()[0]
    assert "10 with reused blocks" in line and "'dit': 60" in line, line


def test_sd1_kb_refused_on_the_dit(server, dit_kb):
    """A KB of one demo model queried with the other: refused, naming the model, the fix on the node."""
    build = workflows.redi_build_kb(workflows.kb_prompts(8, seed=9))
    build["6"]["inputs"]["kb_name"] = "sd1_kb_for_the_dit_test"
    _ok(server, build)
    g = workflows.dit_redi_ksampler(prompts=KB_PROMPTS)
    g["6"] = {"class_type": "ReDiKBLoader", "inputs": {"kb_name": "sd1_kb_for_the_dit_test"}}
    msg = _error(server, g)
    assert "model: KB" in msg and "build a KB with this model" in msg, msg


def test_flux_shift_is_fingerprinted(server, dit_kb):
    """ModelSamplingFlux in front of the sampler changes every trajectory: a KB built without it is refused."""
    g = copy.deepcopy(workflows.dit_redi_ksampler(prompts=KB_PROMPTS))
    g["20"] = {"class_type": "ModelSamplingFlux", "inputs": {"model": ["1", 0], "max_shift": 1.15, "base_shift": 0.5,
                                                             "width": 64, "height": 64}}
    g["7"]["inputs"]["model"] = ["20", 0]
    msg = _error(server, g)
    assert "model sampling" in msg and "shift" in msg, msg


def _flow_only_failure() -> tuple[str, str, str]:
    """A pair the shipped verdicts refuse on flow models (measured on the DiT) but accept on SD1.x."""
    verdicts = json.loads((Path(__file__).resolve().parents[2] / "comfy_adapter" / "sampler_verdicts.json").read_text())
    for sampler, per in sorted(verdicts["flow"]["fails"].items()):
        for scheduler, why in per.items():
            if sampler in verdicts["works"].get(scheduler, []):
                return sampler, scheduler, why
    pytest.skip("no pair fails on the DiT alone")


def test_pair_that_fails_on_flow_is_refused_on_the_dit(server):
    """The sampler x scheduler verdicts measured on the DiT decide for it: a pair that works on SD1.x but
    failed on the DiT passes the queue (no model is known there) and is refused on the node, with why."""
    sampler, scheduler, why = _flow_only_failure()
    g = workflows.dit_redi_ksampler(prompts=workflows.kb_prompts(4, seed=21))
    for node in g.values():
        if "scheduler" in node["inputs"]:
            node["inputs"]["scheduler"] = scheduler
        if "sampler_name" in node["inputs"]:
            node["inputs"]["sampler_name"] = sampler
        if node["inputs"].get("kb_name") == workflows.DIT_KB_NAME:
            node["inputs"]["kb_name"] = "dit_kb_for_the_flow_verdict_test"
    msg = _error(server, g)
    assert f"sampler {sampler!r} with the {scheduler} scheduler does not work with ReDi" in msg, msg
    assert why in msg and "measured on the Flux DiT demo model" in msg, msg
