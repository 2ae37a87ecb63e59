"""Learning from use, in-process on real ComfyUI sampling: an empty library fills from a stream of
prompts and ReDi KSampler gets faster on it; only true full trajectories are recorded; ReDi Record
feeds the library from the stock KSampler and from SamplerCustomAdvanced without changing the image."""

import importlib

import numpy as np
import pytest
import torch

from redi_demo import dataset, host

pytestmark = pytest.mark.integration
STEPS, CFG = 20, 6.0


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    host.load_pack()
    import folder_paths

    root = tmp_path_factory.mktemp("kb_root")
    folder_paths.add_model_folder_path("redi_kb", str(root), is_default=True)
    mods = {name: importlib.import_module(f"redi_accelerate.{name}") for name in
            ("nodes.redi_ksampler", "nodes.redi_record", "nodes.kb_nodes", "kb_tools.library", "comfy_adapter")}
    model, clip, _ = host.load_checkpoint(host.PACK_ROOT / "models" / "redi_demo_shapes.safetensors")
    neg = clip.encode_from_tokens(clip.tokenize(""), return_pooled=True)
    yield mods, model, clip, [[neg[0], {}]], root
    folder_paths.folder_names_and_paths["redi_kb"][0].remove(str(root))


def _redi(env, cond, seed, library, **kw):
    mods, model, _, negative, _ = env
    rk = mods["nodes.redi_ksampler"]
    counter = rk.NFECounter()
    res = rk.ReDiKSampler.execute(counter.attach(model), seed, STEPS, CFG, "euler", "normal", cond, negative,
                                  {"samples": torch.zeros(1, 4, 8, 8)}, 4, 10, 1, "auto", 1.5, 0.0, library=library, **kw)
    mods["kb_tools.library"].RECORDER.flush(60)
    return res.result[0]["samples"], counter.calls, res.ui["redi_report"]


def _kb(env, library):
    mods, *_, root = env
    kbs = mods["kb_tools.library"].Library(root / library).list()
    assert len(kbs) == 1, kbs
    return kbs[0]


def test_empty_library_fills_from_a_stream_and_gets_faster(env):
    mods, model, clip, negative, root = env
    themes = dataset.random_samples(3, 404)
    rng = np.random.default_rng(405)
    calls, full_sampled = [], 0
    for i in range(18):
        prompt = themes[i % 3].prompt()
        cond = mods["nodes.kb_nodes"].encode_batch(clip, [prompt])
        before = _kb(env, "stream").count if i else 0
        _, n, lines = _redi(env, cond, int(rng.integers(2**31)), "stream")
        jumped = any("jumped from step" in ln for ln in lines)
        assert lines[0].startswith("library stream: KB redidemoshap-euler-normal-20s-cfg6-8x8-"), lines
        assert f", {before} trajectories;" in lines[0], lines
        after = _kb(env, "stream").count
        # only true full trajectories are recorded: an image that jumped adds nothing
        assert after == before + (0 if jumped else 1), (jumped, before, after, lines)
        full_sampled += not jumped
        calls.append(n)
    assert calls[0] == STEPS  # the empty library samples in full
    assert np.mean(calls[-6:]) < 0.8 * STEPS, calls  # later generations jump on what earlier ones recorded
    assert _kb(env, "stream").count == full_sampled


def test_the_recorded_trajectory_is_the_full_run(env):
    mods, model, clip, negative, root = env
    cs = mods["comfy_adapter"]
    cond = mods["nodes.kb_nodes"].encode_batch(clip, ["a small green cross at the top left on a pink background"])
    out, n, _ = _redi(env, cond, 31, "exact")
    assert n == STEPS
    kb = _kb(env, "exact")
    stored = kb.fingerprint.stored_steps
    latent = torch.zeros(1, 4, 8, 8)
    ph = cs.Phases(model, STEPS, CFG, "euler", "normal", negative, preview=False)
    x, d = ph.trajectory(cond, latent, cs.noise_for(latent, [31]), [31], stored)
    opened = mods["kb_tools.library"].Library(root / "exact").open(kb)
    for s in stored:
        np.testing.assert_allclose(opened.values("latent", s, [0])[0], x[s][0], atol=2e-2, rtol=2e-3)
        np.testing.assert_allclose(opened.values("denoised", s, [0])[0], d[s][0], atol=2e-2, rtol=2e-3)
    full = ph.full(cond, latent, cs.noise_for(latent, [31]), 31)
    assert torch.allclose(out, full.float(), atol=1e-4)


def test_redi_record_feeds_the_library_from_the_stock_samplers(env):
    import comfy.sample
    import comfy.samplers

    import nodes

    mods, model, clip, negative, root = env
    pos = mods["nodes.kb_nodes"].encode_batch(clip, ["a large purple square at the bottom right on a black background"])
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    patched = mods["nodes.redi_record"].ReDiRecord.execute(model, "record", True).result[0]
    lib = mods["kb_tools.library"]
    plain = nodes.KSampler().sample(model, 5, STEPS, CFG, "euler", "normal", pos, negative, latent)[0]["samples"]
    rec = nodes.KSampler().sample(patched, 5, STEPS, CFG, "euler", "normal", pos, negative, latent)[0]["samples"]
    lib.RECORDER.flush(60)
    assert torch.equal(plain, rec)  # recording changes nothing in the image
    assert _kb(env, "record").count == 1
    nodes.KSampler().sample(patched, 5, STEPS, CFG, "euler", "normal", pos, negative, latent)  # the same seed again
    lib.RECORDER.flush(60)
    assert _kb(env, "record").count == 1  # a duplicate is skipped
    # SamplerCustomAdvanced's path (a guider's sample with a SAMPLER and sigmas) records too
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", STEPS).cpu()
    noise = comfy.sample.prepare_noise(latent["samples"], 6)
    comfy.sample.sample_custom(patched, noise, CFG, comfy.samplers.sampler_object("euler"), sigmas, pos, negative,
                               latent["samples"], disable_pbar=True, seed=6)
    lib.RECORDER.flush(60)
    assert _kb(env, "record").count == 2
    # denoise < 1 is not a full trajectory: nothing recorded
    nodes.KSampler().sample(patched, 7, STEPS, CFG, "euler", "normal", pos, negative, latent, denoise=0.6)
    lib.RECORDER.flush(60)
    assert _kb(env, "record").count == 2
    # ReDi KSampler on the library that ReDi Record filled finds the same KB
    _, _, lines = _redi(env, pos, 5, "record")
    assert ", 2 trajectories;" in lines[0] and "jumped from step" in lines[2], lines


def test_redi_sampler_on_a_library_records_the_full_run_then_jumps(env):
    """ReDi Sampler (SamplerCustomAdvanced's path) with `library` set: an empty library samples in full
    and records the full run's trajectory; the same prompt and seed then jumps from it; ReDi KSampler
    finds the same KB; a balanced library explores (samples in full and records) while it is small."""
    import comfy.sample
    import comfy.samplers

    mods, model, clip, negative, root = env
    cs = mods["comfy_adapter"]
    lib = mods["kb_tools.library"]
    rs = importlib.import_module("redi_accelerate.nodes.redi_sampler")
    pos = mods["nodes.kb_nodes"].encode_batch(clip, ["a small yellow triangle at the top right on a blue background"])
    latent = torch.zeros(1, 4, 8, 8)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", STEPS).cpu()
    impl = rs.ReDiSampler.execute("euler", 4, 10, 1, "auto", 1.5, 0.0, library="sampler_lib").result[0]

    def run(sampler, seed):
        counter = mods["nodes.redi_ksampler"].NFECounter()
        noise = comfy.sample.prepare_noise(latent, seed)
        out = comfy.sample.sample_custom(counter.attach(model), noise, CFG, sampler, sigmas, pos, negative, latent,
                                         disable_pbar=True, seed=seed)
        lib.RECORDER.flush(60)
        return out, counter.calls

    out, calls = run(impl, 21)
    assert calls == STEPS
    assert impl.last_report[0].startswith("library sampler_lib: KB redidemoshap-euler-normal-20s-cfg6-8x8-"), impl.last_report
    assert ", 0 trajectories; recording 1 full" in impl.last_report[0], impl.last_report
    full, _ = run(comfy.samplers.sampler_object("euler"), 21)
    assert torch.allclose(out, full, atol=1e-4)  # sampled in full = the stock sampler's image
    kb = _kb(env, "sampler_lib")
    assert kb.count == 1
    stored = kb.fingerprint.stored_steps
    ph = cs.Phases(model, STEPS, CFG, "euler", "normal", negative, preview=False)
    x, d = ph.trajectory(pos, latent, cs.noise_for(latent, [21]), [21], stored)
    opened = lib.Library(root / "sampler_lib").open(kb)
    for s in stored:  # the recorded trajectory is the full run's
        np.testing.assert_allclose(opened.values("latent", s, [0])[0], x[s][0], atol=2e-2, rtol=2e-3)
        np.testing.assert_allclose(opened.values("denoised", s, [0])[0], d[s][0], atol=2e-2, rtol=2e-3)

    _, calls = run(impl, 21)  # the same prompt and seed: jumps (fidelity, the library's default), records nothing
    assert calls < STEPS and any("jumped from step 3 to step 12" in ln for ln in impl.last_report), impl.last_report
    assert _kb(env, "sampler_lib").count == 1
    _, _, lines = _redi(env, pos, 21, "sampler_lib")  # ReDi KSampler finds the KB ReDi Sampler made
    assert ", 1 trajectories;" in lines[0], lines

    balanced = rs.ReDiSampler.execute("euler", 4, 10, 1, "auto", 1.5, 0.0, library="sampler_lib", speed="balanced").result[0]
    _, calls = run(balanced, 22)
    assert calls == STEPS and any("exploring: the KB holds 1 of the 100" in ln for ln in balanced.last_report), balanced.last_report
    assert _kb(env, "sampler_lib").count == 2  # a small library keeps learning
    quiet = rs.ReDiSampler.execute("euler", 4, 10, 1, "auto", 1.5, 0.0, library="sampler_lib", speed="balanced", learn=False).result[0]
    _, calls = run(quiet, 23)  # not learning: no exploration (it would cost calls for nothing); jumps where the bounds allow
    assert not any("exploring" in ln for ln in quiet.last_report) and "not recording (learn is off)" in quiet.last_report[0]
    assert _kb(env, "sampler_lib").count == 2


def test_redi_sampler_defaults_keep_a_connected_kb_graph_as_before(env):
    """Without library inputs, ReDi Sampler is the old node: the connected KB, fixed k and v."""
    mods, model, clip, negative, root = env
    rs = importlib.import_module("redi_accelerate.nodes.redi_sampler")
    with pytest.raises(mods["kb_tools.library"].KBError, match="connect ReDi KB Loader to `kb`, or name a library"):
        rs.ReDiSampler.execute("euler", 4, 10, 1, "auto", 1.5, 0.0)
    impl = rs.ReDiSampler.execute("euler", 4, 10, 1, "auto", 1.5, 0.0, kb=object.__new__(_FakeKB)).result[0]
    assert impl.library is None and impl.speed == "fixed k/v" and impl.opts == (4, 10, 1, "auto", 1.5, 0.0)


class _FakeKB:
    """Enough of a KB for the node's input check (steps 20, key and value steps stored)."""

    class fingerprint:  # noqa: N801
        steps = 20

    def require_step(self, step, what):
        return None
