"""structlog, configured once per process: JSON lines when stderr is not a TTY, console otherwise.

Events are snake_case names with key=value fields: `log.info("epoch_done", epoch=3, loss=1.2)`.
Libraries that log through the standard `logging` module (kafka-python, uvicorn) go through the same
renderer as `library_log` events (logger, message), at WARNING and above (everything with
--log-level DEBUG). A library message repeated within a minute is dropped and counted (`repeated`
on its next line): a broker outage makes kafka-python log the same failure every reconnect.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

import structlog

_configured = False
REPEAT_WINDOW_S = 60.0


class _LibraryLogBridge(logging.Handler):
    """stdlib records -> structlog `library_log` events, one per message template per window."""

    def __init__(self, window_s: float = REPEAT_WINDOW_S) -> None:
        super().__init__()
        self.window_s = window_s
        self._last: dict[tuple[str, str], float] = {}
        self._dropped: dict[tuple[str, str], int] = {}
        self._mutex = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        key, now = (record.name, str(record.msg)), time.monotonic()
        with self._mutex:
            last = self._last.get(key)
            if last is not None and now - last < self.window_s:
                self._dropped[key] = self._dropped.get(key, 0) + 1
                return
            self._last[key] = now
            repeated = self._dropped.pop(key, 0)
        try:
            message = record.getMessage()
        except Exception:  # a library's bad format arguments must not break logging
            message = str(record.msg)
        fields = {"logger": record.name, "message": message[:500]}
        if repeated:
            fields["repeated"] = repeated
        get_logger(record.name).log(record.levelno, "library_log", **fields)


class _CurrentStderr:
    """Writes to whatever sys.stderr is *now* (test capture and redirection swap it after start-up)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(level: str | None = None, json: bool | None = None) -> None:
    """Configure structlog and stdlib logging; later calls are no-ops unless forced by env."""
    global _configured
    if _configured:
        return
    level_name = (level or os.environ.get("FELREC_LOG_LEVEL", "INFO")).upper()
    if json is None:
        env = os.environ.get("FELREC_LOG_JSON")
        json = (env == "1") if env is not None else not sys.stderr.isatty()
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level_name, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=_CurrentStderr()),
        cache_logger_on_first_use=True,
    )
    root = logging.getLogger()
    root.addHandler(_LibraryLogBridge())  # the only handler in a CLI process (no basicConfig)
    root.setLevel(logging.DEBUG if level_name == "DEBUG" else logging.WARNING)
    _configured = True


def get_logger(name: str | None = None) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name) if name else structlog.get_logger()
