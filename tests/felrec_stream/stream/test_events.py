"""The canonical event table: stable time order, id validation, micro-batches."""

import numpy as np
import pytest

from felrec_stream.errors import DatasetError
from felrec_stream.stream.events import EVENT_SCHEMA, EventBatch, is_time_ordered, iter_batches, make_events


def test_events_sorted_stably_by_time_then_original_order():
    t = make_events([3, 1, 2, 9], ["a", "b", "c", "d"], [5, 1, 1, 0])
    assert t.schema.equals(EVENT_SCHEMA)
    assert t.column("user").to_pylist() == ["9", "1", "2", "3"]
    assert t.column("event_id").to_pylist() == [3, 1, 2, 0]
    assert is_time_ordered(t)


@pytest.mark.parametrize("user,message", [([None, "a"], "missing"), (["", "a"], "empty"),
                                          ([1.5, 2.5], "integers or strings")])
def test_bad_ids_are_rejected(user, message):
    with pytest.raises(DatasetError, match=message):
        make_events(user, ["x", "y"], [0, 1])


def test_duplicate_event_ids_rejected():
    with pytest.raises(DatasetError, match="unique"):
        make_events(["a", "b"], ["x", "y"], [0, 1], event_id=[4, 4])


def test_batches_cover_the_table_in_order():
    t = make_events(list(range(10)), list(range(10)), list(range(10)))
    batches = list(iter_batches(t, 4))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert np.concatenate([b.event_id for b in batches]).tolist() == list(range(10))
    assert EventBatch.from_table(t).to_table().equals(t)
