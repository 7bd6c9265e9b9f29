"""Typed configs (file < env < options) and the canonical event table."""

import numpy as np
import pytest

from felrec_stream.config import EncoderConfig, TrainingConfig, from_dict, load_section, read_config_file, to_dict
from felrec_stream.errors import ConfigError, DatasetError
from felrec_stream.stream.events import EVENT_SCHEMA, EventBatch, is_time_ordered, iter_batches, make_events


def test_config_precedence_file_env_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  epochs: 7\n  lr: 0.5\n")
    sections = read_config_file(path)
    cfg = load_section(TrainingConfig, "training", sections, overrides={"lr": 0.2, "batch_size": None},
                       environ={"FELREC_TRAINING__EPOCHS": "9"})
    assert (cfg.epochs, cfg.lr, cfg.batch_size) == (9, 0.2, 1024)


@pytest.mark.parametrize("values,message", [
    ({"d_model": 10, "n_heads": 4}, "multiple of n_heads"),
    ({"dropout": 1.5}, "dropout"),
    ({"nope": 1}, "unknown"),
    ({"d_model": "abc"}, "type int"),
    ({"type_embedding": "maybe"}, "boolean"),
])
def test_config_errors_are_clear(values, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(EncoderConfig, values)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        read_config_file(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainig:\n  epochs: 1\n")
    with pytest.raises(ConfigError, match="unknown config section"):
        read_config_file(bad)


def test_config_round_trip():
    cfg = EncoderConfig(d_model=64, n_heads=2)
    assert from_dict(EncoderConfig, to_dict(cfg)) == cfg


def test_events_sorted_stably_by_time_then_original_order():
    t = make_events([3, 1, 2, 9], ["a", "b", "c", "d"], [5, 1, 1, 0])
    assert t.schema.equals(EVENT_SCHEMA)
    assert t.column("user").to_pylist() == ["9", "1", "2", "3"]
    assert t.column("event_id").to_pylist() == [3, 1, 2, 0]
    assert is_time_ordered(t)


@pytest.mark.parametrize("user,message", [([None, "a"], "missing"), (["", "a"], "empty"), ([1.5, 2.5], "integers or strings")])
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
