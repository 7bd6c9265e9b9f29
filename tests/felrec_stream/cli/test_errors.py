"""Bad input to a command is one `error: ...` line on stderr and exit status 2, never a traceback,
and nothing is created or applied on the way."""

from __future__ import annotations

import socket
import sys
import uuid

import pytest

from connectors.kafka.admin import TopicAdmin
from felrec_stream.cli.group import main
from felrec_stream.config import KafkaConfig
from tests.pipelines import write_tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


def _fails(monkeypatch, capsys, *args: str) -> str:
    """Run the console entry point in-process; returns the one stderr line of a clean failure."""
    monkeypatch.setattr(sys, "argv", ["felrec-stream", "--log-level", "ERROR", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()  # any other exception escaping here is the traceback a user would see
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert exit_info.value.code == 2 and len(err) == 1, err
    return err[0]


def _consume(kafka_bootstrap: str, checkpoint, tmp_path, *extra: str) -> list[str]:
    return ["consume", "--topic", f"t-{uuid.uuid4().hex[:8]}", "--checkpoint", str(checkpoint),
            "--bootstrap-servers", kafka_bootstrap, "--snapshot-dir", str(tmp_path / "snap"), "--until-end", *extra]


@pytest.mark.kafka
@pytest.mark.parametrize("device", ["bogus", "meta", "cuda:x"])
def test_consume_with_an_unknown_device(kafka_bootstrap, checkpoint, tmp_path, monkeypatch, capsys, device):
    line = _fails(monkeypatch, capsys, *_consume(kafka_bootstrap, checkpoint, tmp_path, "--device", device))
    assert line.startswith(f"error: unknown device '{device}'")


@pytest.mark.kafka
def test_consume_with_a_busy_metrics_port(kafka_bootstrap, checkpoint, tmp_path, monkeypatch, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = _fails(monkeypatch, capsys, *_consume(kafka_bootstrap, checkpoint, tmp_path, "--device", "cpu",
                                                     "--metrics-port", str(port)))
    assert line == f"error: cannot serve metrics on 127.0.0.1:{port}: Address already in use"


@pytest.mark.kafka
def test_consume_with_a_snapshot_dir_below_a_file(kafka_bootstrap, checkpoint, tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("x")
    args = _consume(kafka_bootstrap, checkpoint, tmp_path, "--device", "cpu")
    args[args.index("--snapshot-dir") + 1] = str(tmp_path / "file" / "snap")
    line = _fails(monkeypatch, capsys, *args)
    assert line == f"error: snapshot directory {tmp_path / 'file' / 'snap'} is not writable: Not a directory"


@pytest.mark.kafka
def test_replay_to_an_illegal_topic_name_creates_nothing(kafka_bootstrap, monkeypatch, capsys):
    line = _fails(monkeypatch, capsys, "replay", "--dataset", "synthetic", "--option", "n_events=600", "--topic",
                  "bad topic/..", "--bootstrap-servers", kafka_bootstrap, "--no-progress")
    assert line.startswith("error: kafka.topic: topic name 'bad topic/..' has character(s) ' /'")
    with TopicAdmin(KafkaConfig(bootstrap_servers=kafka_bootstrap)) as admin:
        assert not [t for t in admin.list_topics() if t.startswith("bad topic")]


@pytest.mark.kafka
def test_replay_of_an_invalid_file_names_its_line_and_leaves_no_topic(kafka_bootstrap, topic_name, tmp_path,
                                                                      monkeypatch, capsys):
    path = tmp_path / "log.csv"
    path.write_text("user,item,timestamp\nu,i,1\nu,j,-2\n" + "".join(f"u{n},i{n},{n}\n" for n in range(30)))
    line = _fails(monkeypatch, capsys, "replay", "--dataset", "csv", "--path", str(path), "--topic", topic_name,
                  "--bootstrap-servers", kafka_bootstrap, "--no-progress")
    assert line == f"error: {path}: invalid event(s): line 3: 'u,j,-2': field 'ts' is negative (-2)"
    with TopicAdmin(KafkaConfig(bootstrap_servers=kafka_bootstrap)) as admin:
        assert not admin.topic_exists(topic_name)


def test_train_rejects_the_same_file_with_the_same_line(tmp_path, monkeypatch, capsys):
    path = tmp_path / "log.csv"
    path.write_text("user,item,timestamp\nu,i,1\nu\x01v,j,2\n" + "".join(f"u{n},i{n},{n}\n" for n in range(30)))
    line = _fails(monkeypatch, capsys, "train", "--dataset", "csv", "--path", str(path), "--preset", "small",
                  "--epochs", "1", "--device", "cpu", "--out", str(tmp_path / "m"))
    assert line == (f"error: {path}: invalid event(s): line 3: 'u\\x01v,j,2': "
                    "field 'user' has control character '\\x01' at 1")


_BAD_TIMESTAMPS = [(8_000_000_000, "after the year 2200 in unit 's'"),
                   (1_700_000_000_000, "after the year 2200 in unit 's'"),  # milliseconds in a file of seconds
                   (2_524_608_000, "ahead of the consumer's clock")]  # 2050: consume would dead-letter it


def _file_with(tmp_path, ts: int):
    path = tmp_path / "log.csv"
    path.write_text(f"user,item,timestamp\nu,i,1\nu,j,{ts}\n" + "".join(f"u{n},i{n},{n + 2}\n" for n in range(30)))
    return path


@pytest.mark.parametrize("ts, why", _BAD_TIMESTAMPS)
def test_train_and_evaluate_reject_the_timestamps_a_consumer_rejects(tmp_path, monkeypatch, capsys, checkpoint,
                                                                     ts, why):
    """One timestamp rule for files and the wire: the topic's unit (s unless told), the year 2200,
    and no more than kafka.future_skew_s ahead of the clock; the error names the file and line."""
    path = _file_with(tmp_path, ts)
    line = _fails(monkeypatch, capsys, "train", "--dataset", "csv", "--path", str(path), "--preset", "small",
                  "--epochs", "1", "--device", "cpu", "--out", str(tmp_path / "m"))
    assert line.startswith(f"error: {path}: invalid event(s): line 3: 'u,j,{ts}': field 'ts'") and why in line
    line = _fails(monkeypatch, capsys, "evaluate", "--checkpoint", str(checkpoint), "--dataset", "csv", "--path",
                  str(path), "--baseline", "none")
    assert line.startswith(f"error: {path}: invalid event(s): line 3: 'u,j,{ts}': field 'ts'") and why in line


@pytest.mark.kafka
@pytest.mark.parametrize("ts, why", _BAD_TIMESTAMPS)
def test_replay_rejects_the_same_timestamps_with_file_and_line(kafka_bootstrap, topic_name, tmp_path, monkeypatch,
                                                                capsys, ts, why):
    path = _file_with(tmp_path, ts)
    line = _fails(monkeypatch, capsys, "replay", "--dataset", "csv", "--path", str(path), "--topic", topic_name,
                  "--bootstrap-servers", kafka_bootstrap, "--no-progress")
    assert line.startswith(f"error: {path}: invalid event(s): line 3: 'u,j,{ts}': field 'ts'") and why in line
    with TopicAdmin(KafkaConfig(bootstrap_servers=kafka_bootstrap)) as admin:
        assert not admin.topic_exists(topic_name)


def test_a_file_of_milliseconds_is_accepted_when_it_says_so(tmp_path, monkeypatch):
    path = _file_with(tmp_path, 1_700_000_000_000)
    from connectors.datasets import load_dataset

    assert len(load_dataset("csv", path, timestamp_unit="ms")) == 32
