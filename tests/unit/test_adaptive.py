"""The per-image value step: tiers from a preset, the choice from the nearest distance, and the
blend at each item's own step (small CPU tensors, a real KB on disk)."""

from __future__ import annotations

import numpy as np
import pytest

from kb_tools.errors import KBError
from kb_tools.library import Library, item_digest, library_steps
from kb_tools.storage.disk_format import Entry
from redi_core import adaptive
from redi_core.retrieval import KeyState
from tests.unit.kb_fixtures import SHAPE
from tests.unit.test_library import run_fp


def test_plan_snaps_to_stored_steps_and_orders_tiers():
    stored = library_steps(20)
    for preset in adaptive.PRESETS:
        k, tiers = adaptive.plan(preset, 20, stored)
        assert k in stored and all(t.value_step in stored and t.value_step > k for t in tiers)
        assert [t.max_distance for t in tiers] == sorted(t.max_distance for t in tiers)  # farthest jump needs the closest match
        assert [t.value_step for t in tiers] == sorted((t.value_step for t in tiers), reverse=True)
    # at every distance, speed skips at least as many steps as balanced, and balanced as fidelity
    plans = {p: adaptive.plan(p, 20, stored) for p in ("fidelity", "balanced", "speed")}

    def jump(preset, dist):
        k, tiers = plans[preset]
        t = adaptive.choose(dist, tiers)
        return 0 if t is None else t.value_step - k

    for dist in np.linspace(0, 1.5, 61):
        assert jump("speed", dist) >= jump("balanced", dist) >= jump("fidelity", dist), dist
    assert jump("speed", 0.1) > jump("fidelity", 0.1)
    with pytest.raises(KBError, match="speed preset"):
        adaptive.plan("turbo", 20, stored)
    with pytest.raises(KBError, match="no value step"):
        adaptive.plan("balanced", 20, (3,))


def test_choose_picks_the_farthest_jump_the_distance_allows():
    tiers = [adaptive.Tier(0.3, 16), adaptive.Tier(0.6, 12)]
    assert adaptive.choose(0.1, tiers).value_step == 16
    assert adaptive.choose(0.3, tiers).value_step == 16
    assert adaptive.choose(0.5, tiers).value_step == 12
    assert adaptive.choose(0.61, tiers) is None


def test_each_item_jumps_by_its_own_distance(tmp_path):
    lib = Library(tmp_path / "lib")
    kb = lib.find_or_create(run_fp())
    stored = kb.fingerprint.stored_steps
    rng = np.random.default_rng(0)
    x = {s: rng.normal(size=(2, *SHAPE)).astype(np.float32) for s in stored}
    d = {s: rng.normal(size=(2, *SHAPE)).astype(np.float32) + 3 for s in stored}
    kb, _ = lib.append(kb, x, d, [Entry("a", 1), Entry("b", 2)], [item_digest("a", 1, 0), item_digest("b", 2, 0)])
    opened = lib.open(kb)
    k, tiers = 3, [adaptive.Tier(0.05, 14), adaptive.Tier(0.5, 8)]
    key0 = opened.full_keys("denoised", k, [0]).reshape(SHAPE)
    q = np.stack([key0, key0 * 1.2, -key0 * 5])  # exact, 20% off, far
    state = KeyState(x=np.zeros((3, *SHAPE), np.float32), denoised=q, eps=np.ones((3, *SHAPE), np.float32))
    sigmas = list(np.linspace(10, 0, 21))
    ret = adaptive.retrieve_adaptive(opened, state, k, tiers, sigmas)
    assert ret.value_steps.tolist() == [14, 8, 3]
    np.testing.assert_allclose(ret.x_start[0], opened.values("denoised", 14, [0])[0] + sigmas[14], rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(ret.x_start[2], state.x[2])  # sampled in full from the key step
    groups = {start: idx.tolist() for start, idx, _ in ret.starts()}
    assert groups == {3: [2], 8: [1], 14: [0]}
    lines = adaptive.summary_lines(ret, "balanced", tiers, 20)
    assert "[0] jumped from step 3 to step 14" in lines[1] and "full sampling from step 3" in "\n".join(lines)


def test_an_empty_kb_samples_every_item_in_full():
    state = KeyState(np.zeros((2, *SHAPE), np.float32), np.zeros((2, *SHAPE), np.float32), np.zeros((2, *SHAPE), np.float32))
    ret = adaptive.retrieve_adaptive(None, state, 3, [adaptive.Tier(1.0, 10)], [0.0] * 21)
    assert ret.value_steps.tolist() == [3, 3] and "no trajectory" in ret.reports[0].reason


def _line_kb(tmp_path, n=5):
    """A library KB whose denoised keys at every stored step lie on a line: u * (1 + 0.1 j), |u| = 10,
    so each key's nearest other key lies at 1.0 (relative: 0.1 / (1 + 0.1 j))."""
    lib = Library(tmp_path / "lib")
    kb = lib.find_or_create(run_fp())
    stored = kb.fingerprint.stored_steps
    u = np.random.default_rng(1).normal(size=SHAPE).astype(np.float32)
    u *= 10 / np.linalg.norm(u)
    d = {s: np.stack([u * (1 + 0.1 * j) for j in range(n)]).astype(np.float32) for s in stored}
    x = {s: v.copy() for s, v in d.items()}
    kb, _ = lib.append(kb, x, d, [Entry(f"e{j}", j) for j in range(n)], [item_digest(f"e{j}", j, 0) for j in range(n)])
    return lib.open(kb), u


def test_kb_spacing_is_the_median_nearest_other_distance(tmp_path):
    opened, _ = _line_kb(tmp_path)
    expected = float(np.median([0.1 / (1 + 0.1 * j) for j in range(5)]))
    assert adaptive.kb_spacing(opened, 3) == pytest.approx(expected, rel=1e-2)
    assert adaptive.kb_spacing(opened, 3, sample=2) == pytest.approx(np.median([0.1, 0.1 / 1.4]), rel=1e-2)  # entries 0 and 4
    cache = adaptive.SpacingCache(size=2)
    assert cache.get(opened, 3, "a") == pytest.approx(expected, rel=1e-2)
    cache._values[("a", 5, 3, adaptive.SPACING_SAMPLE)] = 9.0  # a cached value is reused for the same KB size
    assert cache.get(opened, 3, "a") == 9.0
    cache.get(opened, 4, "a"), cache.get(opened, 6, "a")
    assert len(cache._values) == 2


def test_explore_reason_warm_up_then_density():
    ex = adaptive.Exploration(min_trajectories=10, density_factor=1.5)
    assert "holds 3 of the 10" in adaptive.explore_reason(3, 0.01, ex, 0.5)  # warm-up: even a close key
    assert adaptive.explore_reason(10, 0.74, ex, 0.5) == ""
    assert "1.5 x the KB's spacing 0.500" in adaptive.explore_reason(10, 0.76, ex, 0.5)
    assert adaptive.explore_reason(10, 5.0, adaptive.Exploration(10, 0.0), 0.5) == ""  # density rule off
    assert adaptive.explore_reason(10, 5.0, ex, float("inf")) == ""  # no spacing (a KB of one entry)
    assert adaptive.explore_reason(0, 5.0, None, 0.5) == ""  # not learning: no exploration
    for preset in adaptive.PRESETS:  # every preset has its rule, fidelity (the default) warms up least
        assert adaptive.EXPLORATION[preset].min_trajectories >= adaptive.EXPLORATION["fidelity"].min_trajectories


def test_exploration_sends_a_small_or_uncovered_kb_to_full_sampling(tmp_path):
    opened, u = _line_kb(tmp_path)
    k, tiers = 3, [adaptive.Tier(0.5, 14)]
    perp = np.random.default_rng(2).normal(size=SHAPE).astype(np.float32)
    perp -= u * (perp * u).sum() / (u * u).sum()
    perp *= 2 / np.linalg.norm(perp)  # 2 off the line: relative distance 0.2 from key 0
    key0 = opened.full_keys("denoised", k, [0]).reshape(SHAPE)
    q = np.stack([key0, key0 + perp])
    state = KeyState(x=np.zeros((2, *SHAPE), np.float32), denoised=q, eps=np.ones((2, *SHAPE), np.float32))
    sigmas = list(np.linspace(10, 0, 21))
    rng_state = np.random.get_state()
    plain = adaptive.retrieve_adaptive(opened, state, k, tiers, sigmas)
    assert plain.value_steps.tolist() == [14, 14] and not plain.explored.any()  # no rule: both jump (as before)
    warm = adaptive.retrieve_adaptive(opened, state, k, tiers, sigmas, explore=adaptive.Exploration(6, 1.5))
    assert warm.value_steps.tolist() == [3, 3] and warm.explored.tolist() == [True, True]
    assert "holds 5 of the 6" in warm.reports[0].reason
    np.testing.assert_array_equal(warm.x_start, state.x)
    dense = adaptive.retrieve_adaptive(opened, state, k, tiers, sigmas, explore=adaptive.Exploration(5, 1.5))
    assert dense.value_steps.tolist() == [14, 3] and dense.explored.tolist() == [False, True]  # 0.2 > 1.5 x 0.083
    assert "spacing 0.08" in dense.reports[1].reason
    again = adaptive.retrieve_adaptive(opened, state, k, tiers, sigmas, explore=adaptive.Exploration(5, 1.5))
    assert again.value_steps.tolist() == dense.value_steps.tolist()  # deterministic: no random draw
    np.testing.assert_array_equal(again.x_start, dense.x_start)
    given = adaptive.retrieve_adaptive(opened, state, k, tiers, sigmas, explore=adaptive.Exploration(5, 1.5), spacing=0.5)
    assert given.value_steps.tolist() == [14, 14]  # a sparser KB: 0.2 is within 1.5 x its spacing
    assert all(a == b for a, b in zip(np.random.get_state()[1], rng_state[1]))  # the global RNG is untouched
    empty = adaptive.retrieve_adaptive(None, state, k, tiers, sigmas, explore=adaptive.Exploration(5, 1.5))
    assert empty.explored.all() and (empty.value_steps == k).all()


def test_library_preset_maps_fixed_to_fidelity_and_keeps_presets():
    assert adaptive.library_preset(adaptive.FIXED) == "fidelity"
    for preset in adaptive.PRESETS:
        assert adaptive.library_preset(preset) == preset
    assert adaptive.PRESET_OPTIONS[0] == adaptive.FIXED


def test_fit_tiers_bounds_each_step_below_its_first_failures():
    dist = np.array([0.2, 0.4, 0.6, 0.8, 1.0, 1.2])
    failed = {16: np.array([0, 0, 1, 0, 1, 1], bool), 12: np.array([0, 0, 0, 0, 0, 1], bool), 10: np.zeros(6, bool)}
    tiers = adaptive.fit_tiers(dist, failed)
    assert [(t.value_step, round(t.max_distance, 3)) for t in tiers] == [(16, 0.5), (12, 1.1), (10, 1.2)]
    # one failure allowed per step: 16 reaches past its first failure up to the second
    tiers = adaptive.fit_tiers(dist, failed, max_fail=1)
    assert [(t.value_step, round(t.max_distance, 3)) for t in tiers] == [(16, 0.9), (12, 1.2)]
    # a nearer step that allows no more than a farther one is dropped; a step failing everywhere gives no tier
    tiers = adaptive.fit_tiers(dist, {16: np.zeros(6, bool), 14: np.ones(6, bool), 12: np.zeros(6, bool)})
    assert [(t.value_step, t.max_distance) for t in tiers] == [(16, 1.2)]
    assert adaptive.choose(0.45, adaptive.fit_tiers(dist, failed)).value_step == 16


def test_a_large_kb_gets_the_wide_tiers_and_no_density_exploration():
    stored = library_steps(20)
    for preset in adaptive.LARGE_KB_TIERS:
        k_small, small = adaptive.plan(preset, 20, stored, adaptive.LARGE_KB - 1)
        k_large, large = adaptive.plan(preset, 20, stored, adaptive.LARGE_KB)
        assert k_small == k_large == 2
        assert small == adaptive.plan(preset, 20, stored)[1]  # no count: the small-KB tiers
        assert large[0].value_step == 16 and large[0].max_distance > small[0].max_distance
        assert adaptive.choose(1.0, large).value_step == 16 and adaptive.choose(1.0, small).value_step == 14
    # fidelity has no large-KB tiers
    assert adaptive.plan("fidelity", 20, stored, 10**6) == adaptive.plan("fidelity", 20, stored)
    ex = adaptive.EXPLORATION["balanced"]
    assert "spacing" in adaptive.explore_reason(adaptive.LARGE_KB - 1, 5.0, ex, 0.5)
    assert adaptive.explore_reason(adaptive.LARGE_KB, 5.0, ex, 0.5) == ""
    # the nodes compute the KB's spacing only where the density rule judges: past the warm-up, below LARGE_KB
    assert ex.density_applies(adaptive.LARGE_KB - 1) and not ex.density_applies(adaptive.LARGE_KB)
    assert not ex.density_applies(ex.min_trajectories - 1) and not adaptive.Exploration(10, 0.0).density_applies(50)
