"""The comparison helpers of sparx_ref.testing that the kernel tests rely on."""
import numpy as np
import pytest

from sparx_ref.testing import assert_close_scaled, rel_err, rel_err_scaled


def test_rel_err_scaled_measures_against_the_terms_not_the_cancelled_sum():
    # a sum of two terms of size 1 that cancel to 1e-6: an error of 1e-8 is 1% of the sum
    # (rel_err) but 1e-8 of the terms (rel_err_scaled)
    ref = np.array([1e-6, -2e-6])
    got = ref + 1e-8
    terms = np.array([2.0, 2.0])
    assert rel_err(got, ref) == pytest.approx(0.005)
    assert rel_err_scaled(got, ref, terms) == pytest.approx(5e-9)
    assert_close_scaled(got, ref, terms, np.float32, "kernel")
    with pytest.raises(AssertionError, match="relative to its terms"):
        assert_close_scaled(ref + 1e-3, ref, terms, np.float32, "kernel")


def test_rel_err_scaled_rejects_nan_and_mismatched_shapes():
    ref = np.ones(3)
    assert rel_err_scaled(np.array([1.0, np.nan, 1.0]), ref, ref) == float("inf")
    with pytest.raises(ValueError, match="shape mismatch"):
        rel_err_scaled(ref, ref, np.ones(4))
