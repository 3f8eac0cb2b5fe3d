"""The simulator's control interface: how a test in another process steers it over HTTP.

No key; answers loopback clients only; bad input gets 400 and a JSON error:
    GET    /_sim/state           runs with their current statuses, armed faults
    PUT    /_sim/runs/{run_id}   JSON fields as for `Simulator.set_run`; creates a new run
    DELETE /_sim/runs/{run_id}
    POST   /_sim/faults          a JSON `Fault`
    DELETE /_sim/faults
    GET    /_sim/requests        API requests served, per path
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any, Protocol

from pydantic import ValidationError

from watcher.simulator.faults import FAULT_JSON, Fault
from watcher.simulator.protocol import Reply, Request, error, json_body, not_allowed, segment_after

PREFIX = "/_sim/"


class Controlled(Protocol):
    """What the control interface may do to a simulator."""

    def state(self) -> dict[str, Any]: ...
    def request_counts(self) -> dict[str, int]: ...
    def add_fault(self, fault: Fault) -> None: ...
    def clear_faults(self) -> None: ...
    def set_run(self, run_id: str, **fields: object) -> None: ...
    def remove_run(self, run_id: str) -> None: ...
    def run_summary(self, run_id: str) -> dict[str, Any]: ...


def _invalid(what: str, exc: ValidationError) -> Reply:
    """400 naming each field pydantic refused and why."""
    reasons = "; ".join(
        f"{'.'.join(str(part) for part in error['loc']) or 'body'}: {error['msg']}"
        for error in exc.errors(include_url=False)
    )
    return error(400, f"invalid {what}: {reasons}")


def _add_fault(sim: Controlled, request: Request, _: str) -> Reply:
    try:
        fault = FAULT_JSON.validate_json(request.body)
    except ValidationError as exc:
        return _invalid("fault", exc)
    sim.add_fault(fault)
    return Reply(201, json_body({"fault": dataclasses.asdict(fault)}))


def _clear_faults(sim: Controlled, _: Request, __: str) -> Reply:
    sim.clear_faults()
    return Reply(200, json_body({"faults": []}))


def _set_run(sim: Controlled, request: Request, run_id: str) -> Reply:
    try:
        fields = json.loads(request.body)
    except ValueError as exc:
        return error(400, f"body is not JSON: {exc}")
    if not isinstance(fields, dict):
        return error(400, "body must be a JSON object of run fields")
    try:
        sim.set_run(run_id, **fields)
    except ValidationError as exc:
        return _invalid("run fields", exc)
    except ValueError as exc:
        return error(400, str(exc))
    return Reply(200, json_body({"run": sim.run_summary(run_id)}))


def _remove_run(sim: Controlled, _: Request, run_id: str) -> Reply:
    try:
        sim.remove_run(run_id)
    except KeyError:
        return error(404, "run not found")
    return Reply(200, json_body({"removed": run_id}))


# A handler gets the simulator, the request and the run ID its path names ("" if none).
Handler = Callable[[Controlled, Request, str], Reply]
_ROUTES: dict[str, dict[str, Handler]] = {
    "/_sim/state": {"GET": lambda sim, _, __: Reply(200, json_body(sim.state()))},
    "/_sim/requests": {
        "GET": lambda sim, _, __: Reply(200, json_body({"requests": sim.request_counts()}))
    },
    "/_sim/faults": {"POST": _add_fault, "DELETE": _clear_faults},
}
_RUN_ROUTE: dict[str, Handler] = {"PUT": _set_run, "DELETE": _remove_run}


def reply(sim: Controlled, request: Request, loopback: bool) -> Reply:
    """The answer to a request under PREFIX."""
    if not loopback:
        return error(403, "the control interface only answers loopback clients")
    run_id = segment_after("/_sim/runs/", request.path)
    methods = _ROUTES.get(request.path) if run_id is None else _RUN_ROUTE
    if methods is None:
        return error(404, "not found")
    handler = methods.get(request.method)
    if handler is None:
        return not_allowed(*methods)
    return handler(sim, request, run_id or "")
