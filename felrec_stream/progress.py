"""Progress of a long batch loop as structlog events, for logs that no progress bar reaches.

Outside a TTY tqdm is off, and an epoch at paper size is minutes of silence. A `ProgressLog` is
fed once per batch and logs one event every `every_batches` batches or `every_seconds` seconds,
whichever comes first:

    progress = ProgressLog("train_progress", total_events=len(events), epoch=epoch)
    for batch in iter_batches(events, batch_size):
        loss = train_step(...)
        progress.update(len(batch), loss)
    progress.finish()

Each event carries batch, events, events_per_s (since the start), loss (mean over the batches
since the previous event; absent when no batch reported one), eta_s (with `total_events`) and
the fixed fields given at construction (e.g. epoch).
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

from felrec_stream.errors import ConfigError
from felrec_stream.log import get_logger

EVERY_BATCHES = 100
EVERY_SECONDS = 30.0


class ProgressLog:
    """Counts events and losses per batch; logs `event` at a bounded rate (clock injectable for tests)."""

    def __init__(self, event: str, total_events: int | None = None, every_batches: int = EVERY_BATCHES,
                 every_seconds: float = EVERY_SECONDS, clock: Callable[[], float] = time.monotonic,
                 logger: Any = None, **fields: Any) -> None:
        if every_batches < 1 or every_seconds <= 0:
            raise ConfigError("every_batches must be >= 1 and every_seconds > 0")
        self.event, self.total_events, self.fields = event, total_events, fields
        self.every_batches, self.every_seconds = every_batches, every_seconds
        self.clock = clock
        self.log = logger if logger is not None else get_logger(__name__)
        self.started = self.last_logged = clock()
        self.batches = self.events = 0
        self._since_log = 0  # batches since the last event
        self._losses: list[float] = []  # losses since the last event

    def update(self, n_events: int, loss: float | None = None) -> bool:
        """Count one batch of `n_events` (and its loss, if any); True when this call logged."""
        self.batches += 1
        self._since_log += 1
        self.events += n_events
        if loss is not None and math.isfinite(loss):
            self._losses.append(float(loss))
        now = self.clock()
        if self._since_log >= self.every_batches or now - self.last_logged >= self.every_seconds:
            self._emit(now)
            return True
        return False

    def finish(self) -> None:
        """Log the batches not reported yet (the tail of the loop)."""
        if self._since_log:
            self._emit(self.clock())

    def record(self, now: float) -> dict[str, Any]:
        """The fields of an event logged at time `now`."""
        elapsed = now - self.started
        rate = self.events / elapsed if elapsed > 0 else None
        out: dict[str, Any] = {**self.fields, "batch": self.batches, "events": self.events,
                               "events_per_s": round(rate, 1) if rate is not None else None}
        if self._losses:
            out["loss"] = round(sum(self._losses) / len(self._losses), 5)
        if self.total_events is not None:
            out["total_events"] = self.total_events
            remaining = max(self.total_events - self.events, 0)
            out["eta_s"] = round(remaining / rate, 1) if rate else None
        return out

    def _emit(self, now: float) -> None:
        self.log.info(self.event, **self.record(now))
        self.last_logged, self._since_log, self._losses = now, 0, []
