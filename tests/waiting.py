"""Waiting for a condition in tests: poll it with a bounded timeout, never sleep-then-assert."""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def wait_for(condition: Callable[[], T], timeout_s: float, what: str, interval_s: float = 0.02) -> T:
    """The first truthy value of `condition()`; AssertionError naming `what` after `timeout_s`.

    Exceptions from `condition` count as "not yet" (e.g. a server that is not listening yet);
    the last one is chained to the timeout error.
    """
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while True:
        try:
            value = condition()
            if value:
                return value
        except Exception as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting until {what}") from last_error
        time.sleep(interval_s)
