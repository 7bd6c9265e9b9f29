"""Pure k-way merge of per-partition FIFO event queues by (timestamp, event_id): no IO, no clock.

The caller pushes each partition's decoded events in offset order with their arrival time, marks
partitions that will deliver nothing more (`finish`), and pops events in merge order: exactly
while every unfinished partition has a queued head, early only when the caller's `force()` says so
(then an event that sorts before one already released is counted as `late`, never dropped). The
Kafka source (connectors/kafka/source.py) decides when to force; the rules live here so they are
testable without a broker.
"""

from __future__ import annotations

import heapq
from collections import deque
from typing import Callable, Iterable, Sequence

from felrec_stream.stream.messages import Event


class PartitionMerger:
    """Pure k-way merge of per-partition FIFO queues by (ts, event_id); the caller decides when to force."""

    def __init__(self, partitions: Iterable[int]) -> None:
        self._queues: dict[int, deque[tuple[float, Event]]] = {p: deque() for p in partitions}
        self._finished: set[int] = set()
        self._heap: list[tuple[int, int, int]] = []  # (ts, event_id, partition) of each queue head
        self._starving = len(self._queues)  # unfinished partitions with an empty queue
        self._last: tuple[int, int] | None = None
        self.buffered = 0
        self.late = 0
        self.released_early = 0

    def push(self, partition: int, events: Sequence[Event], now: float) -> None:
        """Append a partition's events (offset order) that arrived at clock time `now`."""
        if not events:
            return
        queue = self._queues[partition]
        if not queue:
            head = events[0]
            heapq.heappush(self._heap, (head.ts, head.event_id, partition))  # type: ignore[misc]
            if partition not in self._finished:
                self._starving -= 1
        queue.extend((now, e) for e in events)
        self.buffered += len(events)

    def finish(self, partition: int) -> None:
        """The partition will deliver nothing more (end of a historical topic): stop waiting for it."""
        if partition not in self._finished:
            self._finished.add(partition)
            if not self._queues[partition]:
                self._starving -= 1

    def is_finished(self, partition: int) -> bool:
        return partition in self._finished

    @property
    def blocked(self) -> bool:
        """True while some partition that may still deliver data has nothing queued."""
        return self._starving > 0

    def starving(self) -> list[int]:
        return [p for p, q in self._queues.items() if not q and p not in self._finished]

    def queue_len(self, partition: int) -> int:
        return len(self._queues[partition])

    def first_offset(self, partition: int) -> int | None:
        queue = self._queues[partition]
        return queue[0][1].offset if queue else None

    def oldest_arrival(self) -> float | None:
        arrivals = [q[0][0] for q in self._queues.values() if q]
        return min(arrivals) if arrivals else None

    def pop(self, force: Callable[[], bool] = lambda: False) -> list[Event]:
        """Release events in merge order while safe (or while `force()` says so)."""
        out: list[Event] = []
        while self._heap:
            early = self._starving > 0
            if early and not force():
                break
            ts, event_id, partition = heapq.heappop(self._heap)
            queue = self._queues[partition]
            out.append(queue.popleft()[1])
            self.buffered -= 1
            if queue:
                head = queue[0][1]
                heapq.heappush(self._heap, (head.ts, head.event_id, partition))  # type: ignore[misc]
            elif partition not in self._finished:
                self._starving += 1
            self.released_early += early
            if self._last is not None and (ts, event_id) < self._last:
                self.late += 1
            else:
                self._last = (ts, event_id)
        return out
