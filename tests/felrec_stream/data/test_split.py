import numpy as np
import pyarrow as pa
import pytest

from felrec_stream.data.split import PARTITIONS, Split, chronological_split, label_partitions, split_sizes
from felrec_stream.errors import DatasetError
from felrec_stream.stream.events import make_events


def _events(rows):
    """rows: (user, item, timestamp) in file order."""
    users, items, ts = zip(*rows)
    return make_events(list(users), list(items), list(ts))


def _pairs(table):
    return list(zip(table.column("user").to_pylist(), table.column("item").to_pylist()))


def test_partitions_constant():
    assert PARTITIONS == ("observed", "new_user", "new_item")


@pytest.mark.parametrize(
    "n, val, test, expected",
    [
        (10, 0.1, 0.1, (8, 1, 1)),
        (100, 0.1, 0.1, (80, 10, 10)),
        (7, 0.1, 0.2, (5, 1, 1)),  # 4.9 -> 5, 0.7 -> 1, rest 1
        (20, 0.125, 0.125, (15, 3, 2)),  # 15 exactly, 2.5 rounds up -> 3, test gets the rest
        (100_000, 0.1, 0.1, (80_000, 10_000, 10_000)),
    ],
)
def test_split_sizes(n, val, test, expected):
    assert split_sizes(n, val, test) == expected


@pytest.mark.parametrize("n, val, test", [(3, 0.1, 0.1), (0, 0.1, 0.1), (9, 0.1, 0.02)])
def test_split_sizes_rejects_empty_parts(n, val, test):
    with pytest.raises(DatasetError, match="at least one event"):
        split_sizes(n, val, test)


@pytest.mark.parametrize("val, test", [(0.0, 0.1), (0.1, 0.0), (0.5, 0.5), (-0.1, 0.2), (1.2, 0.1)])
def test_split_sizes_rejects_bad_fractions(val, test):
    with pytest.raises(DatasetError, match="fractions"):
        split_sizes(100, val, test)


def test_chronological_split_is_by_position_in_time_order():
    table = _events([(f"u{k}", f"i{k}", 100 - k) for k in range(10)])  # file order is reverse time
    split = chronological_split(table)
    assert isinstance(split, Split)
    assert split.sizes == (8, 1, 1)
    assert split.train.column("timestamp").to_pylist() == [91, 92, 93, 94, 95, 96, 97, 98]
    assert split.val.column("timestamp").to_pylist() == [99]
    assert split.test.column("timestamp").to_pylist() == [100]
    assert split.train.schema == table.schema


def test_ties_across_a_boundary_are_split_by_position():
    # All ten events share one timestamp: the order is event_id (file order), cut by position.
    table = _events([(f"u{k}", f"i{k}", 5) for k in range(10)])
    split = chronological_split(table)
    assert split.train.column("event_id").to_pylist() == list(range(8))
    assert split.val.column("event_id").to_pylist() == [8]
    assert split.test.column("event_id").to_pylist() == [9]


def test_unsorted_table_is_sorted_before_splitting():
    table = _events([(f"u{k}", "i", k) for k in range(10)])
    shuffled = table.take(pa.array([3, 9, 0, 5, 1, 8, 2, 7, 4, 6]))
    split = chronological_split(shuffled)
    assert split.test.column("timestamp").to_pylist() == [9]
    assert split.val.column("timestamp").to_pylist() == [8]


def test_split_rejects_a_table_too_small():
    with pytest.raises(DatasetError, match="at least one event"):
        chronological_split(_events([("a", "x", 1), ("b", "y", 2), ("c", "z", 3)]))


def test_split_rejects_a_non_event_table():
    with pytest.raises(DatasetError):
        chronological_split(pa.table({"user": ["a"], "item": ["b"]}))


def test_label_partitions_exact_labels():
    train = _events([("alice", "apple", 1), ("bob", "pear", 2)])
    events = _events([
        ("alice", "pear", 3),  # both known -> observed
        ("carol", "apple", 4),  # new user, known item -> new_user
        ("alice", "kiwi", 5),  # known user, new item -> new_item
        ("dave", "plum", 6),  # both new -> new_item (new item wins)
        ("bob", "apple", 7),  # observed
    ])
    labels = label_partitions(train, events)
    assert isinstance(labels, np.ndarray)
    assert labels.tolist() == ["observed", "new_user", "new_item", "new_item", "observed"]
    assert set(labels) <= set(PARTITIONS)


def test_entities_first_seen_in_validation_stay_new_in_test():
    table = _events([("u1", "i1", t) for t in range(8)] + [("u2", "i2", 8), ("u2", "i1", 9)])
    split = chronological_split(table)
    assert _pairs(split.val) == [("u2", "i2")]
    assert label_partitions(split.train, split.val).tolist() == ["new_item"]
    assert label_partitions(split.train, split.test).tolist() == ["new_user"]  # u2 was only in val


def test_label_partitions_of_an_empty_table():
    train = _events([("a", "x", 1)])
    assert label_partitions(train, train.slice(0, 0)).tolist() == []
