"""When the worker switches to a weight version the online learner published (`consume --models-dir`).

Rules (felrec_stream/state/versions.py has the publishing side):

- Only between two batches, and only a version whose `trained_through` position the worker has
  reached on every partition: every event the version was trained on is already applied, so no
  event is ever encoded or scored by weights trained on it.
- The newest such version wins (older ones the worker skipped over are never applied later).
- Until-end mode (`--until-end`): before deciding at a position the worker waits until the learner
  has decided every version up to it (`PROGRESS` at or past the position, or the learner is done),
  so which version applies at which batch is a function of the topic, not of timing: a run is
  reproducible, and a restart from a snapshot re-applies the same versions at the same batches.
  Follow mode never waits: a learner that lags or crashed only delays new versions.
- A version whose shape-defining configs differ from the running model's (`shape_digest`) is
  refused with one error line and never tried again; the worker keeps serving the old weights.
"""

from __future__ import annotations

import time
from typing import Callable, Mapping

from felrec_stream.log import get_logger
from felrec_stream.state.versions import Position, VersionManifest, VersionStore

log = get_logger(__name__)

_WAIT_POLL_S = 0.05
_WAIT_LOG_EVERY_S = 10.0


class VersionAdoption:
    """Which published version is due at a batch boundary (rules: module docstring)."""

    def __init__(self, versions: VersionStore, shape: str, until_end: bool,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> None:
        self.versions, self.shape, self.until_end = versions, shape, until_end
        self.sleep, self.clock = sleep, clock
        self.current_seq = 0  # 0: the checkpoint
        self._refused: set[str] = set()

    def due(self, offsets: Mapping[int, int], events: int, stopping: Callable[[], bool]) -> VersionManifest | None:
        """The version to switch to now, or None. Waits (until-end mode) as the rules say; returns
        None at once when `stopping()` turns true while waiting."""
        if self.until_end and not self._wait_for_learner(offsets, events, stopping):
            return None
        due = None
        for manifest in self.versions.manifests():
            if manifest.seq <= self.current_seq or manifest.name in self._refused:
                continue
            if not manifest.trained_through.reached_by(offsets):
                continue
            if manifest.shape_digest != self.shape:
                self._refused.add(manifest.name)
                log.error("model_version_refused", version=manifest.name, shape_digest=manifest.shape_digest,
                          running=self.shape, reason="its encoder/model/cache configs differ from the running "
                          "model's; keeping the current weights")
                continue
            due = manifest
        return due

    def _wait_for_learner(self, offsets: Mapping[int, int], events: int, stopping: Callable[[], bool]) -> bool:
        """True once the learner has decided every version up to here (or is done)."""
        here = Position(events, dict(offsets))
        started = last_log = self.clock()
        while True:
            decided, done = self.versions.progress()
            if done or here.reached_by(decided.offsets) and decided.offsets:
                return True
            if stopping():
                return False
            if self.clock() - last_log >= _WAIT_LOG_EVERY_S:
                last_log = self.clock()
                log.info("waiting_for_learner", events=events, learner_events=decided.events,
                         waited_s=round(last_log - started, 1))
            self.sleep(_WAIT_POLL_S)
