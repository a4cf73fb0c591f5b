"""The shared validators of secondorder._checks: what they accept, and the messages they raise."""

import math

import pytest

from secondorder._checks import (
    check_choice,
    check_chunk_size,
    check_int,
    check_positive,
    finite_floats,
)


@pytest.mark.parametrize("value", [1, 2.5, 1e-12])
def test_check_positive_accepts(value):
    check_positive("lr", value)


@pytest.mark.parametrize("value", [0, -1, math.inf, math.nan, True, "1", None])
def test_check_positive_rejects(value):
    with pytest.raises(ValueError, match=r"Invalid lr value: .* \(expected a finite number > 0\)"):
        check_positive("lr", value)


def test_check_positive_zero_and_integer():
    check_positive("damping", 0.0, allow_zero=True)
    check_positive("cg_maxiter", 3, integer=True)
    with pytest.raises(ValueError, match="expected a finite int > 0"):
        check_positive("cg_maxiter", 3.0, integer=True)


def test_check_choice():
    check_choice("engine", "auto", ("auto", "kron"))
    with pytest.raises(ValueError, match=r"engine must be one of \('auto', 'kron'\), got 'x'"):
        check_choice("engine", "x", ("auto", "kron"))
    with pytest.raises(ValueError, match="got True"):
        check_choice("k", True, (1, 2))  # True == 1, but a bool is no int choice
    with pytest.raises(ValueError, match="got"):
        check_choice("engine", ["auto"], ("auto",))  # unhashable


@pytest.mark.parametrize("value", [0, -1, 1.0, True, None])
def test_check_int_rejects(value):
    with pytest.raises(ValueError, match="k must be a positive int, got"):
        check_int("k", value)


def test_check_int_minimum_and_note():
    check_int("mc_samples", 0, 0)
    with pytest.raises(ValueError, match=r"mc_samples must be an int >= 0 \(0: exact\), got -1"):
        check_int("mc_samples", -1, 0, "0: exact")


def test_check_chunk_size():
    check_chunk_size(None)
    check_chunk_size(4)
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match="chunk_size must be None or an int >= 1"):
            check_chunk_size(bad)


def test_finite_floats():
    assert finite_floats("shift", 2, 3) == [2.0, 2.0, 2.0]
    assert finite_floats("shift", (1, 2), 2) == [1.0, 2.0]
    with pytest.raises(ValueError, match=r"shift: expected one value per index \(3\), got 2"):
        finite_floats("shift", [1, 2], 3)
    with pytest.raises(ValueError, match="shift: expected finite floats"):
        finite_floats("shift", [1, math.inf], 2)
    with pytest.raises(ValueError, match="shift: expected floats"):
        finite_floats("shift", "a", 1)
