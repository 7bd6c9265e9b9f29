"""Fixtures shared by the worker tests: a tiny random checkpoint and a Kafka config per module."""

import uuid

import pytest

from felrec_stream.config import KafkaConfig
from tests.pipelines import write_tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


@pytest.fixture(scope="module")
def kafka(kafka_bootstrap: str) -> KafkaConfig:
    return KafkaConfig(bootstrap_servers=kafka_bootstrap, request_timeout_ms=5000, connect_retries=3,
                       dead_letter_topic=f"dlq-{uuid.uuid4().hex[:8]}")
