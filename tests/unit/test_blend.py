import numpy as np
import pytest

from redi_core.blend import blend, lstsq_weights


def test_exact_recovery_of_a_linear_combination():
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(3, 50))
    w_true = np.array([0.5, -1.25, 2.0])
    w, resid = lstsq_weights(keys, w_true @ keys)
    np.testing.assert_allclose(w, w_true, atol=1e-9)
    assert resid < 1e-9
    values = rng.normal(size=(3, 4, 2, 2))
    np.testing.assert_allclose(blend(values, w), np.tensordot(w_true, values, axes=1), atol=1e-5)


def test_single_neighbour_is_a_scalar_rescale():
    rng = np.random.default_rng(1)
    key = rng.normal(size=(1, 20))
    q = 3.0 * key[0] + 0.01 * rng.normal(size=20)
    w, resid = lstsq_weights(key, q)
    assert w.shape == (1,)
    assert w[0] == pytest.approx(float(key[0] @ q / (key[0] @ key[0])))
    assert 0 < resid < 0.01


def test_residual_is_relative():
    keys = np.eye(2, 4)
    w, resid = lstsq_weights(keys, np.array([0.0, 0.0, 2.0, 0.0]))
    np.testing.assert_allclose(w, [0.0, 0.0])
    assert resid == pytest.approx(1.0)
