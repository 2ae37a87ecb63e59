"""ReDi nodes through the real server: NFE counts, reports, and clear errors on bad input."""

import copy
import json

import pytest

from redi_demo import dataset, workflows

from .verdict_file import unverified_working_pair, verified

pytestmark = pytest.mark.integration


def _report(entry: dict) -> list[str]:
    return [ln for out in entry["outputs"].values() for ln in out.get("redi_report", [])]


@pytest.fixture(scope="module")
def built(server):
    entry = server.run(workflows.redi_build_kb())
    assert entry["status"]["status_str"] == "success", server.error_of(entry)
    return entry


def test_redi_nfe_is_key_phase_plus_finish(server, built):
    entry = server.run(workflows.redi_ksampler(seed=1024))
    assert entry["status"]["status_str"] == "success", server.error_of(entry)
    lines = _report(entry)
    calls = [ln for ln in lines if ln.startswith("UNet calls:")]
    # euler, cfg > 1 with cond and uncond batched: one call per step; k=4, v=10 of 20 steps
    k, v = workflows.REDI_OPTS["key_step"], workflows.REDI_OPTS["value_step"]
    assert calls and calls[0].split()[2] == str(k + workflows.STEPS - v), lines
    assert any("skipped 6 of 20 steps" in ln for ln in lines), lines


def _expect_error(server, graph: dict, *needles: str) -> str:
    entry = server.run(graph)
    assert entry["status"]["status_str"] == "error"
    err = server.error_of(entry)
    msg = err["exception_message"]
    for n in needles:
        assert n in msg, msg
    assert server.get("/system_stats")  # the server is still up
    return msg


def test_mismatched_steps_and_cfg_refused_with_fix(server, built):
    g = workflows.redi_ksampler()
    g["7"]["inputs"]["steps"] = 25
    g["7"]["inputs"]["cfg"] = 4.0
    _expect_error(server, g, "steps: set to 25, the KB was built with 20; use 20", "cfg: set to 4.0")


def test_wrong_size_refused(server, built):
    g = workflows.redi_ksampler()
    g["4"]["inputs"]["width"] = 128
    _expect_error(server, g, "size: the latent is [4, 8, 16]", "64x64 image")


@pytest.mark.parametrize(("key", "value", "needle"), [(10, 10, "key step (10) < value step (10)"), (4, 9, "value step 9 is not stored")])
def test_out_of_range_steps_refused(server, built, key, value, needle):
    g = workflows.redi_ksampler()
    g["7"]["inputs"]["key_step"] = key
    g["7"]["inputs"]["value_step"] = value
    _expect_error(server, g, needle)


def test_corrupt_kb_refused_by_loader(server, built):
    kb_dir = server.kb_dir / workflows.KB_NAME
    bad = server.kb_dir / "corrupt_kb"
    bad.mkdir(exist_ok=True)
    for f in kb_dir.iterdir():
        data = f.read_bytes()
        (bad / f.name).write_bytes(data[: len(data) // 2] if f.name.startswith("shard_") else data)
    g = workflows.redi_sampler_custom()
    g["6"]["inputs"]["kb_name"] = "corrupt_kb"
    # opening reads no shard (format 2); the query's first row read names the damaged file
    _expect_error(server, g, "shard_0000", ".safetensors", "rebuild")


def test_bad_stored_steps_refused_and_nothing_written(server):
    g = workflows.redi_build_kb()
    g["6"]["inputs"]["stored_steps"] = "4,25"
    g["6"]["inputs"]["kb_name"] = "never_written"
    _expect_error(server, g, "outside 1..20")
    assert not (server.kb_dir / "never_written").exists()


def test_style_split_reports_the_split(server, built):
    entry = server.run(workflows.stylize())
    assert entry["status"]["status_str"] == "success", server.error_of(entry)
    lines = _report(entry)
    assert "style: in striped style" in lines, lines
    assert "content: a large blue square at the center on a white background" in lines, lines


def test_feature_reuse_runs_and_differs_from_full(server):
    full = server.run(workflows.demo_txt2img(seed=7))
    g = copy.deepcopy(workflows.feature_reuse(seed=7))
    fr = server.run(g)
    assert full["status"]["status_str"] == fr["status"]["status_str"] == "success", json.dumps(server.error_of(fr))
    assert "[ReDi FeatureReuse]" in server.log()


@pytest.mark.parametrize(("sampler", "scheduler", "cfg", "calls_per_step"), [
    ("euler_ancestral", "normal", 6.0, 1), ("dpmpp_2m", "simple", 6.0, 1), ("heun", "normal", 6.0, 2), ("euler", "normal", 1.0, 1)])
def test_redi_with_other_samplers_and_cfg_one(server, sampler, scheduler, cfg, calls_per_step):
    prompts = workflows.kb_prompts(12, seed=3)
    g = workflows.redi_ksampler(prompts=prompts)
    name = f"kb_{sampler}_{scheduler}_{str(cfg).replace('.', '_')}"
    g["6"]["inputs"].update({"sampler_name": sampler, "scheduler": scheduler, "cfg": cfg, "kb_name": name})
    g["7"]["inputs"].update({"sampler_name": sampler, "scheduler": scheduler, "cfg": cfg})
    entry = server.run(g)
    assert entry["status"]["status_str"] == "success", server.error_of(entry)
    calls = [ln for ln in _report(entry) if ln.startswith("UNet calls:")][0]
    k, v = workflows.REDI_OPTS["key_step"], workflows.REDI_OPTS["value_step"]
    # heun evaluates twice per step except the last step of each phase (which ends at sigma 0 only in the finish)
    if verified(sampler, scheduler):
        expected = {1: k + workflows.STEPS - v, 2: 2 * k + 2 * (workflows.STEPS - v) - 1}[calls_per_step]
    else:  # not verified per image: sampled in full (the key phase, then the finish from k)
        expected = {1: workflows.STEPS, 2: 2 * k + 2 * (workflows.STEPS - k) - 1}[calls_per_step]
    assert int(calls.split()[2]) == expected, calls


def test_redi_sampler_uses_content_conditioning_for_the_key(server, built):
    plain = workflows.redi_sampler_custom(prompt=workflows.STYLE_PROMPT)
    styled = workflows.redi_sampler_custom(prompt=workflows.STYLE_PROMPT)
    styled["15"] = {"class_type": "ReDiStyleSplit", "inputs": {"clip": ["1", 1], "prompt": workflows.STYLE_PROMPT, "separator": "", "extra_patterns": ""}}
    styled["7"]["inputs"]["content_positive"] = ["15", 2]
    styled["11"]["inputs"]["positive"] = ["15", 3]
    images = []
    for g in (plain, styled):
        entry = server.run(g)
        assert entry["status"]["status_str"] == "success", server.error_of(entry)
        images.append(server.images(entry)[0].read_bytes())
    assert images[0] != images[1], "the content conditioning did not change the key phase"
    assert "[ReDi Sampler]" in server.log()


def test_reports_name_the_kb_not_a_server_path(server, built):
    """Builder and Loader reports go into screenshots and saved workflows: the KB's name and its
    fingerprinted settings, never the server's folder."""
    server.run(workflows.redi_sampler_custom())
    # every report of the session: the KB Loader's output is cached after its first run in any test
    lines = [ln for entry in server.get("/history").values() for ln in _report(entry)]
    text = "\n".join(lines)
    assert f"KB {workflows.KB_NAME}:" in text
    assert str(server.kb_dir) not in text and "/models/" not in text, text
    assert "negative prompt: empty" in text and "model " in text and "sampling: " in text, text  # the demo KB's negative is ""



def test_a_jump_that_lands_on_another_picture_restarts_from_the_key_step(server):
    """The guard's landing check: with latent keys at the KB's seed (the paper's setting, where the shared
    noise dominates the key), this query's nearest trajectory is close in key distance but the finish's
    first estimate shows another picture (measured: 0.93 against a limit of 0.6, scripts/sampler_support.py
    --arrays), so it restarts from step k at the cost of the one wasted call, and the report says why."""
    prompts = [s.prompt() for s in dataset.random_samples(16, 12345, styles=("plain",))]
    query = dataset.random_samples(96, 999, styles=("plain",))[81].prompt()
    g = workflows.redi_ksampler(prompt=query, seed=1024, prompts="\n".join(prompts))
    g["6"]["inputs"].update({"kb_name": "landing16", "batch_size": 16, "stored_steps": "4,10"})
    g["7"]["inputs"]["key_space"] = "latent"
    entry = server.run(g)
    assert entry["status"]["status_str"] == "success", server.error_of(entry)
    lines = _report(entry)
    assert any("full sampling from step 4, guard: the jump to step 10 landed on another picture" in ln for ln in lines), lines
    calls = [ln for ln in lines if ln.startswith("UNet calls:")][0]
    assert int(calls.split()[2]) == workflows.STEPS + 1, calls  # the wasted first call of the finish from v


def test_a_pair_not_verified_per_image_is_sampled_in_full_with_the_reason(server):
    sampler, scheduler = unverified_working_pair()
    g = workflows.redi_ksampler(prompts=workflows.kb_prompts(4, seed=5))
    g["6"]["inputs"].update({"sampler_name": sampler, "scheduler": scheduler, "kb_name": f"unverified_{sampler}_{scheduler}"})
    g["7"]["inputs"].update({"sampler_name": sampler, "scheduler": scheduler})
    entry = server.run(g)
    assert entry["status"]["status_str"] == "success", server.error_of(entry)
    lines = _report(entry)
    held = [ln for ln in lines if ln.startswith(f"ReDi: {sampler} with the {scheduler} scheduler is not verified per image")]
    assert held and "verified:" in held[0] and not any("skipped 6 of" in ln for ln in lines), lines
    assert any(ln.startswith("[0] full sampling from step 4") for ln in lines), lines
