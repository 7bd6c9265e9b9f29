"""The test fixtures themselves: without the embedded broker binary, CI fails and a laptop skips."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NEEDS_BINARY = "tests/connectors/test_kafka_broker.py::test_start_status_stop"


def _pytest_without_binary(ci: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "FELREC_TEST_BOOTSTRAP_SERVERS")}
    env["CALF_TANSU_BIN"] = "/nonexistent/tansu"  # resolve_binary never ignores an explicit override
    if ci:
        env["CI"] = "true"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", NEEDS_BINARY],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_missing_broker_binary_fails_under_ci():
    result = _pytest_without_binary(ci=True)
    assert result.returncode == 1, result.stdout
    assert "CI=true requires it" in result.stdout and "1 error" in result.stdout


def test_missing_broker_binary_skips_with_the_reason_elsewhere():
    result = _pytest_without_binary(ci=False)
    assert result.returncode == 0, result.stdout
    assert "no embedded broker binary" in result.stdout and "1 skipped" in result.stdout
