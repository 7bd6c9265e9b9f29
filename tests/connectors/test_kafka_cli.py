"""`broker start|stop|status` and `replay`: thin commands over connectors.kafka."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from connectors.kafka.replay import read_replay_meta
from connectors.kafka.source import read_topic_table
from felrec_stream.cli import cli
from felrec_stream.config import KafkaConfig

pytestmark = pytest.mark.kafka


def _run(*args: str, env: dict | None = None):
    return CliRunner().invoke(cli, ["--log-level", "WARNING", *args], env=env, catch_exceptions=False)


@pytest.mark.usefixtures("broker_binary")
def test_broker_start_status_stop(tmp_path, monkeypatch):
    monkeypatch.setenv("FELREC_HOME", str(tmp_path))
    started = _run("broker", "start")
    servers = started.stdout.strip().splitlines()[-1]
    try:
        assert started.exit_code == 0 and servers.startswith("127.0.0.1:")
        status = _run("broker", "status")
        assert json.loads(status.stdout)["bootstrap_servers"] == servers
        again = _run("broker", "start")
        assert again.stdout.strip().splitlines()[-1] == servers  # reuses, never a second broker
    finally:
        assert _run("broker", "stop").stdout.strip() == "stopped"
    assert _run("broker", "status").exit_code == 1


def test_replay_creates_the_topic_publishes_splits_and_refuses_a_second_copy(kafka_bootstrap, topic_name):
    env = {"FELREC_BOOTSTRAP_SERVERS": kafka_bootstrap}
    args = ["replay", "--dataset", "synthetic", "--option", "n_events=600", "--topic", topic_name,
            "--partitions", "3", "--no-progress"]
    result = _run(*args, env=env)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["produced"] == summary["acknowledged"] == 600 and summary["partitions"] == 3
    config = KafkaConfig(bootstrap_servers=kafka_bootstrap)
    assert len(read_topic_table(config, topic_name)) == 600
    assert read_replay_meta(config, topic_name)["splits"]["test"]["index"] == 540

    from felrec_stream.errors import KafkaError

    with pytest.raises(KafkaError, match="already holds 600"):
        _run(*args, env=env)
    assert _run(*args, "--recreate", env=env).exit_code == 0
    assert len(read_topic_table(config, topic_name)) == 600


def test_replay_rejects_rate_with_speedup():
    result = CliRunner().invoke(cli, ["replay", "--dataset", "synthetic", "--rate", "10", "--speedup", "2"])
    assert result.exit_code == 2 and "not both" in result.output
