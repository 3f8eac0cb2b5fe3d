"""The simulated Loops API: scenario runs rendered in the `LoopsRunV1` wire format, key checks,
armed faults and request counts, served over `watcher.simulator.protocol`.

API, as Baseten serves it (`Authorization: Bearer <key>` or `Api-Key <key>`, else 401):
    GET /v1/loops/runs/{run_id}                    {"run": LoopsRunV1}, 404 for an unknown run
    GET /v1/loops/runs?scope=org&run_id=&base_model=    {"runs": [...]}; without scope=org only
                                                   the scenario's caller's own runs
Requests under /_sim/ go to the control interface (`watcher.simulator.control`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import string
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection
from datetime import UTC, datetime
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs

from pydantic import BaseModel, ConfigDict

from watcher.simulator import control
from watcher.simulator.faults import (
    BODY_FAULTS,
    DELIVERY_FAULTS,
    NESTING_FAULT,
    REPLACING_FAULTS,
    ArmedFault,
    Fault,
    mangled,
)
from watcher.simulator.protocol import (
    Connection,
    Reply,
    Request,
    error,
    json_body,
    not_allowed,
    replacement,
    segment_after,
)
from watcher.simulator.scenarios import INSTANCE_TYPES, NonEmptyStr, RunSpec, Scenario

_RUNS = "/v1/loops/runs"


class RunUpdate(BaseModel):
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

    def update(self, update: RunUpdate, elapsed: float) -> None:
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
            body = self._encoded[key] = json_body(self.as_json(*key))
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
        self._faults: list[ArmedFault] = []
        self._requests: Counter[str] = Counter()
        # Guards the three above: control calls come from other threads and connections.
        self._lock = threading.Lock()
        self._server: asyncio.Server | None = None
        self._connections: set[Connection] = set()

    def _new_run(self, spec: RunSpec) -> _Run:
        return _Run(spec, _Identity.derive(spec.id, self._wall_start))

    def _elapsed(self) -> float:
        return self._clock() - self._epoch

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: Connection(self._reply, self._connections), host, port
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
        update = RunUpdate.model_validate(fields)
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
            self._faults.append(ArmedFault(fault, fault.count))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def request_counts(self) -> dict[str, int]:
        """API requests received per path (query strings dropped), control requests excluded."""
        with self._lock:
            return dict(self._requests)

    def run_summary(self, run_id: str) -> dict[str, Any]:
        """One run as `GET /_sim/state` lists it. KeyError if unknown."""
        with self._lock:
            return self._runs[run_id].summary(self._elapsed())

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

    def _reply(self, request: Request, loopback: bool) -> Reply:
        path = request.path
        if path.startswith(control.PREFIX):
            return control.reply(self, request, loopback)
        with self._lock:
            self._requests[path] += 1
        run_id = None if path == _RUNS else segment_after(_RUNS + "/", path)
        if path != _RUNS and run_id is None:
            return error(404, "not found")
        if request.method != "GET":
            return not_allowed("GET")
        denial = self._check_key(request.headers.get("authorization"))
        if denial is not None:
            return error(401, denial, (("WWW-Authenticate", "Bearer"),))
        query = {key: values[-1] for key, values in parse_qs(request.query).items()}
        if query.get("scope") not in (None, "org"):
            return error(400, "scope must be 'org' when given")
        with self._lock:
            fault = self._take_fault(run_id)
            if fault is not None and fault.kind in REPLACING_FAULTS:
                return replacement(fault)
            delivery = fault if fault is not None and fault.kind in DELIVERY_FAULTS else None
            elapsed = self._elapsed()
            if run_id is None:
                runs = self._listed(query)
            elif run_id in self._runs:
                runs = [self._runs[run_id]]
            else:
                return error(404, "run not found", delivery=delivery)
            if fault is not None and fault.kind == NESTING_FAULT:
                parts = [b"[" * fault.depth + b"]" * fault.depth]
            else:
                parts = [self._entry(run, fault, elapsed, listing=run_id is None) for run in runs]
        if run_id is None:
            body = b'{"runs":[' + b",".join(parts) + b"]}"
        else:
            body = b'{"run":' + parts[0] + b"}"
        return Reply(200, body, delivery=delivery)

    def _entry(self, run: _Run, fault: Fault | None, elapsed: float, *, listing: bool) -> bytes:
        """One run as its body or list entry shows it, damaged by a body fault if one acts."""
        if listing and (fault is None or fault.kind not in BODY_FAULTS):
            fault = next(
                (
                    armed.fault
                    for armed in self._faults
                    if armed.fault.kind in BODY_FAULTS
                    and armed.fault.run_id == run.spec.id
                    and armed.fault.endpoint != "run"
                ),
                None,
            )
        if fault is None or fault.kind not in BODY_FAULTS:
            return run.encoded(elapsed)
        return json_body(mangled(run.as_json(*run.statuses(elapsed)), fault))

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
