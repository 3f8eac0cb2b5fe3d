"""The Loops wire format as the watcher understands it: statuses, their classes, parsed runs.

Parsing is deliberately tolerant of schema drift: only the fields present in every published
version of the API are required, newer fields are used when present, unknown fields are
ignored and an undocumented status value is kept as it is.

Every string kept from a body is made safe to export once, here: a lone surrogate (which JSON
escapes can carry but UTF-8 cannot encode) becomes U+FFFD, and a value longer than
`MAX_TEXT` characters is cut there, so a 1 MB run name costs neither a label nor a log line
more than that. Values that many runs share (statuses, base models, owners, instance types)
are interned, so thousands of runs hold one copy of each rather than one per run; an
interned string that no run holds any more is freed, so an API that invents a new value for
every run costs no more than before.
"""

from __future__ import annotations

import codecs
import enum
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar, Generic, TypeAlias, TypeVar

T = TypeVar("T")


class Result(enum.StrEnum):
    """How one poll ended: the contract's closed set of `result` label values."""

    OK = "ok"
    NOT_FOUND = "not_found"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    RATE_LIMITED = "rate_limited"
    SERVER_ERROR = "server_error"
    TIMEOUT = "timeout"
    CONNECTION_ERROR = "connection_error"
    INVALID_RESPONSE = "invalid_response"


# The results the API client retries (a 429, a 5xx, no answer in time, no connection): their
# retry counters are exported at 0 from the start, so "no retries" is a 0 on a dashboard.
RETRIED_RESULTS = (
    Result.RATE_LIMITED,
    Result.SERVER_ERROR,
    Result.TIMEOUT,
    Result.CONNECTION_ERROR,
)


@dataclass(frozen=True, slots=True)
class Fetched(Generic[T]):
    """A poll (one or more attempts) that read its value."""

    result: ClassVar[Result] = Result.OK
    value: T
    attempts: int
    code: str
    requested: float = 0.0  # when its last attempt was sent: orders answers that cross


@dataclass(frozen=True, slots=True)
class Failed:
    """A poll (one or more attempts) that read nothing: why, as one of the failure results."""

    result: Result
    detail: str
    attempts: int
    code: str
    retry_after: float | None = None

    def __post_init__(self) -> None:
        if self.result is Result.OK:
            raise ValueError("a failed poll cannot have the result 'ok'")

    def failure_fields(self) -> dict[str, object]:
        """What a log line about this failure says of it, the same in every such line."""
        return {
            "result": str(self.result),
            "detail": self.detail,
            "http_status": self.code,
            "attempts": self.attempts,
        }


# What one poll came to: the value on success, and only then.
Outcome: TypeAlias = Fetched[T] | Failed


# The 14 documented sampler statuses, in the order Baseten's schema lists them.
SAMPLER_STATUSES: tuple[str, ...] = (
    "BUILDING",
    "DEPLOYING",
    "DEPLOY_FAILED",
    "LOADING_MODEL",
    "ACTIVE",
    "UNHEALTHY",
    "BUILD_FAILED",
    "BUILD_STOPPED",
    "DEACTIVATING",
    "INACTIVE",
    "FAILED",
    "UPDATING",
    "SCALED_TO_ZERO",
    "WAKING_UP",
)
RUN_STATUSES: tuple[str, ...] = ("ACTIVE", "INACTIVE")
# Where an undocumented status would add series without bound, it is counted under this name.
OTHER = "other"
MAX_TEXT = 256
_SURROGATES = re.compile("[\ud800-\udfff]")


class StatusClass(enum.Enum):
    """How a sampler status behaves, following Baseten's own SDK."""

    READY = "ready"
    IDLE = "idle"
    TRANSITIONAL = "transitional"
    FAILED = "failed"  # unrecoverable without a new deployment
    FAILING = "failing"  # may recover on its own
    SHUT_DOWN = "shut_down"
    UNKNOWN = "unknown"  # a value the API added after this release


_CLASSES: dict[str, StatusClass] = {
    "ACTIVE": StatusClass.READY,
    "SCALED_TO_ZERO": StatusClass.IDLE,
    "BUILDING": StatusClass.TRANSITIONAL,
    "DEPLOYING": StatusClass.TRANSITIONAL,
    "LOADING_MODEL": StatusClass.TRANSITIONAL,
    "UPDATING": StatusClass.TRANSITIONAL,
    "WAKING_UP": StatusClass.TRANSITIONAL,
    "DEACTIVATING": StatusClass.TRANSITIONAL,
    "DEPLOY_FAILED": StatusClass.FAILED,
    "BUILD_FAILED": StatusClass.FAILED,
    "BUILD_STOPPED": StatusClass.FAILED,
    "FAILED": StatusClass.FAILING,
    "UNHEALTHY": StatusClass.FAILING,
    "INACTIVE": StatusClass.SHUT_DOWN,
}


def status_class(status: str) -> StatusClass:
    return _CLASSES.get(status, StatusClass.UNKNOWN)


def is_documented(status: str) -> bool:
    return status in _CLASSES


def bounded_status(status: str) -> str:
    """A status as a label of series that outlive runs: documented, or `other`."""
    return status if status in _CLASSES else OTHER


def clean_text(text: str) -> str:
    """`text` with lone surrogates replaced and its length capped at MAX_TEXT characters."""
    if not text.isascii():
        text = _SURROGATES.sub("\ufffd", text)
    if len(text) > MAX_TEXT:
        text = text[: MAX_TEXT - 1] + "\u2026"
    return text


class InvalidRun(ValueError):
    """A response body that does not hold a usable run; `run_id` when the body names one."""

    def __init__(self, message: str, run_id: str | None = None) -> None:
        super().__init__(message)
        self.run_id = run_id


@dataclass(frozen=True, slots=True)
class Sampler:
    id: str
    status: str
    model_id: str
    deployment_id: str
    base_model: str
    instance_type: str | None = None
    node_count: int | None = None


@dataclass(frozen=True, slots=True)
class Run:
    id: str
    session_id: str
    base_model: str
    created_at: float  # Unix seconds
    sampler: Sampler | None
    name: str = ""
    status: str | None = None  # run-level ACTIVE/INACTIVE, only in newer API versions
    deployment_id: str | None = None
    user_email: str | None = None


def _field(obj: dict[str, Any], key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise InvalidRun(f"{where}.{key} is {'missing' if value is None else 'not a string'}")
    return clean_text(value)


def _nullable(obj: dict[str, Any], key: str, where: str) -> str:
    """A value that is null, or left out, for a serverless sampler's IDs (Baseten's SDK
    defaults both to None); empty then, as an unknown label is."""
    return "" if obj.get(key) is None else _field(obj, key, where)


def _optional_str(obj: dict[str, Any], key: str) -> str | None:
    value = obj.get(key)
    return clean_text(value) if isinstance(value, str) else None


def _optional_shared(obj: Any, key: str) -> str | None:
    """`obj[key]` when `obj` is an object and that is a string, interned; else None."""
    value = obj.get(key) if isinstance(obj, dict) else None
    return sys.intern(clean_text(value)) if isinstance(value, str) else None


def _status_name(obj: dict[str, Any], where: str) -> str:
    status = obj.get("status")
    if not isinstance(status, dict):
        raise InvalidRun(f"{where}.status is missing")
    # An empty name is a value like any other the schema does not list: kept, not refused.
    return sys.intern(_field(status, "name", f"{where}.status"))


def _timestamp(obj: dict[str, Any], key: str, where: str) -> float:
    text = _field(obj, key, where)
    try:
        # RFC 3339 allows a lowercase `t` and `z`, which fromisoformat does not.
        moment = datetime.fromisoformat(text.upper())
    except ValueError as exc:
        raise InvalidRun(f"{where}.{key} is not an RFC 3339 time: {text[:40]!r}") from exc
    if moment.tzinfo is None:
        raise InvalidRun(f"{where}.{key} has no time zone: {text[:40]!r}")
    return moment.timestamp()


def parse_sampler(obj: Any) -> Sampler:
    if not isinstance(obj, dict):
        raise InvalidRun("run.sampler is not an object")
    node_count = obj.get("node_count")
    return Sampler(
        id=_field(obj, "id", "sampler"),
        status=_status_name(obj, "sampler"),
        model_id=_nullable(obj, "model_id", "sampler"),
        deployment_id=_nullable(obj, "deployment_id", "sampler"),
        base_model=sys.intern(_field(obj, "base_model", "sampler")),
        instance_type=_optional_shared(obj.get("instance_type"), "name"),
        node_count=node_count if isinstance(node_count, int) else None,
    )


def parse_run(obj: Any) -> Run:
    """Build a Run from one `LoopsRunV1` object; raise InvalidRun when a relied-on field is bad."""
    if not isinstance(obj, dict):
        raise InvalidRun("run is not an object")
    raw_sampler = obj.get("sampler")
    _field(obj, "base_url", "run")  # relied on by the contract; its absence means a broken body
    return Run(
        id=_field(obj, "id", "run"),
        session_id=_field(obj, "session_id", "run"),
        base_model=sys.intern(_field(obj, "base_model", "run")),
        created_at=_timestamp(obj, "created_at", "run"),
        sampler=None if raw_sampler is None else parse_sampler(raw_sampler),
        name=_optional_str(obj, "name") or "",
        status=_optional_shared(obj.get("status"), "name"),
        deployment_id=_optional_str(obj, "deployment_id"),
        user_email=_optional_shared(obj.get("user"), "email"),
    )


def parse_run_response(body: Any) -> Run:
    """`GET /v1/loops/runs/{id}` -> `{"run": LoopsRunV1}`."""
    if not isinstance(body, dict) or "run" not in body:
        raise InvalidRun("body has no 'run' object")
    return parse_run(body["run"])


@dataclass(frozen=True, slots=True)
class RunList:
    """A list response: its usable runs (those the decoder was told to keep), and the entries
    that were not usable (naming their run when they have an ID), each of which fails only its
    own run."""

    runs: list[Run]
    invalid: list[InvalidRun]


def parse_list_entry(obj: Any) -> Run:
    try:
        return parse_run(obj)
    except Exception as exc:
        run_id = obj.get("id") if isinstance(obj, dict) else None
        raise InvalidRun(
            f"list entry: {exc}", clean_text(run_id) if isinstance(run_id, str) else None
        ) from None


_WHITESPACE = re.compile(r"[ \t\n\r]*")


class ListDecoder:
    """`GET /v1/loops/runs` -> `{"runs": [LoopsRunV1, ...]}`, decoded as the body arrives.

    Each entry becomes a `Run` as soon as its text is complete and the text is dropped, so the
    peak is the kept runs plus one entry, not the body and its whole object tree (tens of MB
    of text for a large org make several hundred MB of dicts). `keep` decides what is kept of
    each good entry while the rest arrives: the run itself, an equal run the caller already
    holds (then an unchanged run costs one reference, not a second copy of its strings), or
    None to drop a run the caller would ignore. The object's own structure is
    walked here and every value is decoded by the stdlib decoder: ijson would stream too, but
    its C backend refuses a whole body for one lone surrogate escape, and a deeply nested body
    makes it build ever longer prefixes until memory runs out.
    """

    def __init__(self, keep: Callable[[Run], Run | None] = lambda run: run) -> None:
        self._keep = keep
        self._utf8 = codecs.getincrementaldecoder("utf-8-sig")(errors="replace")
        self._json = json.JSONDecoder()
        self._text = ""
        self._pos = 0
        # An incomplete value is retried once the unread text has doubled: linear, not square.
        self._retry_at = 0
        self._state = "open"
        self._key = ""
        self._saw_runs = False
        self._runs: list[Run] = []
        self._invalid: list[InvalidRun] = []

    def feed(self, data: bytes) -> None:
        self._text = self._text[self._pos :] + self._utf8.decode(data)
        self._pos = 0
        if len(self._text) >= self._retry_at:
            self._advance(final=False)

    def finish(self) -> RunList:
        """The result once the whole body was fed; raises InvalidRun for a broken body."""
        self._text = self._text[self._pos :] + self._utf8.decode(b"", final=True)
        self._pos = 0
        self._advance(final=True)
        if self._state != "done" or self._text[self._pos :].strip(" \t\n\r"):
            raise InvalidRun(f"body is not one JSON object (stopped at {self._state})")
        if not self._saw_runs:
            raise InvalidRun("body has no 'runs' list")
        return RunList(self._runs, self._invalid)

    def _advance(self, *, final: bool) -> None:
        text = self._text
        while self._state != "done":
            self._pos = _WHITESPACE.match(text, self._pos).end()  # type: ignore[union-attr]
            if self._pos == len(text):
                return
            char = text[self._pos]
            state = self._state
            if state in ("open", "comma_or_close") or (state == "key" and char != '"'):
                expected = {"open": "{", "comma_or_close": ",}", "key": "}"}[state]
                if char not in expected:
                    raise InvalidRun(f"body is not a JSON object with a 'runs' list at {char!r}")
                self._pos += 1
                self._state = "done" if char == "}" else "key"
            elif state == "colon":
                if char != ":":
                    raise InvalidRun(f"expected ':' after key {self._key[:40]!r}")
                self._pos += 1
                self._state = "value"
            elif state == "value" and self._key == "runs":
                if char != "[" or self._saw_runs:
                    raise InvalidRun("body's 'runs' is not one list")
                self._saw_runs = True
                self._pos += 1
                self._state = "first_entry"
            elif state in ("first_entry", "entry_end") and char == "]":
                self._pos += 1
                self._state = "comma_or_close"
            elif state == "entry_end":
                if char != ",":
                    raise InvalidRun(f"expected ',' or ']' between list entries at {char!r}")
                self._pos += 1
                self._state = "entry"
            elif not self._decode_value(final=final):  # a key, a value to skip, or an entry
                return

    def _decode_value(self, *, final: bool) -> bool:
        """Decode the value at the cursor; False if its text has not fully arrived yet."""
        try:
            value, end = self._json.raw_decode(self._text, self._pos)
        except json.JSONDecodeError:
            if final:
                raise
            self._retry_at = 2 * (len(self._text) - self._pos)
            self._text = self._text[self._pos :]
            self._pos = 0
            return False
        if end == len(self._text) and type(value) in (int, float) and not final:
            return False  # a number cut by the end of a chunk looks complete: wait for more
        self._pos = end
        self._retry_at = 0
        if self._state == "key":
            self._key = value
            self._state = "colon"
        elif self._state == "value":
            self._state = "comma_or_close"
        else:
            try:
                run = self._keep(parse_list_entry(value))
            except InvalidRun as exc:
                self._invalid.append(exc)
            else:
                if run is not None:
                    self._runs.append(run)
            self._state = "entry_end"
        return True
