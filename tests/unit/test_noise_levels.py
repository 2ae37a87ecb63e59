"""The quality guard's noise-level checks (redi_core/noise_levels.py) through retrieve()."""

import numpy as np
import pytest

from kb_tools import builder
from kb_tools.storage.knowledge_base import KnowledgeBase
from redi_core.noise_levels import (
    FLOW_MAX_KEY_NSR,
    LOW_NOISE_MAX_DISTANCE,
    MAX_KEY_NSR,
    MIN_VALUE_NSR,
    NoiseLevels,
    noise_ratio,
)
from redi_core.retrieval import KeyState, ReDiParams, retrieve, summary_lines

from .kb_fixtures import fake_run_batch, fingerprint

ROOMY = NoiseLevels(key=5.0, value=1.5)
TIGHT = NoiseLevels(key=5.0, value=0.9)


@pytest.fixture()
def kb(tmp_path):
    builder.build(tmp_path / "kb", fingerprint(), [f"p{i}" for i in range(6)], 6, fake_run_batch())
    return KnowledgeBase.open(tmp_path / "kb")


def query_at(kb, entry: int, rel_distance: float) -> KeyState:
    """A query whose nearest key (entry's) lies at about `rel_distance` (relative to the query's norm)."""
    key = kb.values("latent", 2, [entry])
    rng = np.random.default_rng(0)
    d = rng.normal(size=key.shape).astype(np.float32)
    d *= rel_distance * np.linalg.norm(key) / np.linalg.norm(d)
    q = key + d
    return KeyState(q, q, np.zeros_like(q))


def test_noise_ratio_of_eps_and_flow_models():
    assert noise_ratio(1.5, flow=False) == 1.5
    assert noise_ratio(0.5, flow=True) == pytest.approx(1.0)
    assert noise_ratio(1.0, flow=True) == float("inf")
    lv = NoiseLevels.of([14.6, 5.0, 1.1, 0.0], 1, 2, flow=False)
    assert (lv.key, lv.value) == (5.0, pytest.approx(1.1))


def test_with_noise_left_at_v_a_farther_neighbour_is_used():
    assert ROOMY.value >= max(MIN_VALUE_NSR.values())
    assert ROOMY.rejection("latent", 0.45, 10) is None
    # denoised keys (new seeds) tolerate less noise at v than latent keys (calibrated on karras' 1.09)
    between = NoiseLevels(key=5.0, value=1.1)
    assert between.rejection("denoised", 0.9, 10) is None and between.rejection("latent", 0.3, 10) is not None


def test_with_little_noise_left_only_close_neighbours_are_used(kb):
    far = retrieve(kb, query_at(kb, 3, 0.3), ReDiParams(2, 6, 1), sigma_v=0.9, noise=TIGHT)
    assert not far.accepted[0]
    assert "value step 6" in far.reports[0].reason and "lower value step" in far.reports[0].reason
    near = retrieve(kb, query_at(kb, 3, 0.1), ReDiParams(2, 6, 1), sigma_v=0.9, noise=TIGHT)
    assert near.accepted[0] and near.reports[0].distances[0] < LOW_NOISE_MAX_DISTANCE
    lines = summary_lines(far, ReDiParams(2, 6, 1), 10)
    assert any("only neighbours within distance 0.2" in ln for ln in lines)
    assert any("full sampling from step 2" in ln for ln in lines)
    assert retrieve(kb, query_at(kb, 3, 0.3), ReDiParams(2, 6, 1), sigma_v=0.9, noise=ROOMY).accepted[0]


def test_guard_off_uses_every_neighbour(kb):
    off = retrieve(kb, query_at(kb, 3, 0.3), ReDiParams(2, 6, 1, "latent", 0.0, 0.0, 0.0), sigma_v=0.9, noise=TIGHT)
    assert off.accepted[0] and off.noise_note is None


def test_denoised_keys_at_almost_pure_noise_are_not_used(kb):
    pure = NoiseLevels(key=MAX_KEY_NSR + 4, value=1.5)
    exact = query_at(kb, 2, 0.0)
    st = KeyState(exact.x, kb.values("denoised", 2, [2]), exact.eps)
    den = retrieve(kb, st, ReDiParams(2, 6, 1, "denoised"), sigma_v=1.5, noise=pure)
    assert not den.accepted[0] and "almost pure noise" in den.reports[0].reason
    assert retrieve(kb, st, ReDiParams(2, 6, 1, "denoised"), sigma_v=1.5, noise=ROOMY).accepted[0]
    # latent keys at the KB's own seed still tell prompts apart there (the noise is shared)
    assert retrieve(kb, exact, ReDiParams(2, 6, 1, "latent"), sigma_v=1.5, noise=pure).accepted[0]


def test_flow_models_have_their_own_key_limit(kb):
    """Measured on the Flux DiT demo: denoised keys served at noise ratio 28.4 (step 2 of 20), where an
    eps model's keys are blind; the flow limit is above that, and a key step beyond it is still refused."""
    exact = query_at(kb, 2, 0.0)
    st = KeyState(exact.x, kb.values("denoised", 2, [2]), exact.eps)
    flow_step2 = NoiseLevels.of([0.99, 0.966, 0.76, 0.0], 1, 2, flow=True)
    assert MAX_KEY_NSR < flow_step2.key < FLOW_MAX_KEY_NSR
    assert retrieve(kb, st, ReDiParams(2, 6, 1, "denoised"), sigma_v=0.76, noise=flow_step2).accepted[0]
    eps_same_ratio = NoiseLevels(key=flow_step2.key, value=flow_step2.value)
    assert not retrieve(kb, st, ReDiParams(2, 6, 1, "denoised"), sigma_v=0.76, noise=eps_same_ratio).accepted[0]
    step1 = NoiseLevels.of([1.0, 0.984, 0.76, 0.0], 1, 2, flow=True)  # ratio 61
    den = retrieve(kb, st, ReDiParams(2, 6, 1, "denoised"), sigma_v=0.76, noise=step1)
    assert not den.accepted[0] and f"> {FLOW_MAX_KEY_NSR:g}" in den.reports[0].reason
