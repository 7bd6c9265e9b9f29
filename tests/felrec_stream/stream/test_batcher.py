"""The micro-batcher's timing rules, driven by a fake clock."""

from __future__ import annotations

import pytest

from felrec_stream.stream.batcher import MicroBatcher


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_nothing_pending_nothing_ready(clock):
    batcher = MicroBatcher(3, 1.0, clock)
    assert batcher.poll() is None and batcher.flush() is None and batcher.deadline() is None


def test_full_batch_is_ready_immediately_and_rest_waits(clock):
    batcher = MicroBatcher(3, 1.0, clock)
    batcher.add(range(7))
    assert batcher.poll() == [0, 1, 2]
    assert batcher.poll() == [3, 4, 5]
    assert batcher.poll() is None and len(batcher) == 1


def test_partial_batch_is_ready_after_max_wait(clock):
    batcher = MicroBatcher(10, 1.0, clock)
    batcher.add([1, 2])
    clock.now += 0.5
    batcher.add([3])
    assert batcher.poll() is None
    assert batcher.deadline() == 101.0
    clock.now = 101.0
    assert batcher.poll() == [1, 2, 3]
    assert batcher.deadline() is None


def test_poll_accepts_an_explicit_now(clock):
    batcher = MicroBatcher(10, 1.0, clock)
    batcher.add([1])
    assert batcher.poll(now=100.5) is None
    assert batcher.poll(now=101.0) == [1]


def test_leftovers_keep_their_arrival_time(clock):
    batcher = MicroBatcher(2, 1.0, clock)
    batcher.add([1, 2, 3])
    clock.now += 0.9
    batcher.add([4])
    assert batcher.poll() == [1, 2]
    assert batcher.poll() == [3, 4]  # size cut: 2 pending again
    batcher.add([5])
    assert batcher.deadline() == pytest.approx(101.9)


def test_leftover_from_size_cut_is_released_by_its_own_age(clock):
    batcher = MicroBatcher(2, 1.0, clock)
    batcher.add([1, 2, 3])
    assert batcher.poll() == [1, 2]
    assert batcher.deadline() == 101.0  # item 3 arrived at 100.0
    clock.now = 101.0
    assert batcher.poll() == [3]


def test_zero_wait_releases_everything_at_once(clock):
    batcher = MicroBatcher(100, 0.0, clock)
    batcher.add("abc")
    assert batcher.poll() == ["a", "b", "c"]


def test_flush_returns_at_most_max_size_until_empty(clock):
    batcher = MicroBatcher(2, 10.0, clock)
    batcher.add(range(5))
    assert [batcher.flush(), batcher.flush(), batcher.flush(), batcher.flush()] == [[0, 1], [2, 3], [4], None]


def test_pending_is_a_read_only_view(clock):
    batcher = MicroBatcher(5, 1.0, clock)
    batcher.add([1, 2])
    assert batcher.pending == (1, 2)
    assert len(batcher) == 2


def test_adding_nothing_sets_no_deadline(clock):
    batcher = MicroBatcher(5, 1.0, clock)
    batcher.add([])
    assert batcher.deadline() is None and batcher.poll() is None


@pytest.mark.parametrize("size,wait", [(0, 1.0), (1, -0.1)])
def test_invalid_settings(size, wait):
    with pytest.raises(ValueError):
        MicroBatcher(size, wait)
