"""The partition merger: exact event-time merge, forced early release, late events, ties."""

from __future__ import annotations

from felrec_stream.stream.merger import PartitionMerger
from felrec_stream.stream.messages import Event


def _ev(p: int, offset: int, ts: int, event_id: int | None = None) -> Event:
    return Event("u", "i", ts, offset if event_id is None else event_id, p, offset)


def test_merge_waits_for_every_partition_then_is_exact():
    merger = PartitionMerger([0, 1])
    merger.push(0, [_ev(0, 0, 1, 10), _ev(0, 1, 5, 11)], now=0)
    assert merger.blocked and merger.pop() == []
    merger.push(1, [_ev(1, 0, 3, 20)], now=0)
    assert [e.ts for e in merger.pop()] == [1, 3]  # 5 waits: partition 1 may still bring ts < 5
    merger.finish(1)
    assert [e.ts for e in merger.pop()] == [5]
    assert merger.late == 0 and merger.buffered == 0


def test_forced_release_counts_later_arrivals_as_late():
    merger = PartitionMerger([0, 1])
    merger.push(0, [_ev(0, 0, 10), _ev(0, 1, 20)], now=0)
    assert [e.ts for e in merger.pop(force=lambda: True)] == [10, 20]
    assert merger.released_early == 2
    merger.push(1, [_ev(1, 0, 15)], now=1)
    merger.finish(0)
    assert [e.ts for e in merger.pop()] == [15]
    assert merger.late == 1


def test_disorder_inside_a_partition_keeps_offset_order_and_counts_late():
    merger = PartitionMerger([0])
    merger.push(0, [_ev(0, 0, 50), _ev(0, 1, 60), _ev(0, 2, 5), _ev(0, 3, 70)], now=0)
    assert [e.offset for e in merger.pop()] == [0, 1, 2, 3]
    assert merger.late == 1


def test_merge_breaks_timestamp_ties_by_event_id():
    merger = PartitionMerger([0, 1])
    merger.push(0, [_ev(0, 0, 7, 3)], now=0)
    merger.push(1, [_ev(1, 0, 7, 2)], now=0)
    merger.finish(0)
    merger.finish(1)
    assert [e.event_id for e in merger.pop()] == [2, 3]
