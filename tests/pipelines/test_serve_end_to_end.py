"""Issue acceptance, end to end: broker -> replay -> `consume --serve` -> queries over real HTTP.

A brand-new item that just received interactions from the users of item X is returned among X's
similar items, and a restarted worker (restored from its snapshot) gives the same answers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from connectors.kafka.admin import TopicAdmin
from connectors.kafka.broker import free_port
from connectors.kafka.replay import replay_events
from felrec_stream.serving.client import FelrecClient
from felrec_stream.stream.events import make_events
from tests.pipelines import stop_with_sigterm, synthetic_events
from tests.waiting import wait_for

pytestmark = pytest.mark.kafka
BATCH = 8
ROOT = Path(__file__).resolve().parents[2]


def cold_start_stream() -> pa.Table:
    """Background traffic, then a group of new users: warm items, item X, then a brand-new item."""
    background = synthetic_events(400)
    t0 = background.column("timestamp").to_numpy().max() + 1
    group = [f"e{k}" for k in range(12)]
    phases = [[(u, f"w{j}") for j in range(3) for u in group], [(u, "X") for u in group], [(u, "fresh") for u in group]]
    rows = [pair for phase in phases for pair in phase]
    extra = make_events([u for u, _ in rows], [i for _, i in rows], [t0 + n for n in range(len(rows))],
                        event_id=[len(background) + n for n in range(len(rows))])
    return pa.concat_tables([background, extra])


def start_worker(topic: str, checkpoint, kafka, snap_dir, home) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-c", "from felrec_stream.cli import main; main()", "--log-json", "consume",
               "--topic", topic, "--checkpoint", str(checkpoint), "--bootstrap-servers", kafka.bootstrap_servers,
               "--batch-size", str(BATCH), "--max-wait-ms", "20", "--snapshot-dir", str(snap_dir),
               "--device", "cpu", "--serve", "--http-port", str(port)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FELREC_HOME": str(home)}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    return proc, f"http://127.0.0.1:{port}"


def wait_applied(proc: subprocess.Popen, n_events: int) -> None:
    for line in proc.stderr:  # follow mode never stops by itself
        if '"batch_applied"' in line and json.loads(line)["applied"] == n_events:
            return
    raise AssertionError(f"worker exited early with {proc.wait()}")


def wait_ready(client: FelrecClient, timeout_s: float = 60) -> None:
    wait_for(client.readyz, timeout_s, "the restarted worker is ready")  # errors while it is not listening yet


@pytest.mark.slow
def test_new_item_is_similar_to_its_co_interacted_items_and_restart_keeps_answers(checkpoint, kafka, topic_name,
                                                                                  tmp_path):
    table = cold_start_stream()
    with TopicAdmin(kafka) as admin:
        admin.create_topic(topic_name, 2)
    replay_events(table, kafka, topic_name, progress=False)
    proc, url = start_worker(topic_name, checkpoint, kafka, tmp_path / "snap", tmp_path / "home")
    try:
        wait_applied(proc, len(table))
        with FelrecClient(url) as client:
            similar = client.similar_items("X", k=5)
            assert "fresh" in [s.id for s in similar], similar
            before = {name: [(s.id, round(s.score, 5)) for s in fn(q, k=10)] for name, fn, q in
                      (("items", client.similar_items, "fresh"), ("users", client.similar_users, "e0"),
                       ("recs", client.recommendations, "e3"))}
        assert stop_with_sigterm(proc)["applied_total"] == len(table)
        proc, url = start_worker(topic_name, checkpoint, kafka, tmp_path / "snap", tmp_path / "home")
        with FelrecClient(url) as client:
            wait_ready(client)
            after = {name: [(s.id, round(s.score, 5)) for s in fn(q, k=10)] for name, fn, q in
                     (("items", client.similar_items, "fresh"), ("users", client.similar_users, "e0"),
                      ("recs", client.recommendations, "e3"))}
            assert client.catalog().items == len(set(table.column("item").to_pylist()))
        assert after == before
        summary = stop_with_sigterm(proc)  # restored at the end of the topic: nothing is applied twice
        assert (summary["applied_this_run"], summary["applied_total"]) == (0, len(table))
    finally:
        if proc.poll() is None:
            proc.kill()
