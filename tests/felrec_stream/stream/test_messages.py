"""Wire format of events: every way a message can be wrong becomes a PoisonMessage with an exact reason."""

from __future__ import annotations

import json

import numpy as np
import pytest

from felrec_stream.errors import DatasetError
from felrec_stream.stream.events import make_events
from felrec_stream.stream.messages import (DERIVED_EVENT_ID_BASE, MAX_ID_CHARS, Event, PoisonMessage, decode_event,
                                           derive_event_id, encode_event, events_to_batch, invalid_events,
                                           max_timestamp)

GOOD = {"v": 1, "user": "u1", "item": "i1", "ts": 1_700_000_000, "event_id": 7}


def _raw(**changes: object) -> bytes:
    body = dict(GOOD)
    for name, value in changes.items():
        if value is _DROP:
            body.pop(name)
        else:
            body[name] = value
    return json.dumps(body).encode()


_DROP = object()

# (case id, raw value, expected kind, expected field[, message key]). Each is a distinct way to be wrong.
POISON_CASES = [
    ("key_not_user", _raw(), "key_mismatch", "key", b"someone-else"),
    ("tombstone", None, "tombstone", None),
    ("empty", b"", "empty", None),
    ("oversized", b'{"v":1,"user":"' + b"u" * 70000 + b'"}', "oversized", None),
    ("bom", b"\xef\xbb\xbf" + _raw(), "bom", None),
    ("not_utf8", b'{"v":1,"user":"\xff\xfe","item":"i","ts":1}', "not_utf8", None),
    ("not_json", b"user=u1,item=i1", "not_json", None),
    ("truncated_json", _raw()[:-3], "not_json", None),
    ("deep_nesting", b"[" * 30000 + b"]" * 30000, "not_json", None),
    ("json_array", b'[1, 2, 3]', "not_object", None),
    ("json_string", b'"hello"', "not_object", None),
    ("json_null", b"null", "not_object", None),
    ("nan", b'{"v":1,"user":"u","item":"i","ts":NaN}', "non_finite", None),
    ("infinity", b'{"v":1,"user":"u","item":"i","ts":Infinity}', "non_finite", None),
    ("duplicate_key", b'{"v":1,"user":"u","user":"w","item":"i","ts":1}', "duplicate_key", "user"),
    ("missing_v", _raw(v=_DROP), "missing_field", "v"),
    ("unknown_version", _raw(v=2), "unknown_version", "v"),
    ("v_as_string", _raw(v="1"), "wrong_type", "v"),
    ("v_as_bool", _raw(v=True), "wrong_type", "v"),
    ("missing_user", _raw(user=_DROP), "missing_field", "user"),
    ("missing_item", _raw(item=_DROP), "missing_field", "item"),
    ("missing_ts", _raw(ts=_DROP), "missing_field", "ts"),
    ("user_int", _raw(user=42), "wrong_type", "user"),
    ("item_null", _raw(item=None), "wrong_type", "item"),
    ("item_list", _raw(item=["i1"]), "wrong_type", "item"),
    ("user_object", _raw(user={"id": 1}), "wrong_type", "user"),
    ("ts_bool", _raw(ts=True), "wrong_type", "ts"),
    ("ts_fraction", _raw(ts=1.5), "wrong_type", "ts"),
    ("ts_string", _raw(ts="1700000000"), "wrong_type", "ts"),
    ("ts_null", _raw(ts=None), "wrong_type", "ts"),
    ("empty_user", _raw(user=""), "empty_id", "user"),
    ("whitespace_item", _raw(item=" \t "), "empty_id", "item"),
    ("user_too_long", _raw(user="u" * (MAX_ID_CHARS + 1)), "id_too_long", "user"),
    ("control_char", _raw(item="i\x001"), "control_char", "item"),
    ("newline_in_id", _raw(user="u\n1"), "control_char", "user"),
    ("lone_surrogate", b'{"v":1,"user":"u\\ud800","item":"i","ts":1}', "invalid_unicode", "user"),
    ("negative_ts", _raw(ts=-1), "negative_ts", "ts"),
    ("absurd_ts_ms_as_s", _raw(ts=1_700_000_000_000), "out_of_range", "ts"),
    ("negative_event_id", _raw(event_id=-3), "negative_event_id", "event_id"),
    ("event_id_float", _raw(event_id=2.5), "wrong_type", "event_id"),
    ("event_id_string", _raw(event_id="7"), "wrong_type", "event_id"),
    ("event_id_null", _raw(event_id=None), "wrong_type", "event_id"),
    ("event_id_in_derived_range", _raw(event_id=DERIVED_EVENT_ID_BASE), "out_of_range", "event_id"),
]


def test_at_least_twenty_distinct_poison_kinds_are_covered():
    assert len({case[2] for case in POISON_CASES}) >= 20
    assert len(POISON_CASES) >= 40


@pytest.mark.parametrize("raw,kind,field,key", [(c[1], c[2], c[3], c[4] if len(c) > 4 else None)
                                                 for c in POISON_CASES], ids=[c[0] for c in POISON_CASES])
def test_poison_message_says_exactly_what_is_wrong(raw, kind, field, key):
    result = decode_event(raw, 65536, key=key, topic="t", partition=3, offset=99)
    assert isinstance(result, PoisonMessage), result
    assert (result.kind, result.field) == (kind, field), result.reason
    assert result.reason and (field is None or repr(field) in result.reason)
    assert result.raw == raw and result.key == key
    assert (result.topic, result.partition, result.offset) == ("t", 3, 99)


def test_key_must_match_user():
    result = decode_event(_raw(), key=b"someone-else")
    assert isinstance(result, PoisonMessage) and result.kind == "key_mismatch" and result.key == b"someone-else"
    assert isinstance(decode_event(_raw(), key=b"u1"), Event)
    assert isinstance(decode_event(_raw(), key=None), Event)


def test_valid_message_decodes_with_position():
    event = decode_event(_raw(), partition=2, offset=5)
    assert event == Event("u1", "i1", 1_700_000_000, 7, 2, 5)


def test_missing_event_id_is_derived_from_position_deterministically():
    raw = _raw(event_id=_DROP)
    first = decode_event(raw, partition=2, offset=5)
    again = decode_event(raw, partition=2, offset=5)
    other = decode_event(raw, partition=2, offset=6)
    assert first.event_id == again.event_id == derive_event_id(2, 5)
    assert first.event_id >= DERIVED_EVENT_ID_BASE and other.event_id == first.event_id + 1
    assert derive_event_id(3, 0) > derive_event_id(2, 10**9)
    assert decode_event(raw).event_id is None  # no position known: nothing to derive from


def test_extra_fields_are_allowed_and_ignored():
    event = decode_event(_raw(source="web", weight=0.5))
    assert isinstance(event, Event) and event.user == "u1"


def test_integral_float_timestamp_is_accepted():
    assert decode_event(_raw(ts=1.7e9)).ts == 1_700_000_000


def test_unicode_ids_and_timestamp_units():
    assert decode_event(_raw(user="ユーザー", item="é")).user == "ユーザー"
    ms = _raw(ts=1_700_000_000_000)
    assert isinstance(decode_event(ms, ts_unit="ms"), Event)
    assert decode_event(ms, ts_unit="s").kind == "out_of_range"
    assert max_timestamp("ms") == 1000 * max_timestamp("s")


def test_size_limit_is_the_configured_one():
    raw = _raw(user="u" * 200)
    assert decode_event(raw, max_bytes=len(raw)).user == "u" * 200
    assert decode_event(raw, max_bytes=len(raw) - 1).kind == "oversized"


def test_encode_round_trip():
    key, value = encode_event("u1", "i1", 5, 3)
    assert key == b"u1"
    assert json.loads(value) == {"v": 1, "user": "u1", "item": "i1", "ts": 5, "event_id": 3}
    assert decode_event(value, key=key) == Event("u1", "i1", 5, 3)
    assert "event_id" not in json.loads(encode_event("u1", "i1", 5)[1])


@pytest.mark.parametrize("args", [("", "i", 1), ("u", "i", -1), ("u", "i\x00", 1), ("u", "i", 10**12),
                                  ("u", "i", 1, -5), ("u", 3, 1)])
def test_encode_refuses_what_a_consumer_would_reject(args):
    with pytest.raises(DatasetError, match="cannot be encoded"):
        encode_event(*args)


def test_encode_checks_size():
    with pytest.raises(DatasetError, match="max_message_bytes"):
        encode_event("u" * 200, "i", 1, max_bytes=100)


def test_events_to_batch():
    batch = events_to_batch([Event("a", "x", 1, 10), Event("b", "y", 2, 11)])
    assert list(batch.user) == ["a", "b"] and list(batch.item) == ["x", "y"]
    assert batch.timestamp.dtype == np.int64 and list(batch.event_id) == [10, 11]
    assert len(events_to_batch([])) == 0


def test_a_table_is_checked_by_the_same_rules_as_the_wire():
    table = make_events(["ok", "bad\x07", "ok", "ok"], ["i", "j", " ", "k"], [1, 2, 3, -4], sort=False)
    wire = [decode_event(json.dumps({"v": 1, "user": u, "item": i, "ts": t}).encode())
            for u, i, t in (("bad\x07", "j", 2), ("ok", " ", 3), ("ok", "k", -4))]
    assert invalid_events(table) == [(1, wire[0].reason), (2, wire[1].reason), (3, wire[2].reason)]
    assert invalid_events(make_events(["a"], ["b"], [max_timestamp("s") + 1]), ts_unit="s")[0][1] == \
        decode_event(_raw(ts=max_timestamp("s") + 1)).reason
    assert invalid_events(make_events(["a"], ["b"], [max_timestamp("s") + 1]), ts_unit=None) == []  # files: any unit


def test_events_beyond_the_consumers_clock_limit_are_poison():
    poison = decode_event(_raw(ts=2_000), not_after=1_999)
    assert isinstance(poison, PoisonMessage) and (poison.kind, poison.field) == ("future_timestamp", "ts")
    assert isinstance(decode_event(_raw(ts=1_999), not_after=1_999), Event)
