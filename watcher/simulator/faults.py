"""The faults a test can inject into the simulator's answers, and where each one acts.

`Fault` is what `POST /_sim/faults` accepts and `Simulator.add_fault` takes; how a fault is
put on the wire is `watcher.simulator.protocol`'s business.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal

import pydantic
from pydantic import ConfigDict, Field, TypeAdapter, model_validator

from watcher.simulator.scenarios import NonEmptyStr, RunId

# Where each fault acts: in place of the reply, inside the run bodies, or in how it is sent.
REPLACING_FAULTS = ("status", "non_json", "redirect")
BODY_FAULTS = ("missing_fields", "unknown_status")
# 200 with the runs replaced by `depth` nested arrays: more than any JSON parser recurses into.
NESTING_FAULT = "deep_nesting"
DELIVERY_FAULTS = ("delay", "trickle", "truncate", "reset", "oversized")
FAULT_KINDS: tuple[str, ...] = REPLACING_FAULTS + BODY_FAULTS + (NESTING_FAULT,) + DELIVERY_FAULTS

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
        if self.run_id is not None and self.endpoint == "list" and self.kind not in BODY_FAULTS:
            raise ValueError("a fault for one run_id cannot act on the list endpoint")
        return self

    def hits(self, run_id: str | None) -> bool:
        """Whether this fault acts on a request for `run_id` (None: the list)."""
        if run_id is None:
            return self.run_id is None and self.endpoint != "run"
        return self.run_id in (None, run_id) and self.endpoint != "list"


FAULT_JSON = TypeAdapter(Fault)


@dataclasses.dataclass(slots=True)
class ArmedFault:
    fault: Fault
    remaining: int | None


def mangled(run: dict[str, Any], fault: Fault) -> dict[str, Any]:
    """A run body damaged the way a `missing_fields` or `unknown_status` fault says."""
    sampler = run["sampler"]
    if fault.kind == "missing_fields":
        del run["session_id"]
        if sampler is not None:
            del sampler["status"]
    elif sampler is not None:
        sampler["status"] = {"name": fault.value}
    return run
