"""Named crash points for drills: the process kills itself exactly where a test says.

`FELREC_FAULT_KILL_AT=point[@n][,point[@n]...]` makes the process log `fault_injected` and SIGKILL
itself the n-th time (default: the first) it reaches `fault_point(point)`. Points in the code:

    snapshot_files_written     a snapshot's array files are durable, its manifest is not written
    snapshot_manifest_written  the manifest is durable, CURRENT still names the previous snapshot
    snapshot_committed         CURRENT names the new snapshot, older ones are not pruned yet
    snapshot_pruning           the first old snapshot directory is deleted, others remain
    dead_letter_sent           a poison message was handed to the dead-letter producer, not flushed
    replica_batch_applied      a follower rank of a data-parallel `consume` applied a batch (pipelines/replicas.py)
    learner_snapshot_written   `learn` snapshotted a decision, the version is not published yet (training/learn.py)
    version_files_written      a version's files are durable in its .tmp- folder, not renamed (state/versions.py)
    version_visible            a version's folder is in place, LATEST does not name it yet
    model_swapped              the worker switched to a version, no snapshot records it yet (pipelines/worker.py)

Why in the product and not in the tests: a signal sent from outside after a log line lands
"somewhere after" it, so a drill could not tell a kill during a snapshot write from one after it.
Unset (production), `fault_point` is one environment lookup.
"""

from __future__ import annotations

import os
import signal
import sys

from felrec_stream.log import get_logger

log = get_logger(__name__)

ENV = "FELREC_FAULT_KILL_AT"
_reached: dict[str, int] = {}


def _plan(spec: str) -> dict[str, int]:
    plan = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, nth = part.partition("@")
        plan[name] = int(nth) if nth else 1
    return plan


def fault_point(name: str) -> None:
    """Kill this process here when FELREC_FAULT_KILL_AT asks for this point (and occurrence)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    nth = _plan(spec).get(name)
    if nth is None:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] == nth:
        log.warning("fault_injected", point=name, occurrence=nth, pid=os.getpid())
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
