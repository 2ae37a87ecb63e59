"""Which key/value steps a noise schedule allows (kb_tools/noise_levels.py)."""

import numpy as np
import pytest

from kb_tools.noise_levels import MAX_KEY_NSR, MIN_VALUE_NSR, noise_ratio, step_problem, usable_steps


def karras(n: int, lo: float = 0.0292, hi: float = 14.61, rho: float = 7.0) -> list[float]:
    ramp = np.linspace(0, 1, n)
    s = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    return [*s.tolist(), 0.0]


def geometric(n: int, lo: float = 0.0292, hi: float = 14.61) -> list[float]:
    return [*np.geomspace(hi, lo, n).tolist(), 0.0]


def test_noise_ratio_of_eps_and_flow_models():
    assert noise_ratio(1.5, flow=False) == 1.5
    assert noise_ratio(0.5, flow=True) == pytest.approx(1.0)
    assert noise_ratio(1.0, flow=True) == float("inf")


def test_a_schedule_with_noise_left_at_the_value_step_passes():
    sig = karras(20)
    assert sig[4] <= MAX_KEY_NSR and sig[8] >= MIN_VALUE_NSR
    assert step_problem(sig, 4, 8, False, "karras at 20 steps") is None


def test_too_little_noise_at_the_value_step_is_refused_with_the_steps_to_use():
    sig = geometric(20)
    keys, values = usable_steps(sig, False)
    v_hi = max(values)
    assert sig[v_hi] >= MIN_VALUE_NSR > sig[v_hi + 1]
    msg = step_problem(sig, 4, 10, False, "exponential at 20 steps")
    assert msg is not None and "value step 10" in msg and f"a value step of at most {v_hi}" in msg
    assert step_problem(sig, 4, v_hi, False, "exponential at 20 steps") is None


def test_a_key_step_at_pure_noise_is_refused():
    sig = [14.6, 14.5, 14.4, 14.3, 14.2, 12.0, 9.0, 6.0, 3.0, 2.0, 1.5, 0.5, 0.0]
    msg = step_problem(sig, 2, 9, False, "custom at 12 steps")
    assert "key step 2" in msg and "pure noise" in msg and "a key step of at least 6" in msg


def test_flow_models_use_their_own_noise_ratio():
    sig = np.linspace(1.0, 0.0, 21).tolist()  # t = 1 - i/20
    assert step_problem(sig, 4, 9, True, "simple at 20 steps") is None  # t = 0.55: ratio 1.22
    msg = step_problem(sig, 4, 10, True, "simple at 20 steps")  # t = 0.5: ratio 1.0
    assert "value step 10" in msg and "at most 9" in msg


def test_a_schedule_without_any_usable_pair_says_so():
    sig = [14.6, 14.6, 14.5, 14.4, 0.5, 0.0]
    assert "leaves no such pair" in step_problem(sig, 1, 3, False, "odd at 5 steps")
