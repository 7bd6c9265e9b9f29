"""A broker outage in the middle of `consume`: the worker waits it out with its state in memory,
logs it as structured lines only, and applies what arrives after the broker is back.

The outage is real on the wire: a broker whose advertised address is a TCP proxy, so every client
connection runs through the proxy; cutting the proxy refuses and drops every connection while the
broker (memory storage) keeps its data, as a network partition or a broker restart with disks would.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

import pytest

from connectors.kafka.admin import TopicAdmin
from connectors.kafka.broker import EmbeddedBroker, free_port
from connectors.kafka.replay import replay_events
from felrec_stream.config import KafkaConfig
from felrec_stream.state.snapshot import SnapshotManager
from tests.pipelines import stop_with_sigterm, synthetic_events
from tests.waiting import wait_for

pytestmark = pytest.mark.kafka
ROOT = Path(__file__).resolve().parents[2]


class Proxy:
    """127.0.0.1:port -> 127.0.0.1:target; `cut()` closes the listener and every connection."""

    def __init__(self, target: int) -> None:
        self.port, self.target = free_port(), target
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._server: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(64)
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self._sockets.clear()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:  # the broker is not listening (yet): refuse this client, keep the proxy
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def proxied_broker() -> Iterator[tuple[Proxy, str]]:
    port = free_port()
    proxy = Proxy(port)
    broker = EmbeddedBroker(port=port, advertised_port=proxy.port, data_dir=tempfile.mkdtemp(prefix="felrec-outage-"))
    broker.start()
    try:
        yield proxy, f"127.0.0.1:{proxy.port}"
    finally:
        broker.stop()
        proxy.cut()


class Lines:
    """stderr of a process, collected by a thread; `wait_for(predicate)` with a bounded timeout."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc, self.lines = proc, []
        self._changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def records(self) -> list[dict]:
        out = []
        for line in list(self.lines):
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def wait_for(self, predicate: Callable[[list[dict]], bool], what: str, timeout_s: float = 90) -> None:
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not predicate(self.records()):
                if self.proc.poll() is not None:
                    raise AssertionError(f"worker exited ({self.proc.returncode}) before {what}: {self.lines[-3:]}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"no {what} within {timeout_s} s: {self.lines[-3:]}")
                self._changed.wait(1.0)


def _applied(n: int) -> Callable[[list[dict]], bool]:
    return lambda records: any(r.get("event") == "batch_applied" and r["applied"] == n for r in records)


def _applied_max(records: list[dict]) -> int:
    return max((r["applied"] for r in records if r.get("event") == "batch_applied"), default=0)


def _outage_noticed(times: int) -> Callable[[list[dict]], bool]:
    return lambda records: sum(r.get("event") == "broker_unreachable" for r in records) >= times


def test_a_broker_outage_is_waited_out_with_structured_logs(checkpoint, proxied_broker, tmp_path):
    proxy, servers = proxied_broker
    kafka = KafkaConfig(bootstrap_servers=servers, request_timeout_ms=2000, connect_retries=3)
    table = synthetic_events(400, seed=7)
    topic = f"t-outage-{uuid.uuid4().hex[:8]}"
    with TopicAdmin(kafka) as admin:
        admin.create_topic(topic, 1)
    replay_events(table.slice(0, 200), kafka, topic, progress=False)
    config = tmp_path / "kafka.yaml"
    config.write_text("kafka:\n  request_timeout_ms: 2000\n")  # stall checks every 2 s; outages: default 300 s
    command = [sys.executable, "-c", "from felrec_stream.cli import main; main()", "--log-json", "consume",
               "--topic", topic, "--checkpoint", str(checkpoint), "--bootstrap-servers", servers, "--config",
               str(config), "--batch-size", "32", "--max-wait-ms", "20", "--snapshot-dir", str(tmp_path / "snap"),
               "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FELREC_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    lines = Lines(proc)
    try:
        lines.wait_for(_applied(200), "first 200 events applied")
        proxy.cut()  # the broker is gone for every connection of the worker
        lines.wait_for(_outage_noticed(3), "three broker_unreachable checks (~4 s)")
        proxy.restore()
        replay_events(table.slice(200), kafka, topic, progress=False)
        lines.wait_for(_applied(400), "the events written after the outage applied")
        summary = stop_with_sigterm(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (summary["applied_total"], summary["stopped_by"]) == (400, "signal:SIGTERM")
    not_json = [line for line in lines.lines if line.strip() and not line.lstrip().startswith("{")]
    assert not_json == []  # kafka-python's own logging goes through structlog as well
    library = [r for r in lines.records() if r.get("event") == "library_log"]
    assert len(library) <= 25, [r["message"][:80] for r in library]  # repeats are dropped and counted
    assert any(r.get("event") == "broker_reachable_again" for r in lines.records())


def test_a_topic_recreated_during_an_outage_stops_the_worker_with_nothing_applied_from_it(checkpoint, tmp_path):
    """The broker restarts empty (memory storage) behind the proxy and the topic is recreated and refilled
    under the same name while the worker waits out the outage: on reconnecting the worker checks the
    topic's identity, as a restart does, and stops with an error instead of reading the new topic
    from its old offsets; its last snapshot holds only the old topic's events."""
    port = free_port()
    proxy = Proxy(port)
    brokers = [EmbeddedBroker(port=port, advertised_port=proxy.port, data_dir=tempfile.mkdtemp(prefix="felrec-rt-"))]
    brokers[0].start()
    servers = f"127.0.0.1:{proxy.port}"
    kafka = KafkaConfig(bootstrap_servers=servers, request_timeout_ms=2000, connect_retries=3)
    topic = f"t-recreated-{uuid.uuid4().hex[:8]}"
    proc = None
    try:
        with TopicAdmin(kafka) as admin:
            admin.create_topic(topic, 1)
        replay_events(synthetic_events(200, seed=7), kafka, topic, progress=False)
        config = tmp_path / "kafka.yaml"
        config.write_text("kafka:\n  request_timeout_ms: 2000\n")
        command = [sys.executable, "-c", "from felrec_stream.cli import main; main()", "--log-json", "consume",
                   "--topic", topic, "--checkpoint", str(checkpoint), "--bootstrap-servers", servers, "--config",
                   str(config), "--batch-size", "32", "--max-wait-ms", "20", "--snapshot-dir",
                   str(tmp_path / "snap"), "--snapshot-every-events", "32", "--device", "cpu"]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "FELREC_HOME": str(tmp_path / "home")}
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                cwd=ROOT)
        lines = Lines(proc)
        lines.wait_for(_applied(200), "the old topic's 200 events applied")
        proxy.cut()
        lines.wait_for(_outage_noticed(1), "the outage noticed")
        brokers[0].stop()  # its data is gone: a broker restarted without its disks
        brokers.append(EmbeddedBroker(port=port, advertised_port=proxy.port,
                                      data_dir=tempfile.mkdtemp(prefix="felrec-rt-")))
        proxy.restore()  # the worker reconnects while the broker starts and the topic is recreated and refilled
        brokers[1].start()
        with TopicAdmin(kafka) as admin:
            admin.create_topic(topic, 1, exists_ok=True)  # the reconnecting worker's requests may create it
        replay_events(synthetic_events(1000, seed=8), kafka, topic, progress=False)
        lines.wait_for(lambda records: proc.poll() is not None or _applied_max(records) > 200,
                       "the worker stopped or applied events of the new topic", timeout_s=120)
        if _applied_max(lines.records()) > 200:
            proc.kill()  # carried on into the new topic
        code = proc.wait(timeout=60)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        for broker in brokers:
            broker.stop()
        proxy.cut()
    assert code == 2, lines.lines[-5:]
    wait_for(lambda: any(line.startswith("error: ") for line in lines.lines), 10, "its error line read")
    assert any("recreated" in line and line.startswith("error: ") for line in lines.lines), lines.lines[-5:]
    assert _applied_max(lines.records()) == 200  # nothing from the new topic
    assert SnapshotManager(tmp_path / "snap").latest_valid().meta["applied_events"] <= 200
