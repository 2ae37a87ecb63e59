"""The guard's landing check: its measure and the finish's regrouping of items that landed elsewhere."""

import numpy as np
import pytest

from redi_core.landing import LandingRejected, finish_groups, landing_guard
from redi_core.retrieval import ItemReport, KeyState, ReDiParams, Retrieval, landing_disagreements, summary_lines

RNG = np.random.default_rng(0)


def pictures(n: int) -> np.ndarray:
    return RNG.normal(size=(n, 4, 8, 8)).astype(np.float32)


def test_same_picture_at_another_contrast_and_offset_agrees():
    q = pictures(3)
    values = landing_disagreements(2.5 * q + 0.3, q)
    np.testing.assert_allclose(values, 0.0, atol=1e-6)


def test_another_picture_disagrees_and_a_moved_one_more_than_a_noisy_one():
    q = pictures(1)
    noisy = q + 0.3 * pictures(1)
    moved = np.roll(q, 3, axis=-1)
    near, far, other = (landing_disagreements(x, q)[0] for x in (noisy, moved, pictures(1)))
    assert near < 0.1 < far
    assert other > 0.8


def test_guard_returns_values_or_raises_with_the_rows_to_keep():
    q = pictures(3)
    check = landing_guard(q, 0.6)
    assert check(q).max() < 1e-6
    landed = q.copy()
    landed[1] = pictures(1)[0]
    with pytest.raises(LandingRejected) as e:
        check(landed)
    assert e.value.keep.tolist() == [True, False, True]
    assert e.value.values[1] > 0.6


def make_retrieval(n: int) -> tuple[Retrieval, KeyState]:
    x = pictures(n)
    state = KeyState(x=x, denoised=pictures(n), eps=np.zeros_like(x))
    reports = [ItemReport(accepted=True) for _ in range(n)]
    return Retrieval(x_v=pictures(n), accepted=np.ones(n, dtype=bool), reports=reports), state


def test_finish_restarts_only_the_items_that_landed_elsewhere():
    ret, state = make_retrieval(4)
    ret.accepted[3] = False  # rejected before the jump by the other checks
    ret.reports[3].accepted = False
    params = ReDiParams(4, 10)
    bad = {1}
    calls = []

    def run(start, idx, src, landing):
        calls.append((start, idx.tolist(), landing is not None))
        if landing is not None:
            landed = state.denoised[idx].copy()
            for j, b in enumerate(idx):
                if b in bad:
                    landed[j] = -landed[j]
            return landing(landed)
        return None

    finish_groups(run, list(ret.starts(state, params)), ret, state, params)
    # the jumped group is checked once; the good rows re-run from v unchecked; the bad one joins the full group
    assert calls == [(10, [0, 1, 2], True), (10, [0, 2], False), (4, [3, 1], False)]
    assert ret.accepted.tolist() == [True, False, True, False]
    assert "landed on another picture" in ret.reports[1].reason and ret.reports[1].landing > 1.5
    assert ret.reports[0].landing == pytest.approx(0.0, abs=1e-6)
    text = "\n".join(summary_lines(ret, params, 20))
    assert "landing 0.6" in text and "[1] full sampling from step 4, guard: the jump to step 10 landed on another picture" in text


def test_finish_without_the_guard_checks_nothing():
    ret, state = make_retrieval(2)
    params = ReDiParams(4, 10, max_key_distance=0.0)
    seen = []
    finish_groups(lambda s, i, x, landing: seen.append(landing), list(ret.starts(state, params)), ret, state, params)
    assert seen == [None]
    assert not params.landing_on and ReDiParams(4, 10).landing_on


def test_negative_landing_limit_is_refused():
    from kb_tools.errors import KBError

    with pytest.raises(KBError, match="max_landing"):
        ReDiParams(4, 10, max_landing=-1.0).validate(20)
