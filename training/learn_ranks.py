"""`felrec-stream learn` on several ranks (torchrun, `--nproc N`): rank 0 reads, snapshots and
publishes; the others follow, as the streaming worker's ranks do (pipelines/replicas.py).

Rank 0 runs the ordinary `Learner` with `ranks`; ranks > 0 run a `LearnFollower` around a
`Learner` of their own that never touches Kafka, the state directory or the models directory.
Every loop turn rank 0 sends one message (`parallel.Leader`, an all_gather that also carries each
follower's stop request back):

    ("state", (state, meta))  after restore or start: what rank 0's snapshot would hold; the
                              followers load it, so every replica starts from rank 0's state
    ("batch", EventBatch)     feed it: every rank trains its slice of the batch (`train_window` with
                              `ranks`: gradients summed, the whole batch committed to every cache),
                              and reaches each decision point on the same batch
    ("idle", None)            a heartbeat (no batch within the poll timeout)
    ("stop", reason)          rank 0 stopped cleanly (end of topic, a signal)

At each decision point every rank runs the guard on its own replica (the same figures, as the
replicas are identical; a cheaper split is possible but the guard window is small) and the ranks
check that their weights and caches agree before rank 0 snapshots. A restart restores rank 0's
snapshot and sends it: the job continues exactly where that snapshot is, as in one process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from felrec_stream.log import get_logger
from felrec_stream.parallel import FollowerBase, Ranks
from training.learn import Learner

log = get_logger(__name__)


@dataclass(frozen=True)
class LearnFollowerResult:
    rank: int
    events: int
    trained: int
    published: list[str]  # the versions rank 0 published while this rank followed
    stopped_by: str  # rank 0's reason
    seconds: float


class LearnFollower(FollowerBase):
    """A rank > 0 of `learn`: trains its slice of what rank 0 sends; writes nothing."""

    def __init__(self, learner: Learner, ranks: Ranks) -> None:
        if ranks.leader:
            raise ValueError("rank 0 runs the Learner itself, not a follower")
        super().__init__(ranks)
        self.learner = learner

    def run(self) -> LearnFollowerResult:
        started = time.perf_counter()
        stopped_by = self.follow()
        p = self.learner.progress
        result = LearnFollowerResult(self.ranks.rank, p.events, p.trained, list(self.learner.published_now),
                                     stopped_by, round(time.perf_counter() - started, 3))
        log.info("learn_follower_stopped", events=result.events, trained=result.trained, stopped_by=result.stopped_by)
        return result

    def _handle(self, kind: str, payload: Any) -> None:
        if kind == "state":
            state, meta = payload
            self.learner.load_replica(state, meta)
            log.info("learn_follower_restored", events=self.learner.progress.events)
        elif kind == "batch":
            self.learner.feed(payload)
