"""Micro-batching as a pure state machine: no IO, no threads, time comes from an injected clock.

A batch is ready when `max_size` items are pending (the first `max_size` are cut, the rest wait)
or when the oldest pending item has waited `max_wait_s` (everything pending is cut). Keeping IO out
makes the timing rules testable with a fake clock and lets any source (Kafka, files, synthetic
generators) reuse them. Items are opaque: the Kafka source batches decoded events and turns each
cut into an `EventBatch`.

Lifecycle: `add(items)` any number of times; `poll(now)` after each add or timer tick returns a
ready batch or None; `flush()` at the end of a stream returns what is pending (repeat until None).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Callable, Generic, Iterable, TypeVar

T = TypeVar("T")


class MicroBatcher(Generic[T]):
    """Cut a stream of items into batches of at most `max_size`, each waiting at most `max_wait_s`."""

    def __init__(self, max_size: int, max_wait_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self.max_size = max_size
        self.max_wait_s = max_wait_s
        self._clock = clock
        self._items: deque[T] = deque()
        # Arrival time of the oldest pending item; after a size cut, the leftovers keep the
        # arrival time of the add() they came from, so they are never held longer than max_wait_s.
        self._arrivals: deque[tuple[float, int]] = deque()  # (time, count) per add() call

    def __len__(self) -> int:
        return len(self._items)

    @property
    def pending(self) -> tuple[T, ...]:
        """Items added but not yet returned, oldest first (a copy: callers may not mutate state)."""
        return tuple(self._items)

    def add(self, items: Iterable[T]) -> None:
        """Append items; they become part of the next batch(es) in the order given."""
        before = len(self._items)
        self._items.extend(items)
        added = len(self._items) - before
        if added:
            self._arrivals.append((self._clock(), added))

    def deadline(self) -> float | None:
        """Clock time at which the pending items become a batch by age (None when nothing is pending)."""
        return self._arrivals[0][0] + self.max_wait_s if self._arrivals else None

    def poll(self, now: float | None = None) -> list[T] | None:
        """A ready batch (by size first, then by age), or None when nothing is due yet."""
        if len(self._items) >= self.max_size:
            return self._cut(self.max_size)
        deadline = self.deadline()
        if deadline is not None and (self._clock() if now is None else now) >= deadline:
            return self._cut(len(self._items))
        return None

    def flush(self) -> list[T] | None:
        """The oldest pending items (at most max_size) regardless of age; call until it returns None."""
        return self._cut(min(len(self._items), self.max_size)) if self._items else None

    def _cut(self, n: int) -> list[T]:
        batch = [self._items.popleft() for _ in range(n)]
        remaining = n
        while remaining and self._arrivals:
            arrived, count = self._arrivals[0]
            if count <= remaining:
                self._arrivals.popleft()
                remaining -= count
            else:
                self._arrivals[0] = (arrived, count - remaining)
                remaining = 0
        return batch
