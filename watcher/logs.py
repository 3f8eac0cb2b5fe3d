"""structlog configuration, in one place: JSON lines (or console rendering) on stdout.

Every line carries `timestamp` (ISO 8601, UTC), `level` and `event`; poll tasks bind `run_id`
through contextvars. The API key is scrubbed from every value before rendering and from the
rendered line after, so a key that slipped into an exception message or an error body the API
echoed never reaches the log, whatever characters it holds.
"""

from __future__ import annotations

import json
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


REDACTED = "<redacted>"


class _Redactor:
    """Keeps the API key out of log lines, in two places.

    Before rendering it replaces the key in every value (nested ones too), because a renderer
    escapes what it writes: a key holding `"` or `\\` would pass a check of the JSON line as
    `\\"` and `\\\\`. After rendering it checks the line once more for the key in each form
    the renderers produce, for whatever reached them some other way.
    """

    def __init__(self, secret: str | None) -> None:
        self._secret = secret or ""
        self._forms = (
            sorted(
                {self._secret, json.dumps(self._secret)[1:-1], repr(self._secret)[1:-1]},
                key=len,
                reverse=True,
            )
            if secret
            else []
        )

    def _scrub(self, value: Any) -> Any:
        if isinstance(value, str):
            return value.replace(self._secret, REDACTED)
        if value is None or isinstance(value, bool | int | float):
            return value
        if isinstance(value, dict):
            return {self._scrub(key): self._scrub(item) for key, item in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return [self._scrub(item) for item in value]
        # Renderers show other objects by their repr; scrub that rather than trust it.
        return self._scrub(repr(value))

    def values(self, _logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
        if not self._secret:
            return event_dict
        scrubbed: EventDict = self._scrub(event_dict)
        return scrubbed

    def line(self, _logger: WrappedLogger, _name: str, line: Any) -> Any:
        if isinstance(line, str):
            for form in self._forms:
                line = line.replace(form, REDACTED)
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
    redactor = _Redactor(secret)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            _rename_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redactor.values,
            renderer,
            redactor.line,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=stream or sys.stdout),
        cache_logger_on_first_use=True,
    )


def get_logger() -> structlog.typing.FilteringBoundLogger:
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger()
    return logger
