import numpy as np
import pytest

from kb_tools import builder
from kb_tools.errors import KBError
from kb_tools.storage.knowledge_base import KnowledgeBase
from redi_core.retrieval import GUARD_DEFAULTS, KeyState, ReDiParams, retrieve, signatures_match, summary_lines

from .kb_fixtures import SHAPE, fake_run_batch, fingerprint

PROMPTS = [f"p{i}" for i in range(10)]


@pytest.fixture()
def kb(tmp_path):
    builder.build(tmp_path / "kb", fingerprint(), PROMPTS, 4, fake_run_batch())
    return KnowledgeBase.load(tmp_path / "kb")


def state_from(kb, ids, scale=1.0, step=2):
    x = kb.values("latent", step, ids) * scale
    return KeyState(x=x, denoised=kb.values("denoised", step, ids) * scale, eps=np.ones_like(x))


def test_query_equal_to_a_key_returns_its_value(kb):
    ret = retrieve(kb, state_from(kb, [3, 7]), ReDiParams(2, 6, 1), sigma_v=1.0)
    assert ret.accepted.all()
    assert [r.neighbours[0] for r in ret.reports] == [3, 7]
    np.testing.assert_allclose(ret.x_v, kb.values("latent", 6, [3, 7]), atol=1e-5)


def test_scaled_query_rescales_value(kb):
    ret = retrieve(kb, state_from(kb, [5], scale=2.0), ReDiParams(2, 6, 1, max_weight_deviation=0.0), sigma_v=1.0)
    assert ret.reports[0].weights[0] == pytest.approx(2.0, rel=1e-5)
    np.testing.assert_allclose(ret.x_v[0], 2.0 * kb.values("latent", 6, [5])[0], atol=1e-4)


def test_denoised_space_renoises_with_query_noise(kb):
    st = state_from(kb, [1])
    ret = retrieve(kb, st, ReDiParams(2, 6, 1, key_space="denoised"), sigma_v=0.5)
    np.testing.assert_allclose(ret.x_v[0], kb.values("denoised", 6, [1])[0] + 0.5 * st.eps[0], atol=1e-5)


def test_combination_of_neighbours(kb):
    keys = kb.keys("latent", 4)
    q = (0.7 * keys[2] + 0.3 * keys[8]).reshape(1, *SHAPE)
    ret = retrieve(kb, KeyState(q, q, q), ReDiParams(4, 6, neighbours=10, max_key_distance=0.0), sigma_v=1.0)
    r = ret.reports[0]
    assert r.residual < 1e-5
    expected = 0.7 * kb.values("latent", 6, [2])[0] + 0.3 * kb.values("latent", 6, [8])[0]
    np.testing.assert_allclose(ret.x_v[0], expected, atol=1e-4)


def test_guard_falls_back(kb):
    far = KeyState(np.full((1, *SHAPE), 50.0, np.float32), np.zeros((1, *SHAPE), np.float32), np.zeros((1, *SHAPE), np.float32))
    ret = retrieve(kb, far, ReDiParams(2, 6, 1, max_key_distance=0.5), sigma_v=1.0)
    assert not ret.accepted[0] and "nearest key" in ret.reports[0].reason
    lines = summary_lines(ret, ReDiParams(2, 6, 1), 10)
    assert any("full sampling from step 2" in ln for ln in lines)
    assert any("1 of 1 items sampled in full" in ln for ln in lines)


def test_guard_is_on_by_default():
    p = ReDiParams(2, 6)
    assert p.max_key_distance == GUARD_DEFAULTS["max_key_distance"] > 0
    assert p.max_residual == GUARD_DEFAULTS["max_residual"]  # off: it does not separate good from bad (README)
    assert p.max_weight_deviation == GUARD_DEFAULTS["max_weight_deviation"] > 0


def test_guard_rejects_a_rescaled_trajectory(kb):
    # a key phase that reaches step k in another scale (the UniPC bug of issue 15: w = +5.36 with H=1)
    ret = retrieve(kb, state_from(kb, [5], scale=5.36), ReDiParams(2, 6, 1, max_key_distance=0.0, max_residual=0.0), sigma_v=1.0)
    assert not ret.accepted[0] and "sum to +5.360" in ret.reports[0].reason
    off = retrieve(kb, state_from(kb, [5], scale=5.36), ReDiParams(2, 6, 1, "latent", 0, 0, 0), sigma_v=1.0)
    assert off.accepted[0]
    assert any("guard: OFF" in ln for ln in summary_lines(off, ReDiParams(2, 6, 1, "latent", 0, 0, 0), 10))


def test_negative_guard_thresholds_refused(kb):
    with pytest.raises(KBError, match="max_residual must be 0"):
        retrieve(kb, state_from(kb, [0]), ReDiParams(2, 6, 1, max_residual=-1.0), sigma_v=1.0)


@pytest.mark.parametrize(("a", "b", "same"), [
    ("77x64:0.1000,0.2000;1.0000", "77x64:0.1000,0.2000;1.0000", True),
    ("77x64:0.1000,0.2000;1.0000", "77x64:0.1010,0.2000;1.0005", True),
    ("77x64:0.1000,0.2000;1.0000", "77x64:0.1300,0.2000;1.0000", False),
    ("77x64:0.1000,0.2000;1.0000", "154x64:0.1000,0.2000;1.0000", False),
    ("77x64:0.1000,0.2000;1.0000", "garbage", False),
])
def test_conditioning_signatures(a, b, same):
    assert signatures_match(a, b) is same


@pytest.mark.parametrize(
    ("k", "v", "match"),
    [(6, 6, "key step"), (6, 4, "key step"), (2, 11, "<= steps"), (0, 4, "1 <= key step"), (3, 6, "key step 3 is not stored"), (2, 5, "value step 5 is not stored")],
)
def test_bad_steps_refused(kb, k, v, match):
    with pytest.raises(KBError, match=match):
        retrieve(kb, state_from(kb, [0]), ReDiParams(k, v, 1), sigma_v=1.0)


def test_wrong_latent_shape_refused(kb):
    bad = np.zeros((1, 4, 3, 3), np.float32)
    with pytest.raises(KBError, match="latent shape"):
        retrieve(kb, KeyState(bad, bad, bad), ReDiParams(2, 6, 1), sigma_v=1.0)


def test_after_key_phase_noise_estimate():
    x_prev, den = np.full((1, *SHAPE), 3.0, np.float32), np.full((1, *SHAPE), 1.0, np.float32)
    st = KeyState.after_key_phase(np.zeros((1, *SHAPE), np.float32), x_prev, den, 0.5)
    np.testing.assert_allclose(st.eps, 4.0)
    np.testing.assert_array_equal(st.denoised, den)


def test_starts_split_accepted_and_rejected(kb):
    far = np.full((1, *SHAPE), 50.0, np.float32)
    near = kb.values("latent", 2, [4])
    x = np.concatenate([near, far])
    params = ReDiParams(2, 6, 1, max_key_distance=0.5)
    ret = retrieve(kb, KeyState(x, x, np.zeros_like(x)), params, sigma_v=1.0)
    groups = {start: (idx.tolist(), src) for start, idx, src in ret.starts(KeyState(x, x, x), params)}
    assert groups[6][0] == [0] and groups[2][0] == [1]
    np.testing.assert_allclose(groups[6][1], kb.values("latent", 6, [4]), atol=1e-5)
    np.testing.assert_array_equal(groups[2][1], far)


def test_denoised_distance_rejects_a_latent_match_with_other_content(kb):
    """Latent keys match (same noise), but the query's denoised estimate is another entry's: the
    per-image predictor refuses it and says why; with matching content it accepts."""
    st = state_from(kb, [3])
    other = KeyState(x=st.x, denoised=kb.values("denoised", 2, [8]), eps=st.eps)
    params = ReDiParams(2, 6, 1, max_denoised_distance=0.5)
    ok = retrieve(kb, st, params, sigma_v=1.0)
    assert ok.accepted.all() and ok.reports[0].denoised_distance == pytest.approx(0.0, abs=1e-5)
    bad = retrieve(kb, other, params, sigma_v=1.0)
    assert not bad.accepted.any()
    assert "denoised estimates at step 2 differ" in bad.reports[0].reason
    assert bad.reports[0].denoised_distance > 0.5
    # off with the guard's switch, and not measured for denoised keys (there the key is the estimate)
    assert retrieve(kb, other, ReDiParams(2, 6, 1, max_key_distance=0.0, max_denoised_distance=0.5), sigma_v=1.0).accepted.all()
    assert retrieve(kb, st, ReDiParams(2, 6, 1, key_space="denoised"), sigma_v=1.0).reports[0].denoised_distance is None
