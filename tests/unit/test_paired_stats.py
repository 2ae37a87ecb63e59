"""Benchmark statistics: standard errors, paired differences, per-image failures."""

import numpy as np
import pytest

from redi_demo import evaluator
from redi_demo import paired_stats as ps


def test_frechet_matches_the_evaluators_scipy_version():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(400, 6))
    gen = rng.normal(0.3, 1.2, size=(300, 6))
    assert ps.frechet(gen, ps.RealStats.of(real)) == pytest.approx(evaluator.frechet_distance(gen, real), rel=1e-6)


def test_mean_se_is_the_standard_error_of_the_mean():
    v = np.array([1.0, 2.0, 3.0, 4.0])
    e = ps.mean_se(v)
    assert e.value == 2.5
    assert e.se == pytest.approx(np.std(v, ddof=1) / 2)
    with pytest.raises(ValueError, match="at least 2"):
        ps.mean_se(np.array([1.0]))


def test_pairing_removes_the_shared_per_image_variation():
    rng = np.random.default_rng(1)
    difficulty = rng.normal(30, 5, size=200)  # images differ a lot; the settings differ by 0.3 dB
    a = difficulty + 0.3 + rng.normal(0, 0.1, 200)
    b = difficulty + rng.normal(0, 0.1, 200)
    p = ps.paired(a, b)
    unpaired_se = np.hypot(ps.mean_se(a).se, ps.mean_se(b).se)
    assert p.diff.se < unpaired_se / 10
    assert p.diff.clear_of(2.0) and p.diff.value == pytest.approx(0.3, abs=0.05)
    assert p.share_a_larger > 0.9
    assert not ps.paired(b, b).diff.clear_of(2.0)
    with pytest.raises(ValueError, match="same images"):
        ps.paired(a, b[:-1])


def test_paired_frechet_difference_and_its_bootstrap_error():
    rng = np.random.default_rng(2)
    real = ps.RealStats.of(rng.normal(size=(500, 4)))
    base = rng.normal(size=(300, 4))
    idx = ps.bootstrap_indices(300, 100, seed=3)
    same = ps.paired_frechet(base, base.copy(), real, idx)
    assert same.value == 0.0 and same.se == 0.0
    shifted = ps.paired_frechet(base + 1.0, base, real, idx)
    assert shifted.value > 0 and shifted.clear_of(2.0)
    alone = ps.frechet_se(base + 1.0, real, idx)
    assert alone.se > 0 and alone.value == pytest.approx(ps.frechet(base + 1.0, real))
    assert ps.relative(shifted, 2.0).value == pytest.approx(shifted.value / 2.0)


def test_an_image_fails_under_15_db_or_when_it_loses_an_attribute():
    full = np.array([[True, True], [True, False], [True, True], [False, False]])
    here = np.array([[True, True], [True, True], [False, True], [False, False]])
    psnr = np.array([30.0, 14.9, 40.0, 15.0])
    assert ps.attributes_lost(here, full).tolist() == [False, False, True, False]
    # image 1 gained an attribute but is under 15 dB; image 2 lost one; image 3 sits exactly at 15 dB
    assert ps.failures(psnr, here, full).tolist() == [False, True, True, False]


def test_failure_share_and_its_bounds():
    flags = np.zeros(300, dtype=bool)
    assert ps.share_se(flags).value == 0.0
    assert ps.upper_bound_share(flags) == pytest.approx(3 / 300, rel=0.01)  # the rule of three
    flags[:30] = True
    s = ps.share_se(flags)
    assert s.value == pytest.approx(0.1) and s.se == pytest.approx(np.sqrt(0.1 * 0.9 / 300))
    assert ps.upper_bound_share(flags) > 0.1
