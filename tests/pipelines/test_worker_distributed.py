"""The streaming worker on 2 gloo ranks: rank 0 reads and snapshots, rank 1 follows.

In memory (no broker): both replicas end equal to each other and to one process's replay, a
restart restores rank 0's snapshot on every rank and continues exactly, a follower's stop request
stops the job gracefully. Through the CLI on the embedded broker (`felrec-stream --nproc 2 consume`,
torchrun): a killed rank stops the whole job with an error instead of hanging, and a restart resumes
from the last snapshot with every event applied exactly once.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from connectors.kafka.admin import TopicAdmin
from connectors.kafka.replay import replay_events
from felrec_stream.config import CacheConfig, KafkaConfig, from_dict
from felrec_stream.faults import ENV as FAULT_ENV
from felrec_stream.parallel import Ranks
from felrec_stream.state.faiss_store import make_store
from felrec_stream.state.snapshot import SnapshotManager
from felrec_stream.stream.source import InMemorySource
from pipelines.replicas import Follower
from felrec_stream.config import WorkerConfig
from pipelines.model import load_model
from pipelines.worker import StreamWorker, build_worker, store_fingerprint
from tests.distributed import run_ranks
from tests.pipelines import assert_histories_match_table, assert_same_store, offline_replay, synthetic_events
from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]
N_EVENTS, BATCH, TOPIC = 600, 32, "in-memory"
ATOL = 1e-5  # a rank encodes its slice with the slice's own padding: floats round differently


class _AskingFollower(Follower):
    """Asks rank 0 to stop after its 5th batch, as a follower that got SIGTERM does."""

    def _handle(self, kind: str, payload: Any) -> None:
        super()._handle(kind, payload)
        if self.batches == 5:
            self.request_stop("test")


def _run(ranks: Ranks, checkpoint: Path, snapshot_dir: Path, follower: type[Follower] = Follower,
         until_end: bool = True, **options: Any) -> dict:
    bundle = load_model(checkpoint)
    store = make_store(bundle.dim, bundle.cache)
    if ranks.leader:
        source = InMemorySource(synthetic_events(N_EVENTS), BATCH)
        worker = StreamWorker(bundle, store, source,
                              WorkerConfig(TOPIC, batch_size=BATCH, until_end=until_end, **options),
                              SnapshotManager(snapshot_dir), ranks=ranks)
        result = worker.run()
        summary = {"applied_this_run": result.applied_this_run, "applied": result.applied_total,
                   "restored_seq": result.restored_seq, "stopped_by": result.stopped_by}
    else:
        result = follower(bundle, store, ranks).run()
        summary = {"applied_this_run": result.applied, "stopped_by": result.stopped_by}
    return {**summary, "store": store_fingerprint(store)}


def _scenarios(ranks: Ranks, checkpoint: str, tmp: str) -> dict:
    checkpoint, tmp_path = Path(checkpoint), Path(tmp)
    return {"first": _run(ranks, checkpoint, tmp_path / "snap", max_events=250, snapshot_every_events=96),
            "second": _run(ranks, checkpoint, tmp_path / "snap"),
            "whole": _run(ranks, checkpoint, tmp_path / "whole"),  # the same stream, in one run
            "asked": _run(ranks, checkpoint, tmp_path / "asked", follower=_AskingFollower, until_end=False)}


@pytest.fixture(scope="module")
def results(checkpoint, tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("dist_worker")
    return run_ranks(_scenarios, 2, tmp, str(checkpoint), str(tmp))


@pytest.fixture(scope="module")
def uninterrupted(checkpoint) -> dict:
    bundle = load_model(checkpoint)
    return store_fingerprint(offline_replay(bundle.model, synthetic_events(N_EVENTS), BATCH, bundle.cache))


def test_replicas_equal_each_other_and_one_process(results, uninterrupted):
    rank0, rank1 = (r["second"]["store"] for r in results)
    assert_same_store(rank1, rank0)  # bit for bit: every rank commits the same gathered vectors
    assert_same_store(rank0, uninterrupted, atol=ATOL)
    assert_histories_match_table(rank0, synthetic_events(N_EVENTS), 8)  # every event exactly once


def test_a_restart_restores_rank_0s_snapshot_on_every_rank_and_continues_exactly(results):
    leader, follower = results
    assert leader["first"]["stopped_by"] == "max_events" and leader["first"]["applied"] == 256  # batch boundary
    assert follower["first"]["applied_this_run"] == 256 and follower["first"]["stopped_by"] == "max_events"
    second = leader["second"]
    assert second["restored_seq"] is not None and second["applied"] == N_EVENTS
    assert second["applied_this_run"] == follower["second"]["applied_this_run"] == N_EVENTS - 256


def test_two_runs_on_two_ranks_are_bit_identical(results):
    """One uninterrupted run ends bit for bit where the run stopped at 256 events and restarted ends."""
    for r in results:
        assert r["whole"]["applied_this_run"] == N_EVENTS
        assert_same_store(r["whole"]["store"], r["second"]["store"])


def test_a_followers_stop_request_stops_the_job_gracefully(results, tmp_path):
    leader, follower = results[0]["asked"], results[1]["asked"]
    assert leader["stopped_by"] == "peer_test" and follower["stopped_by"] == "peer_test"
    assert 5 * BATCH <= leader["applied"] < N_EVENTS  # stopped early, at a batch boundary
    assert leader["applied"] == follower["applied_this_run"]
    assert_same_store(follower["store"], leader["store"])


# ---- through the CLI and torchrun, on the embedded broker --------------------------------------

@pytest.fixture(scope="module")
def topic(kafka: KafkaConfig) -> str:
    name = f"t-dist-{uuid.uuid4().hex[:8]}"
    with TopicAdmin(kafka) as admin:
        admin.create_topic(name, 2)
    replay_events(synthetic_events(N_EVENTS), kafka, name, progress=False)
    return name


def _consume(checkpoint: Path, kafka: KafkaConfig, topic: str, snapshot_dir: Path, tmp_path: Path,
             fault: str) -> tuple[int, list[dict], str, str]:
    command = [sys.executable, "-c", "from felrec_stream.cli import main; main()", "--log-json", "--nproc", "2",
               "consume", "--topic", topic, "--checkpoint", str(checkpoint), "--bootstrap-servers",
               kafka.bootstrap_servers, "--batch-size", str(BATCH), "--snapshot-dir", str(snapshot_dir),
               "--snapshot-every-events", "128", "--device", "cpu", "--until-end"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FELREC_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1",
           "OMP_WAIT_POLICY": "PASSIVE", "FELREC_PARALLEL__TIMEOUT_S": "60"}
    env[FAULT_ENV] = fault
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=180)
    records = []
    for line in proc.stderr.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return proc.returncode, records, proc.stdout, proc.stderr


def _final_store(snapshot_dir: Path) -> tuple[dict, dict]:
    snapshot = SnapshotManager(snapshot_dir).latest_valid()
    state = snapshot.state()["store"]
    store = make_store(int(state["dim"]), from_dict(CacheConfig, snapshot.meta["cache"], "cache"))
    store.load_state_dict(state)
    return store_fingerprint(store), snapshot.meta


@pytest.mark.kafka
@pytest.mark.slow  # torchrun and 2 fresh ranks, then a restart: ~25 s; CI runs it
def test_a_killed_rank_stops_the_job_and_a_restart_resumes_exactly_once(checkpoint, kafka, topic, uninterrupted,
                                                                       tmp_path):
    snapshot_dir = tmp_path / "snap"
    code, records, _, stderr = _consume(checkpoint, kafka, topic, snapshot_dir, tmp_path,
                                        fault="replica_batch_applied@10")  # rank 1 dies after its 10th batch
    assert code != 0, stderr[-2000:]  # stopped (subprocess.run's timeout would catch a hang)
    killed = [r for r in records if r.get("event") == "fault_injected"]
    assert [r.get("dist_rank") for r in killed] == [1], stderr[-3000:]
    assert "error: rank 0 of 2: " in stderr  # rank 0 noticed at once and stopped with one line
    assert "error: the 2 ranks of `felrec-stream consume` stopped" in stderr
    assert "Traceback" not in stderr, stderr[-3000:]  # one line per failed rank, not torchrun's traceback
    durable = SnapshotManager(snapshot_dir).latest_valid().meta["applied_events"]
    assert 0 < durable < N_EVENTS

    # the restart (here one process: a snapshot of N ranks is an ordinary snapshot) resumes from it
    options = WorkerConfig(topic, batch_size=BATCH, until_end=True)
    result = build_worker(checkpoint, kafka, options, device="cpu", snapshot_dir=snapshot_dir).run()
    assert result.restored_seq is not None and result.applied_total == N_EVENTS
    assert result.applied_this_run == N_EVENTS - durable
    fingerprint, meta = _final_store(snapshot_dir)
    assert meta["applied_events"] == N_EVENTS
    assert_histories_match_table(fingerprint, synthetic_events(N_EVENTS), 8)  # nothing lost, nothing twice
    assert_same_store(fingerprint, uninterrupted, atol=ATOL)


def _descendants(pid: int) -> list[int]:
    """Every live descendant of `pid` (Linux /proc), children first."""
    found, queue = [], [pid]
    while queue:
        parent = queue.pop(0)
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found += children
            queue += children
    return found


def _lock_is_free(snapshot_dir: Path) -> bool:
    import fcntl

    with open(snapshot_dir / ".lock", "a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        return True


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.mark.kafka
@pytest.mark.slow  # torchrun and 2 ranks in follow mode, then a restart
def test_killing_the_nproc_parent_takes_its_ranks_with_it(checkpoint, kafka, topic, uninterrupted, tmp_path):
    """`kill -9` of `felrec-stream --nproc 2 consume` (the launcher alone, not its process tree):
    torchrun and both ranks die with it, the writer lock is free, a second consume starts and resumes
    exactly once."""
    snapshot_dir = tmp_path / "snap"
    parent = _nproc_consume(checkpoint, kafka, topic, snapshot_dir, tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    tree: list[int] = []
    try:
        wait_for(lambda: (snapshot_dir / "CURRENT").exists(), 120, "the ranks wrote a snapshot")
        tree = _descendants(parent.pid)
        assert len(tree) >= 3, tree  # torchrun and its 2 ranks
        parent.kill()
        parent.wait(timeout=10)
        wait_for(lambda: not any(_alive(pid) for pid in tree), 30, "torchrun and the ranks died with their parent")
        # a killed thread group's leader is a zombie before its other threads let go of the lock
        wait_for(lambda: _lock_is_free(snapshot_dir), 30, "the writer lock is free")
    finally:
        for pid in tree:  # never leave orphans behind, also when the test fails
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if parent.poll() is None:
            parent.kill()

    options = WorkerConfig(topic, batch_size=BATCH, until_end=True)
    result = build_worker(checkpoint, kafka, options, device="cpu", snapshot_dir=snapshot_dir).run()
    assert result.restored_seq is not None and result.applied_total == N_EVENTS
    fingerprint, meta = _final_store(snapshot_dir)
    assert meta["applied_events"] == N_EVENTS
    assert_histories_match_table(fingerprint, synthetic_events(N_EVENTS), 8)  # nothing lost, nothing twice


def _nproc_consume(checkpoint: Path, kafka: KafkaConfig, topic: str, snapshot_dir: Path, tmp_path: Path,
                   **popen: Any) -> subprocess.Popen:
    command = [sys.executable, "-c", "from felrec_stream.cli import main; main()", "--log-json", "--nproc", "2",
               "consume", "--topic", topic, "--checkpoint", str(checkpoint), "--bootstrap-servers",
               kafka.bootstrap_servers, "--batch-size", str(BATCH), "--snapshot-dir", str(snapshot_dir),
               "--snapshot-every-events", "128", "--device", "cpu", "--max-wait-ms", "50"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FELREC_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1",
           "OMP_WAIT_POLICY": "PASSIVE", "FELREC_PARALLEL__TIMEOUT_S": "60"}
    return subprocess.Popen(command, env=env, cwd=ROOT, **popen)


@pytest.mark.kafka
@pytest.mark.slow  # torchrun and 2 ranks in follow mode
def test_a_graceful_sigterm_of_nproc_consume_exits_0_without_a_traceback(checkpoint, kafka, topic, tmp_path):
    snapshot_dir = tmp_path / "snap"
    proc = _nproc_consume(checkpoint, kafka, topic, snapshot_dir, tmp_path, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (snapshot_dir / "CURRENT").exists(), 120, "the ranks wrote a snapshot")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err and "error" not in err.lower().replace('"level": "error"', ""), err[-3000:]
    summary = json.loads(out)
    assert summary["stopped_by"] == "signal:SIGTERM"
    assert SnapshotManager(snapshot_dir).latest_valid().meta["applied_events"] == summary["applied_total"]
