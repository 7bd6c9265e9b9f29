"""structlog, configured once per process: JSON lines when stderr is not a TTY, console otherwise.

Events are snake_case names with key=value fields: `log.info("epoch_done", epoch=3, loss=1.2)`.
"""

from __future__ import annotations

import logging
import os
import sys

import structlog

_configured = False


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
    # kafka-python logs through stdlib logging; keep it quiet unless debugging.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    _configured = True


def get_logger(name: str | None = None) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name) if name else structlog.get_logger()
