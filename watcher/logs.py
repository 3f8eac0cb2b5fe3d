"""structlog configuration, in one place: JSON lines (or console rendering) on stdout.

Every line carries `timestamp` (ISO 8601, UTC), `level` and `event`; poll tasks bind `run_id`
through contextvars. As a last line of defence the rendered line is scrubbed of the API key,
so a key that slipped into an exception message still never reaches the log.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class _ScrubSecret:
    """Replace the secret wherever it appears in an already rendered line."""

    def __init__(self, secret: str | None) -> None:
        self._secret = secret

    def __call__(self, _logger: WrappedLogger, _name: str, line: Any) -> Any:
        if self._secret and isinstance(line, str) and self._secret in line:
            return line.replace(self._secret, "<redacted>")
        return line


def _rename_level(_logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
    # structlog spells "warning" as the method name was called; keep the contract's spelling.
    if event_dict.get("level") == "warn":
        event_dict["level"] = "warning"
    return event_dict


def configure_logging(
    log_format: str, level: str, *, secret: str | None = None, stream: TextIO | None = None
) -> None:
    renderer: Processor = (
        structlog.processors.JSONRenderer()
        if log_format == "json"
        else structlog.dev.ConsoleRenderer(colors=(stream or sys.stdout).isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            _rename_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
            _ScrubSecret(secret),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=stream or sys.stdout),
        cache_logger_on_first_use=True,
    )


def get_logger() -> structlog.typing.FilteringBoundLogger:
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger()
    return logger
