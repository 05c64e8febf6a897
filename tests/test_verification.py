"""The error measure every numeric check uses: NaN and shape mismatches are never "equal"."""

from __future__ import annotations

import math

import numpy as np

from graphopt.verification import max_abs_err


def test_differences_are_measured():
    assert max_abs_err([np.array([1.0, 2.0])], [np.array([1.0, 2.5])]) == 0.5
    assert max_abs_err([np.zeros(0)], [np.zeros(0)]) == 0.0


def test_nan_on_one_side_is_an_infinite_error():
    assert math.isinf(max_abs_err([np.array([1.0, np.nan])], [np.array([1.0, 2.0])]))
    assert math.isinf(max_abs_err([np.array([1.0, 2.0])], [np.array([np.nan, 2.0])]))


def test_nan_or_inf_on_both_sides_at_one_place_is_equal():
    a = np.array([np.nan, np.inf, -np.inf, 3.0])
    assert max_abs_err([a], [a.copy()]) == 0.0
    assert math.isinf(max_abs_err([np.array([np.inf])], [np.array([-np.inf])]))


def test_shape_mismatch_is_an_infinite_error():
    assert math.isinf(max_abs_err([np.zeros(3)], [np.zeros(4)]))
