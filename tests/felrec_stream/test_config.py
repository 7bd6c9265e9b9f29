"""Typed configs: file < environment < options, clear errors, round trip."""

import pytest

from felrec_stream.config import (PRESET_DESCRIPTIONS, PRESETS, Configs, EncoderConfig, TrainingConfig, from_dict,
                                  load_section, preset_sections, read_config_file, to_dict)
from felrec_stream.errors import ConfigError


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


def test_every_preset_states_its_epochs_and_expected_time():
    assert list(PRESET_DESCRIPTIONS) == list(PRESETS)
    for name, text in PRESET_DESCRIPTIONS.items():
        epochs = Configs.load(preset_sections(name), environ={}).training.epochs
        assert f"{epochs} epochs" in text and "min an epoch" in text, name


def test_train_help_shows_the_preset_descriptions():
    from click.testing import CliRunner

    from felrec_stream.cli import cli

    help_text = " ".join(CliRunner().invoke(cli, ["train", "--help"]).output.split())
    for name, text in PRESET_DESCRIPTIONS.items():
        assert f"{name}: {' '.join(text.split())}" in help_text
