"""structlog configuration, in one place: JSON lines, or short lines for people, on stdout.

Every JSON line carries `timestamp` (ISO 8601, UTC), `level` and `event`; poll tasks bind
`run_id` through contextvars. The console format gives each event one short line (local time,
level, run, what happened). The API key is scrubbed from every value before rendering and from the
rendered line after, so a key that slipped into an exception message or an error body the API
echoed never reaches the log, whatever characters it holds.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
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


def _seconds(value: Any) -> str:
    """51.8s, 12m05s, 3h12m: a duration as a person reads it."""
    seconds = float(value)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _short(value: Any, limit: int = 160) -> str:
    """One line of at most `limit` characters: line breaks in a value never split a log line."""
    text = str(value).replace("\r", " ").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _changed(e: EventDict) -> str:
    seconds = e.get("seconds_in_previous_status")
    after = "" if seconds is None else f"  after {_seconds(seconds)}"
    return f"{e.get('from_status')} -> {e.get('to_status')}{after}"


def _failed(e: EventDict) -> str:
    attempts = e.get("attempts")
    tries = f" ({attempts} attempts)" if isinstance(attempts, int) and attempts > 1 else ""
    return f"poll failed: {e.get('detail') or e.get('result')}{tries}"


# What each event says after the time, level and run; events not listed show their fields.
_MESSAGES: dict[str, Callable[[EventDict], str]] = {
    "sampler_status_changed": _changed,
    "sampler_status_observed": lambda e: f"{e.get('status') or 'no sampler'}  first seen",
    "undocumented_sampler_status": lambda e: f"undocumented status {e.get('status')}",
    "poll_failed": _failed,
    "poll_retrying": lambda e: (
        f"retrying after {e.get('detail') or e.get('result')} in {_seconds(e.get('delay', 0))}"
    ),
    "poll_recovered": lambda e: f"poll ok again after {e.get('failed_polls')} failed",
    "api_key_rejected": lambda e: f"API key rejected: {e.get('detail')}; {e.get('hint')}",
    "api_key_accepted": lambda e: "API key accepted again",
    "list_failed": lambda e: f"list request failed: {e.get('detail') or e.get('result')}",
    "list_recovered": lambda e: f"list request ok again after {e.get('failed_lists')} failed",
    "list_mode_unavailable": lambda e: "the key may not list runs; polling them one by one",
    "run_watched": lambda e: "now watched",
    "run_unwatched": lambda e: "no longer watched",
    "run_ids_file_loaded": lambda e: (
        f"{e.get('runs')} runs from {e.get('path')} ({e.get('reason')})"
    ),
    "run_ids_file_invalid": lambda e: f"{e.get('error')}; still watching the last good set",
    "watcher_started": lambda e: (
        f"watching {e.get('runs')} runs; endpoints on {e.get('listen')} "
        f"(loops-watcher {e.get('version')})"
    ),
    "watcher_stopped": lambda e: (
        f"stopped: {e['error']}"
        if e.get("error")
        else f"stopped after {_seconds(e.get('uptime_seconds', 0))}"
    ),
    "demo_started": lambda e: (
        f"demo: open the status page at {e.get('status_page')} "
        f"({e.get('runs')} simulated runs; metrics on {e.get('metrics_url')})"
    ),
}
_QUIET = {"timestamp", "level", "event", "run_id", "run_name", "exception"}
_LEVEL_COLORS = {"error": "\x1b[31m", "warning": "\x1b[33m", "debug": "\x1b[2m"}
_LEVEL_NAMES = {"warning": "WARN"}


class ConsoleLines:
    """One short line per event for a person scanning a terminal.

    `21:07:25 ERROR  llama31-8b-dpo (ujzde8g)  ACTIVE -> FAILED  after 51.8s`: local time,
    level, the run by name and ID when the event is about one, then what happened. A run's
    name is remembered from the events that carry it, so its failed polls name it too."""

    def __init__(self, colors: bool) -> None:
        self._colors = colors
        self._names: dict[str, str] = {}

    def _run(self, e: EventDict) -> str:
        run_id = e.get("run_id")
        if not run_id:
            return ""
        name = e.get("run_name") or self._names.get(run_id, "")
        if name:
            self._names[run_id] = name
        return f"{_short(name, 60)} ({run_id})  " if name else f"{run_id}  "

    def __call__(self, _logger: WrappedLogger, _name: str, e: EventDict) -> str:
        level = str(e.get("level", "info"))
        shown = _LEVEL_NAMES.get(level, level.upper()).ljust(5)
        if self._colors and level in _LEVEL_COLORS:
            shown = f"{_LEVEL_COLORS[level]}{shown}\x1b[0m"
        event = str(e.get("event", ""))
        describe = _MESSAGES.get(event)
        if describe is not None:
            message = describe(e)
        else:
            fields = " ".join(f"{k}={_short(v, 80)}" for k, v in e.items() if k not in _QUIET)
            message = f"{event}  {fields}".rstrip()
        line = f"{e.get('timestamp', '')} {shown}  {self._run(e)}{_short(message, 240)}"
        if e.get("exception"):
            line += "\n" + str(e["exception"]).rstrip()
        return line


def configure_logging(
    log_format: str, level: str, *, secret: str | None = None, stream: TextIO | None = None
) -> None:
    out = stream or sys.stdout
    renderer: Processor
    if log_format == "json":
        renderer = structlog.processors.JSONRenderer()
        stamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    else:
        renderer = ConsoleLines(colors=out.isatty())
        stamper = structlog.processors.TimeStamper(fmt="%H:%M:%S", utc=False)
    redactor = _Redactor(secret)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            _rename_level,
            stamper,
            structlog.processors.format_exc_info,
            redactor.values,
            renderer,
            redactor.line,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=True,
    )


def get_logger() -> structlog.typing.FilteringBoundLogger:
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger()
    return logger
