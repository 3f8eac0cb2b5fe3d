"""A stand-in for the Baseten Loops API: a small, fast HTTP/1.1 server for loopback use.

It owns the HTTP side of simulation: rendering scenario runs (see `watcher.scenarios`) in the
`LoopsRunV1` wire format, a hand-written keep-alive HTTP/1.1 parser on bare asyncio (fast enough
to be a benchmark's backend on one core), API-key checks, fault injection, and a control
interface so tests in another process can steer it. `loops-watcher --demo` runs it in-process;
`python -m watcher.simulator --listen 127.0.0.1:8080 [--scenario demo|PATH] [--runs N]` runs it
alone, accepting the key in `LOOPS_SIMULATOR_API_KEY` (default "sim-key-not-secret").

API, as Baseten serves it (`Authorization: Bearer <key>` or `Api-Key <key>`, else 401):
    GET /v1/loops/runs/{run_id}                    {"run": LoopsRunV1}, 404 for an unknown run
    GET /v1/loops/runs?scope=org&run_id=&base_model=    {"runs": [...]}; without scope=org only
                                                   the scenario's caller's own runs
Control interface (no key; answers loopback clients only; bad input gets 400 and a JSON error):
    GET    /_sim/state           runs with their current statuses, armed faults
    PUT    /_sim/runs/{run_id}   JSON fields as for `Simulator.set_run`; creates a new run
    DELETE /_sim/runs/{run_id}
    POST   /_sim/faults          a JSON `Fault`
    DELETE /_sim/faults
    GET    /_sim/requests        API requests served, per path
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import os
import random
import signal
import socket
import string
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from datetime import UTC, datetime
from http import HTTPStatus
from types import TracebackType
from typing import Annotated, Any, Literal, cast
from urllib.parse import parse_qs, unquote

import pydantic
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from watcher.scenarios import (
    INSTANCE_TYPES,
    NonEmptyStr,
    RunId,
    RunSpec,
    Scenario,
    load_scenario,
    synthetic_scenario,
)

__all__ = [
    "FAULT_KINDS",
    "Fault",
    "Scenario",
    "Simulator",
    "SimulatorThread",
    "load_scenario",
    "main",
    "synthetic_scenario",
]

DEFAULT_API_KEY = "sim-key-not-secret"

# Where each fault acts: in place of the reply, inside the run bodies, or in how it is sent.
_REPLACING_FAULTS = ("status", "non_json", "redirect")
_BODY_FAULTS = ("missing_fields", "unknown_status")
# 200 with the runs replaced by `depth` nested arrays: more than any JSON parser recurses into.
_NESTING_FAULT = "deep_nesting"
_DELIVERY_FAULTS = ("delay", "trickle", "truncate", "reset", "oversized")
FAULT_KINDS: tuple[str, ...] = (
    _REPLACING_FAULTS + _BODY_FAULTS + (_NESTING_FAULT,) + _DELIVERY_FAULTS
)

_RUNS = "/v1/loops/runs"
_CONTROL = "/_sim/"
_PAGE = b"<html><head><title>502 Bad Gateway</title></head><body>Bad Gateway</body></html>\n"
_STATUS_LINES = {
    status.value: f"HTTP/1.1 {status.value} {status.phrase}\r\n" for status in HTTPStatus
}

# A header value a client put on the control interface must not be able to split the response.
_HeaderValue = Annotated[str, Field(min_length=1, pattern=r"^[\x20-\x7e]+$")]


@pydantic.dataclasses.dataclass(frozen=True, config=ConfigDict(extra="forbid", strict=True))
class Fault:
    """A misbehaviour to inject into API responses.

    `run_id` None hits every API request (each run and the list) or, with `endpoint` "run" or
    "list", only one kind; a `run_id` narrows it to `GET /v1/loops/runs/{run_id}`, except that a
    body fault (`missing_fields`, `unknown_status`) with a `run_id` also damages that run's
    entry in every list response while it lasts (only the run's own requests count against
    `count`). `count` None lasts until cleared, otherwise the fault is dropped after hitting
    that many requests. When several match, the oldest acts. Kinds and the parameters they read:

    status          answer `status` with {"error": ...} and, if set, a `Retry-After: retry_after`
    delay           wait `delay` seconds, then answer normally
    trickle         send the normal body one byte every `trickle_interval` seconds
    truncate        announce the whole body's Content-Length, send half of it, close
    non_json        200 with an HTML page
    missing_fields  200 with runs lacking `session_id` and `sampler.status`
    unknown_status  200 with each sampler's status name set to `value`
    deep_nesting    200 whose run (or list entry) is `depth` nested arrays
    reset           close the connection with a TCP reset, no response
    oversized       200 with valid JSON of `size` bytes (padded), streamed; with
                    `declare_length` false, without Content-Length: the body ends at close
    redirect        302 to `location`
    """

    kind: str
    run_id: RunId | None = None
    endpoint: Literal["any", "run", "list"] = "any"
    count: Annotated[int, Field(ge=1)] | None = None
    status: Annotated[int, Field(ge=200, le=599)] = 503
    retry_after: _HeaderValue | None = None
    delay: Annotated[float, Field(ge=0)] = 1.0
    trickle_interval: Annotated[float, Field(gt=0)] = 0.1
    size: Annotated[int, Field(ge=0)] = 10 * 1024 * 1024
    declare_length: bool = True
    value: NonEmptyStr = "HIBERNATING"
    depth: Annotated[int, Field(ge=1, le=10_000_000)] = 200_000
    location: _HeaderValue = "/login"

    @model_validator(mode="after")
    def _known_kind(self) -> Fault:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"kind {self.kind!r} is not one of {', '.join(FAULT_KINDS)}")
        if self.run_id is not None and self.endpoint == "list" and self.kind not in _BODY_FAULTS:
            raise ValueError("a fault for one run_id cannot act on the list endpoint")
        return self

    def hits(self, run_id: str | None) -> bool:
        """Whether this fault acts on a request for `run_id` (None: the list)."""
        if run_id is None:
            return self.run_id is None and self.endpoint != "run"
        return self.run_id in (None, run_id) and self.endpoint != "list"


_FAULT_JSON = TypeAdapter(Fault)


class _RunUpdate(BaseModel):
    """The fields `set_run` accepts; only those the caller gave are applied."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    status: NonEmptyStr = ""  # sampler status; stops the run's timeline
    run_status: NonEmptyStr = ""  # run-level ACTIVE/INACTIVE; stops the timeline too
    sampler: None = None  # only null: the run becomes trainer-only
    serverless: bool = False  # the sampler's model_id and deployment_id are null
    name: str = ""
    base_model: NonEmptyStr = ""
    owner: NonEmptyStr = ""


@dataclasses.dataclass(frozen=True, slots=True)
class _Identity:
    """The IDs and times a real run would have been given, derived from its run ID."""

    session_id: str
    deployment_id: str
    sampler_id: str
    model_id: str
    sampler_deployment_id: str
    created_at: str
    sampler_created_at: str

    @classmethod
    def derive(cls, run_id: str, now: float) -> _Identity:
        # Seeded by the run ID so that restarts and separate processes agree on every ID.
        rng = random.Random(f"loops-simulator:{run_id}")

        def hashid() -> str:
            return "".join(rng.choices(string.ascii_lowercase + string.digits, k=7))

        created = now - rng.uniform(3600, 72 * 3600)
        return cls(
            session_id=hashid(),
            deployment_id=hashid(),
            sampler_id=hashid(),
            model_id=hashid(),
            sampler_deployment_id=hashid(),
            created_at=_iso(created),
            sampler_created_at=_iso(created + rng.uniform(60, 600)),
        )


def _iso(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class _Run:
    """One simulated run: its declared spec plus whatever the control interface changed."""

    def __init__(self, spec: RunSpec, identity: _Identity) -> None:
        self.spec = spec
        self.identity = identity
        self.has_sampler = spec.timeline is not None
        self.serverless = False
        self.pinned: tuple[str, str] | None = None  # (status, run_status) once steered
        # Encoded bodies per (sampler status, run status): polls mostly repeat one of a few.
        self._encoded: dict[tuple[str | None, str], bytes] = {}

    def statuses(self, elapsed: float) -> tuple[str | None, str]:
        """(sampler status, or None when there is no sampler; run status)."""
        if self.pinned is not None:
            status, run_status = self.pinned
        else:
            step = self.spec.at(elapsed)
            if step is None:
                return None, "ACTIVE"
            status, run_status = step.status, step.run_status
        return (status if self.has_sampler else None), run_status

    def update(self, update: _RunUpdate, elapsed: float) -> None:
        given = update.model_fields_set
        if "status" in given and "sampler" in given:
            raise ValueError("give either a sampler status or sampler null, not both")
        renamed = {key: getattr(update, key) for key in ("name", "base_model", "owner")}
        self.spec = dataclasses.replace(
            self.spec, **{key: value for key, value in renamed.items() if key in given}
        )
        if "status" in given or "run_status" in given:
            status, run_status = self.statuses(elapsed)
            self.pinned = (
                update.status if "status" in given else status or "ACTIVE",
                update.run_status if "run_status" in given else run_status,
            )
        if "status" in given:
            self.has_sampler = True
        if "sampler" in given:
            self.has_sampler = False
        if "serverless" in given:
            self.serverless = update.serverless
        self._encoded.clear()

    def as_json(self, status: str | None, run_status: str) -> dict[str, Any]:
        spec, ids = self.spec, self.identity
        sampler = None
        if status is not None:
            sampler = {
                "id": ids.sampler_id,
                "base_url": f"https://model-{ids.model_id}.api.baseten.co"
                f"/deployment/{ids.sampler_deployment_id}/sync",
                "base_model": spec.base_model,
                "created_at": ids.sampler_created_at,
                "model_id": None if self.serverless else ids.model_id,
                "deployment_id": None if self.serverless else ids.sampler_deployment_id,
                "status": {"name": status},
                "user": {"email": spec.owner},
                "instance_type": INSTANCE_TYPES[spec.instance_type],
                "node_count": spec.node_count,
            }
        return {
            "id": spec.id,
            "session_id": ids.session_id,
            "deployment_id": ids.deployment_id,
            "name": spec.name,
            "base_model": spec.base_model,
            "base_url": f"https://loops.api.baseten.co/v1/loops/runs/{spec.id}",
            "created_at": ids.created_at,
            "status": {"name": run_status},
            "user": {"email": spec.owner},
            "sampler": sampler,
        }

    def encoded(self, elapsed: float) -> bytes:
        key = self.statuses(elapsed)
        body = self._encoded.get(key)
        if body is None:
            body = self._encoded[key] = _json(self.as_json(*key))
        return body

    def summary(self, elapsed: float) -> dict[str, Any]:
        status, run_status = self.statuses(elapsed)
        return {
            "id": self.spec.id,
            "name": self.spec.name,
            "owner": self.spec.owner,
            "base_model": self.spec.base_model,
            "status": status,
            "run_status": run_status,
            "pinned": self.pinned is not None,
        }


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


@dataclasses.dataclass(slots=True)
class _ArmedFault:
    fault: Fault
    remaining: int | None


@dataclasses.dataclass(frozen=True, slots=True)
class _Request:
    method: str
    path: str
    query: str
    headers: dict[str, str]  # names lower-cased
    body: bytes
    keep_alive: bool


@dataclasses.dataclass(frozen=True, slots=True)
class _Reply:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    delivery: Fault | None = None  # a fault in how the reply is sent

    def head(self, length: int | None, close: bool) -> bytes:
        lines = [
            _STATUS_LINES.get(self.status) or f"HTTP/1.1 {self.status} Unknown\r\n",
            f"Content-Type: {self.content_type}\r\n",
        ]
        if length is not None:
            lines.append(f"Content-Length: {length}\r\n")
        lines.extend(f"{name}: {value}\r\n" for name, value in self.headers)
        if close:
            lines.append("Connection: close\r\n")
        lines.append("\r\n")
        return "".join(lines).encode("latin-1")


def _error(
    status: int,
    message: str,
    headers: tuple[tuple[str, str], ...] = (),
    delivery: Fault | None = None,
) -> _Reply:
    return _Reply(status, _json({"error": message}), headers=headers, delivery=delivery)


def _not_allowed(*methods: str) -> _Reply:
    return _error(405, "method not allowed", (("Allow", ", ".join(methods)),))


def _invalid(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(part) for part in error['loc']) or 'body'}: {error['msg']}"
        for error in exc.errors(include_url=False)
    )


def _segment_after(prefix: str, path: str) -> str | None:
    """The single, percent-decoded path segment after `prefix`; None for any other shape."""
    if not path.startswith(prefix):
        return None
    segment = unquote(path[len(prefix) :])
    return segment if segment and "/" not in segment else None


def _replacement(fault: Fault) -> _Reply:
    """What a fault answers instead of the real reply."""
    if fault.kind == "redirect":
        return _Reply(302, b"", "text/plain", (("Location", fault.location),))
    if fault.kind == "non_json":
        return _Reply(200, _PAGE, "text/html; charset=utf-8")
    headers = () if fault.retry_after is None else (("Retry-After", fault.retry_after),)
    if fault.status in (204, 304):  # statuses that never carry a body
        return _Reply(fault.status, b"", headers=headers)
    phrase = HTTPStatus(fault.status).phrase if fault.status in _STATUS_LINES else "error"
    return _error(fault.status, phrase, headers)


def _mangled(run: dict[str, Any], fault: Fault) -> dict[str, Any]:
    """A run body damaged the way a `missing_fields` or `unknown_status` fault says."""
    sampler = run["sampler"]
    if fault.kind == "missing_fields":
        del run["session_id"]
        if sampler is not None:
            del sampler["status"]
    elif sampler is not None:
        sampler["status"] = {"name": fault.value}
    return run


class Simulator:
    """The simulated API: scenario runs, faults, request counts, and the server serving them.

    Control methods may be called from any thread.
    """

    def __init__(
        self,
        scenario: Scenario,
        api_keys: Collection[str],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._caller = scenario.caller
        self._api_keys = frozenset(api_keys)
        self._clock = clock
        self._epoch = clock()
        self._wall_start = time.time()
        self._runs = {spec.id: self._new_run(spec) for spec in scenario.runs}
        self._faults: list[_ArmedFault] = []
        self._requests: Counter[str] = Counter()
        # Guards the three above: control calls come from other threads and connections.
        self._lock = threading.Lock()
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()

    def _new_run(self, spec: RunSpec) -> _Run:
        return _Run(spec, _Identity.derive(spec.id, self._wall_start))

    def _elapsed(self) -> float:
        return self._clock() - self._epoch

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self._reply, self._connections), host, port
        )

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the simulator has not been started")
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for connection in list(self._connections):
            connection.close()
        await self._server.wait_closed()

    @property
    def run_ids(self) -> list[str]:
        with self._lock:
            return list(self._runs)

    def set_status(self, run_id: str, status: str) -> None:
        """Put the run's sampler in `status` and stop its timeline there."""
        self.set_run(run_id, status=status)

    def set_run(self, run_id: str, **fields: object) -> None:
        """Create or change a run. Fields: status (sampler), run_status, sampler (None only),
        name, base_model, owner; a status or run_status stops the run's timeline.

        Raises pydantic's ValidationError (a ValueError) for unknown fields or bad values.
        """
        update = _RunUpdate.model_validate(fields)
        with self._lock:
            run = self._runs.get(run_id)
            if run is None:
                spec = RunSpec(
                    id=run_id,
                    name=run_id,
                    base_model="Qwen/Qwen3-8B",
                    owner=self._caller,
                    timeline=None,
                )
                run = self._new_run(spec)
                run.has_sampler = True
                run.pinned = ("ACTIVE", "ACTIVE")
            run.update(update, self._elapsed())
            self._runs[run_id] = run

    def remove_run(self, run_id: str) -> None:
        """Forget a run: the API answers 404 for it from now on. KeyError if unknown."""
        with self._lock:
            del self._runs[run_id]

    def add_fault(self, fault: Fault) -> None:
        with self._lock:
            self._faults.append(_ArmedFault(fault, fault.count))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def request_counts(self) -> dict[str, int]:
        """API requests received per path (query strings dropped), control requests excluded."""
        with self._lock:
            return dict(self._requests)

    def state(self) -> dict[str, Any]:
        """What `GET /_sim/state` answers."""
        with self._lock:
            elapsed = self._elapsed()
            return {
                "elapsed_seconds": elapsed,
                "caller": self._caller,
                "runs": [run.summary(elapsed) for run in self._runs.values()],
                "faults": [
                    {**dataclasses.asdict(armed.fault), "remaining": armed.remaining}
                    for armed in self._faults
                ],
            }

    def _reply(self, request: _Request, loopback: bool) -> _Reply:
        path = request.path
        if path.startswith(_CONTROL):
            return self._control(request, loopback)
        with self._lock:
            self._requests[path] += 1
        run_id = None if path == _RUNS else _segment_after(_RUNS + "/", path)
        if path != _RUNS and run_id is None:
            return _error(404, "not found")
        if request.method != "GET":
            return _not_allowed("GET")
        denial = self._check_key(request.headers.get("authorization"))
        if denial is not None:
            return _error(401, denial, (("WWW-Authenticate", "Bearer"),))
        query = {key: values[-1] for key, values in parse_qs(request.query).items()}
        if query.get("scope") not in (None, "org"):
            return _error(400, "scope must be 'org' when given")
        with self._lock:
            fault = self._take_fault(run_id)
            if fault is not None and fault.kind in _REPLACING_FAULTS:
                return _replacement(fault)
            delivery = fault if fault is not None and fault.kind in _DELIVERY_FAULTS else None
            elapsed = self._elapsed()
            if run_id is None:
                runs = self._listed(query)
            elif run_id in self._runs:
                runs = [self._runs[run_id]]
            else:
                return _error(404, "run not found", delivery=delivery)
            if fault is not None and fault.kind == _NESTING_FAULT:
                parts = [b"[" * fault.depth + b"]" * fault.depth]
            else:
                parts = [self._entry(run, fault, elapsed, listing=run_id is None) for run in runs]
        if run_id is None:
            body = b'{"runs":[' + b",".join(parts) + b"]}"
        else:
            body = b'{"run":' + parts[0] + b"}"
        return _Reply(200, body, delivery=delivery)

    def _entry(self, run: _Run, fault: Fault | None, elapsed: float, *, listing: bool) -> bytes:
        """One run as its body or list entry shows it, damaged by a body fault if one acts."""
        if listing and (fault is None or fault.kind not in _BODY_FAULTS):
            fault = next(
                (
                    armed.fault
                    for armed in self._faults
                    if armed.fault.kind in _BODY_FAULTS
                    and armed.fault.run_id == run.spec.id
                    and armed.fault.endpoint != "run"
                ),
                None,
            )
        if fault is None or fault.kind not in _BODY_FAULTS:
            return run.encoded(elapsed)
        return _json(_mangled(run.as_json(*run.statuses(elapsed)), fault))

    def _check_key(self, header: str | None) -> str | None:
        """Why the Authorization header is refused, or None; never quotes the key."""
        if header is None:
            return "missing Authorization header"
        scheme, _, key = header.partition(" ")
        if scheme.lower() not in ("bearer", "api-key"):
            return "unsupported authorization scheme: use Bearer or Api-Key"
        if key.strip() not in self._api_keys:
            return "invalid API key"
        return None

    def _listed(self, query: dict[str, str]) -> list[_Run]:
        every_owner = query.get("scope") == "org"
        wanted_id, wanted_model = query.get("run_id"), query.get("base_model")
        return [
            run
            for run in self._runs.values()
            if (every_owner or run.spec.owner == self._caller)
            and wanted_id in (None, run.spec.id)
            and wanted_model in (None, run.spec.base_model)
        ]

    def _take_fault(self, run_id: str | None) -> Fault | None:
        for armed in self._faults:
            if armed.fault.hits(run_id):
                if armed.remaining is not None:
                    armed.remaining -= 1
                    if armed.remaining == 0:
                        self._faults.remove(armed)
                return armed.fault
        return None

    def _control(self, request: _Request, loopback: bool) -> _Reply:
        if not loopback:
            return _error(403, "the control interface only answers loopback clients")
        path, method = request.path, request.method
        if path in ("/_sim/state", "/_sim/requests"):
            if method != "GET":
                return _not_allowed("GET")
            if path == "/_sim/state":
                return _Reply(200, _json(self.state()))
            return _Reply(200, _json({"requests": self.request_counts()}))
        if path == "/_sim/faults":
            if method == "DELETE":
                self.clear_faults()
                return _Reply(200, _json({"faults": []}))
            if method != "POST":
                return _not_allowed("POST", "DELETE")
            try:
                fault = _FAULT_JSON.validate_json(request.body)
            except ValidationError as exc:
                return _error(400, f"invalid fault: {_invalid(exc)}")
            self.add_fault(fault)
            return _Reply(201, _json({"fault": dataclasses.asdict(fault)}))
        run_id = _segment_after("/_sim/runs/", path)
        if run_id is None:
            return _error(404, "not found")
        if method == "DELETE":
            try:
                self.remove_run(run_id)
            except KeyError:
                return _error(404, "run not found")
            return _Reply(200, _json({"removed": run_id}))
        if method != "PUT":
            return _not_allowed("PUT", "DELETE")
        try:
            fields = json.loads(request.body)
        except ValueError as exc:
            return _error(400, f"body is not JSON: {exc}")
        if not isinstance(fields, dict):
            return _error(400, "body must be a JSON object of run fields")
        try:
            self.set_run(run_id, **fields)
        except ValidationError as exc:
            return _error(400, f"invalid run fields: {_invalid(exc)}")
        except ValueError as exc:
            return _error(400, str(exc))
        with self._lock:
            return _Reply(200, _json({"run": self._runs[run_id].summary(self._elapsed())}))


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


_MAX_HEAD = 16 * 1024
_MAX_BODY = 1024 * 1024
_CHUNK = b"x" * 65536


def _request_line(line: str) -> tuple[str, str, str]:
    parts = line.split(" ")
    if len(parts) != 3:
        raise _BadRequest(400, "malformed request line")
    method, target, version = parts
    if not (method.isascii() and method.isalpha() and method.isupper()):
        raise _BadRequest(400, "malformed method")
    if not target.startswith("/"):
        raise _BadRequest(400, "request target must be a path")
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise _BadRequest(400, "only HTTP/1.0 and HTTP/1.1 are spoken here")
    return method, target, version


def _is_loopback(peer: Any) -> bool:
    try:
        address = ipaddress.ip_address(peer[0])
    except (TypeError, ValueError, IndexError):
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


class _Connection(asyncio.Protocol):
    """One client connection: parses requests in order and writes replies, faults included.

    Most replies are written straight from `data_received`; a slow one (delay, trickle,
    oversized) runs as a task, and requests pipelined behind it wait in the buffer.
    """

    def __init__(
        self, reply: Callable[[_Request, bool], _Reply], connections: set[_Connection]
    ) -> None:
        self._reply = reply  # answers a request, given whether the peer is on loopback
        self._connections = connections  # every open one, so the server can close them
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._loopback = False
        self._slow: asyncio.Task[None] | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        self._closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._loopback = _is_loopback(transport.get_extra_info("peername"))
        self._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._connections.discard(self)
        if self._slow is not None:
            self._slow.cancel()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def close(self) -> None:
        if self._slow is not None:
            self._slow.cancel()
        if self._transport is not None:
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._slow is None:
            self._serve_buffered()
        elif len(self._buffer) > _MAX_HEAD + _MAX_BODY and self._transport is not None:
            self._transport.pause_reading()

    def _serve_buffered(self) -> None:
        while self._slow is None and not self._closed:
            try:
                request = self._next_request()
            except _BadRequest as exc:
                self._send(_error(exc.status, exc.message), close=True)
                return
            if request is None:
                return
            self._deliver(self._reply(request, self._loopback), close=not request.keep_alive)

    def _next_request(self) -> _Request | None:
        buffer = self._buffer
        end = buffer.find(b"\r\n\r\n", 0, _MAX_HEAD + 4)
        if end < 0:
            if len(buffer) > _MAX_HEAD:
                raise _BadRequest(400, "request head too large")
            # Refuse a garbage request line now rather than when the head is complete.
            line_end = buffer.find(b"\r\n")
            if line_end >= 0:
                _request_line(buffer[:line_end].decode("latin-1"))
            return None
        lines = buffer[:end].decode("latin-1").split("\r\n")
        method, target, version = _request_line(lines[0])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if not colon or not name or name != name.strip() or " " in name:
                raise _BadRequest(400, "malformed header line")
            headers[name.lower()] = value.strip()
        if "transfer-encoding" in headers:
            raise _BadRequest(400, "chunked request bodies are not supported")
        length_text = headers.get("content-length", "0")
        if not (length_text.isascii() and length_text.isdigit()):
            raise _BadRequest(400, "malformed Content-Length")
        length = int(length_text)
        if length > _MAX_BODY:
            raise _BadRequest(413, "request body too large")
        start = end + 4
        if len(buffer) < start + length:
            return None
        body = bytes(buffer[start : start + length])
        del buffer[: start + length]
        connection = headers.get("connection", "").lower()
        keep_alive = connection == "keep-alive" or (version == "HTTP/1.1" and connection != "close")
        path, _, query = target.partition("?")
        return _Request(method, path, query, headers, body, keep_alive)

    def _send(self, reply: _Reply, close: bool) -> None:
        assert self._transport is not None
        self._transport.write(reply.head(len(reply.body), close) + reply.body)
        if close:
            self._transport.close()
            self._closed = True

    def _deliver(self, reply: _Reply, close: bool) -> None:
        assert self._transport is not None
        fault = reply.delivery
        if fault is None:
            self._send(reply, close)
        elif fault.kind == "reset":
            sock = self._transport.get_extra_info("socket")
            # Linger 0 makes close() send a RST instead of an orderly FIN.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self._transport.abort()
            self._closed = True
        elif fault.kind == "truncate":
            self._transport.write(reply.head(len(reply.body), close=True))
            self._transport.write(reply.body[: len(reply.body) // 2])
            self._transport.close()
            self._closed = True
        else:
            self._slow = asyncio.get_running_loop().create_task(
                self._deliver_slowly(reply, fault, close)
            )

    async def _deliver_slowly(self, reply: _Reply, fault: Fault, close: bool) -> None:
        assert self._transport is not None
        if fault.kind == "delay":
            await asyncio.sleep(fault.delay)
            self._transport.write(reply.head(len(reply.body), close) + reply.body)
        elif fault.kind == "trickle":
            self._transport.write(reply.head(len(reply.body), close))
            for index in range(len(reply.body)):
                await asyncio.sleep(fault.trickle_interval)
                self._transport.write(reply.body[index : index + 1])
        else:  # oversized: pad the JSON object with one huge string, never held in memory whole
            prefix, suffix = reply.body[:-1] + b',"padding":"', b'"}'
            padding = max(0, fault.size - len(prefix) - len(suffix))
            length = len(prefix) + padding + len(suffix) if fault.declare_length else None
            close = close or length is None  # an undeclared length ends where the connection does
            self._transport.write(reply.head(length, close) + prefix)
            while padding:
                await self._writable.wait()
                # Yield even while the socket keeps up, so other connections get served.
                await asyncio.sleep(0)
                piece = _CHUNK if padding >= len(_CHUNK) else _CHUNK[:padding]
                self._transport.write(piece)
                padding -= len(piece)
            self._transport.write(suffix)
        if close:
            self._transport.close()
            self._closed = True
            return
        self._slow = None
        self._transport.resume_reading()
        self._serve_buffered()


class SimulatorThread:
    """A Simulator on its own event loop in a daemon thread, for synchronous tests and tools.

    Use as a context manager; `.sim`'s control methods are safe to call from the caller's thread.
    """

    def __init__(
        self,
        scenario: Scenario,
        api_keys: Collection[str],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sim = Simulator(scenario, api_keys, clock=clock)
        self._started = threading.Event()
        self._failure: BaseException | None = None
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name="loops-simulator", daemon=True)

    @property
    def url(self) -> str:
        return self.sim.url

    def __enter__(self) -> SimulatorThread:
        self._thread.start()
        self._started.wait()
        if self._failure is not None:
            raise RuntimeError("the simulator did not start") from self._failure
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            await self.sim.start()
        except OSError as exc:  # the address is taken or cannot be bound
            self._failure = exc
            return
        finally:
            self._started.set()
        try:
            await self._stop.wait()
        finally:
            await self.sim.close()


def _listen_address(text: str) -> tuple[str, int]:
    host, colon, port = text.rpartition(":")
    if not colon or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


async def _serve_until_signalled(scenario: Scenario, api_key: str, host: str, port: int) -> None:
    sim = Simulator(scenario, [api_key])
    await sim.start(host, port)
    print(f"loops simulator listening on {sim.url} with {len(sim.run_ids)} runs", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await sim.close()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m watcher.simulator",
        description="Serve a simulated Baseten Loops API. The API key it accepts is read from "
        f"LOOPS_SIMULATOR_API_KEY (default {DEFAULT_API_KEY!r}).",
    )
    parser.add_argument(
        "--listen",
        type=_listen_address,
        default="127.0.0.1:8080",
        metavar="HOST:PORT",
        help="address to serve on (default 127.0.0.1:8080)",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--scenario", default="demo", help="built-in scenario name or JSON file (default demo)"
    )
    source.add_argument("--runs", type=int, metavar="N", help="serve N synthetic runs instead")
    args = parser.parse_args(argv)
    if args.runs is not None:
        if args.runs < 1:
            parser.error("--runs must be at least 1")
        scenario = synthetic_scenario(args.runs)
    else:
        try:
            scenario = load_scenario(args.scenario)
        except (OSError, ValueError) as exc:
            parser.error(f"--scenario {args.scenario}: {exc}")
    host, port = args.listen
    api_key = os.environ.get("LOOPS_SIMULATOR_API_KEY", DEFAULT_API_KEY)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_until_signalled(scenario, api_key, host, port))


if __name__ == "__main__":
    main()
