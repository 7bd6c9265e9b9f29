"""The tests' wait helper: returns the first truthy value, or fails naming what it waited for."""

from __future__ import annotations

import itertools

import pytest

from tests.waiting import wait_for


def test_returns_the_first_truthy_value_and_treats_errors_as_not_yet():
    calls = itertools.count()

    def condition():
        n = next(calls)
        if n == 0:
            raise ConnectionError("not listening yet")
        return n if n >= 3 else 0

    assert wait_for(condition, 5, "three calls", interval_s=0) == 3


def test_times_out_naming_the_condition_and_chaining_the_last_error():
    def condition():
        raise ConnectionError("refused")

    with pytest.raises(AssertionError, match="waiting until the server answers") as caught:
        wait_for(condition, 0.05, "the server answers", interval_s=0.01)
    assert isinstance(caught.value.__cause__, ConnectionError)
