"""The streaming worker on several ranks (torchrun): rank 0 reads, snapshots and commits; the others follow.

Rank 0 runs the ordinary `StreamWorker` (pipelines/worker.py) with a `Leader`; ranks > 0 run a
`Follower` and never touch Kafka, the snapshot directory or the consumer group. Every loop turn
rank 0 sends one message to all ranks (`Ranks.exchange`, an all_gather that also carries each
follower's stop request back):

    ("state", store state | None)  after restore: the followers load rank 0's restored store
    ("batch", EventBatch)          apply it: every rank encodes its slice, all commit the whole batch
    ("idle", None)                 nothing arrived within the poll timeout: a heartbeat, so a rank that
                                   died or hangs is noticed within parallel.timeout_s on an idle topic too
    ("check", None)                before each snapshot: every rank's store digest must be rank 0's
    ("model", weights)             rank 0 switched to a published weight version: load it before the next batch
    ("stop", reason)               rank 0 stopped cleanly (end of topic, max events, a signal)

Why rank 0 reads and sends rather than every rank reading the same partitions: in follow mode the
batch cuts and the cross-partition release order depend on fetch timing, so N consumers would cut
N different streams; one reader gives one order by construction (and one dead-letter producer).

Exactly once: only rank 0 writes snapshots and commits offsets, and its store is every replica's
(checked at each snapshot). A rank that dies makes the others' next collective fail at once: rank 0
stops with an error and no final snapshot, torchrun stops the rest. A restart restores rank 0's
newest snapshot and sends it to the followers: the job resumes exactly where that snapshot is.

Signals: `--nproc`'s launcher (or a torchrun run by hand) passes SIGTERM/SIGINT to every rank. A
follower never stops on its own (rank 0 would wait for it): it passes the request on with its next
reply, and rank 0 stops gracefully (batch finished, final snapshot) and tells everyone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from felrec_stream.faults import fault_point
from felrec_stream.log import get_logger
from felrec_stream.parallel import FollowerBase, Ranks
from felrec_stream.state.engine import infer_batch
from felrec_stream.state.store import RepresentationStore
from pipelines.model import ModelBundle, model_and_store

log = get_logger(__name__)


@dataclass(frozen=True)
class FollowerResult:
    rank: int
    applied: int
    batches: int
    stopped_by: str  # rank 0's reason
    seconds: float


class Follower(FollowerBase):
    """A rank > 0 of `consume`: applies what rank 0 sends to its replica of the store; writes nothing."""

    def __init__(self, bundle: ModelBundle, store: RepresentationStore, ranks: Ranks) -> None:
        super().__init__(ranks)
        self.bundle, self.store = bundle, store
        self.applied = self.batches = 0

    def run(self) -> FollowerResult:
        started = time.perf_counter()
        log.info("follower_started", model_version=self.bundle.version)
        stopped_by = self.follow()
        seconds = round(time.perf_counter() - started, 3)
        log.info("follower_stopped", applied=self.applied, batches=self.batches, stopped_by=stopped_by,
                 seconds=seconds)
        return FollowerResult(self.ranks.rank, self.applied, self.batches, stopped_by, seconds)

    def _handle(self, kind: str, payload: Any) -> None:
        if kind == "state" and payload is not None:
            self.store.load_state_dict(payload)
            log.info("follower_restored", users=len(self.store.users), items=len(self.store.items))
        elif kind == "batch":
            infer_batch(self.bundle.model, self.store, payload, self.bundle.cache, self.ranks)
            self.applied += len(payload)
            self.batches += 1
            fault_point("replica_batch_applied")
        elif kind == "model":  # rank 0 switched to a published version before this batch
            self.bundle.model.load_state_dict(payload)
            log.info("follower_model_swapped")
        elif kind == "check":
            self.ranks.agree(self.store.state_dict(), "stores")


def build_follower(checkpoint: str | Path, ranks: Ranks, *, shards: int | None = None,
                   index_type: str | None = None, device: str = "auto") -> Follower:
    """The same model and store as rank 0's `build_worker`, without source, sinks or snapshots."""
    bundle, store = model_and_store(checkpoint, shards=shards, index_type=index_type, device=device, ranks=ranks)
    return Follower(bundle, store, ranks)
