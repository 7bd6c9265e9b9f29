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
