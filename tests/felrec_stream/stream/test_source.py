"""The Source seam: InMemorySource behaves as the protocol says; the Kafka classes satisfy it."""

import numpy as np
import pytest

from connectors.kafka.dlq import MemoryDeadLetters
from connectors.kafka.source import KafkaSource
from felrec_stream.config import KafkaConfig
from felrec_stream.errors import DatasetError
from felrec_stream.stream.events import iter_batches, make_events
from felrec_stream.stream.source import DeadLetterSink, InMemorySource, Source
from pipelines.worker_state import CountingDeadLetters

TABLE = make_events(list(range(10)), list(range(10)), list(range(10)))


def _drain(source: InMemorySource) -> list:
    batches = []
    while not source.exhausted:
        batches.append(source.poll_batch())
    return batches


def test_batches_are_cut_by_count_and_positions_count_consumed_events():
    source = InMemorySource(TABLE, batch_size=4).open()
    assert (source.positions(), source.lag()) == ({0: 0}, {0: 10})
    batches = _drain(source)
    assert [len(b) for b in batches] == [4, 4, 2]
    assert np.concatenate([b.event_id for b in batches]).tolist() == list(range(10))
    assert (source.positions(), source.lag(), source.poll_batch()) == ({0: 10}, {0: 0}, None)
    assert (source.stats.events, source.stats.batches) == (10, 3)


def test_open_at_a_position_resumes_on_the_same_batch_grid():
    resumed = _drain(InMemorySource(TABLE, batch_size=4).open({0: 4}))
    expected = list(iter_batches(TABLE, 4))[1:]
    assert [b.event_id.tolist() for b in resumed] == [b.event_id.tolist() for b in expected]


def test_misuse_is_a_clear_error():
    with pytest.raises(DatasetError, match="not open"):
        InMemorySource(TABLE).poll_batch()
    with pytest.raises(DatasetError, match="outside the 10 events"):
        InMemorySource(TABLE).open({0: 11})


def test_sources_and_sinks_satisfy_the_protocols():
    assert isinstance(InMemorySource(TABLE), Source)
    assert isinstance(KafkaSource(KafkaConfig(bootstrap_servers="127.0.0.1:9")), Source)  # no connection yet
    assert isinstance(MemoryDeadLetters(), DeadLetterSink)
    assert isinstance(CountingDeadLetters(MemoryDeadLetters), DeadLetterSink)
