"""ProgressLog: one event every N batches or T seconds, with rate, mean loss and ETA (fake clock)."""

from __future__ import annotations

import pytest

from felrec_stream.errors import ConfigError
from felrec_stream.progress import ProgressLog


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Recorder:
    """Stands in for a structlog logger: keeps (event, fields) of every info call."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict]] = []

    def info(self, event: str, **fields) -> None:
        self.events.append((event, fields))


def _progress(**kwargs) -> tuple[ProgressLog, FakeClock, Recorder]:
    clock, recorder = FakeClock(), Recorder()
    return ProgressLog("train_progress", clock=clock, logger=recorder, **kwargs), clock, recorder


def test_logs_every_n_batches_with_rate_mean_loss_and_eta():
    progress, clock, recorder = _progress(total_events=1000, every_batches=3, every_seconds=3600, epoch=2)
    logged = []
    for loss in (4.0, 3.0, 2.0, 1.0):
        clock.now += 0.5  # 100 events per 0.5 s = 200 events/s
        logged.append(progress.update(100, loss))
    assert logged == [False, False, True, False]
    assert recorder.events == [("train_progress", {"epoch": 2, "batch": 3, "events": 300, "events_per_s": 200.0,
                                                   "loss": 3.0, "total_events": 1000, "eta_s": 3.5})]


def test_logs_after_every_seconds_even_between_batch_counts():
    progress, clock, recorder = _progress(every_batches=1000, every_seconds=30)
    clock.now += 29.9
    assert not progress.update(10)
    clock.now += 0.1
    assert progress.update(10)
    assert recorder.events[0][1]["batch"] == 2 and "eta_s" not in recorder.events[0][1]
    clock.now += 29.9  # the window restarts at the last event
    assert not progress.update(10)


def test_loss_is_the_mean_since_the_previous_event_and_skips_missing_or_nan():
    progress, clock, recorder = _progress(every_batches=2)
    for loss in (1.0, 3.0, None, float("nan"), 5.0, 7.0):
        clock.now += 1
        progress.update(8, loss)
    assert [fields.get("loss") for _, fields in recorder.events] == [2.0, None, 6.0]


def test_finish_logs_the_unreported_tail_once():
    progress, clock, recorder = _progress(total_events=25, every_batches=2)
    for n in (10, 10, 5):
        clock.now += 1
        progress.update(n)
    progress.finish()
    progress.finish()
    assert [(f["batch"], f["events"], f["eta_s"]) for _, f in recorder.events] == [(2, 20, 0.5), (3, 25, 0.0)]


def test_no_rate_before_time_has_passed():
    progress, _, recorder = _progress(total_events=10, every_batches=1)
    progress.update(5)
    assert recorder.events[0][1]["events_per_s"] is None and recorder.events[0][1]["eta_s"] is None


@pytest.mark.parametrize("kwargs", [{"every_batches": 0}, {"every_seconds": 0}])
def test_invalid_intervals_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        ProgressLog("x", **kwargs)
