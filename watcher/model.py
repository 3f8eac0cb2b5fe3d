"""The Loops wire format as the watcher understands it: statuses, their classes, parsed runs.

Parsing is deliberately tolerant of schema drift: only the fields present in every published
version of the API are required, newer fields are used when present, unknown fields are
ignored and an undocumented status value is kept as it is.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from typing import Any

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


class InvalidRun(ValueError):
    """A response body that does not hold a usable run."""


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
    return value


def _optional_str(obj: dict[str, Any], key: str) -> str | None:
    value = obj.get(key)
    return value if isinstance(value, str) else None


def _status_name(obj: dict[str, Any], where: str) -> str:
    status = obj.get("status")
    if not isinstance(status, dict):
        raise InvalidRun(f"{where}.status is missing")
    name = status.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidRun(f"{where}.status.name is missing")
    return name


def _timestamp(obj: dict[str, Any], key: str, where: str) -> float:
    text = _field(obj, key, where)
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise InvalidRun(f"{where}.{key} is not an ISO 8601 time: {text[:40]!r}") from exc
    if moment.tzinfo is None:
        raise InvalidRun(f"{where}.{key} has no time zone: {text[:40]!r}")
    return moment.timestamp()


def parse_sampler(obj: Any) -> Sampler:
    if not isinstance(obj, dict):
        raise InvalidRun("run.sampler is not an object")
    node_count = obj.get("node_count")
    instance = obj.get("instance_type")
    return Sampler(
        id=_field(obj, "id", "sampler"),
        status=_status_name(obj, "sampler"),
        model_id=_field(obj, "model_id", "sampler"),
        deployment_id=_field(obj, "deployment_id", "sampler"),
        base_model=_field(obj, "base_model", "sampler"),
        instance_type=_optional_str(instance, "name") if isinstance(instance, dict) else None,
        node_count=node_count if isinstance(node_count, int) else None,
    )


def parse_run(obj: Any) -> Run:
    """Build a Run from one `LoopsRunV1` object; raise InvalidRun when a relied-on field is bad."""
    if not isinstance(obj, dict):
        raise InvalidRun("run is not an object")
    raw_sampler = obj.get("sampler")
    run_status = obj.get("status")
    user = obj.get("user")
    _field(obj, "base_url", "run")  # relied on by the contract; its absence means a broken body
    return Run(
        id=_field(obj, "id", "run"),
        session_id=_field(obj, "session_id", "run"),
        base_model=_field(obj, "base_model", "run"),
        created_at=_timestamp(obj, "created_at", "run"),
        sampler=None if raw_sampler is None else parse_sampler(raw_sampler),
        name=_optional_str(obj, "name") or "",
        status=_optional_str(run_status, "name") if isinstance(run_status, dict) else None,
        deployment_id=_optional_str(obj, "deployment_id"),
        user_email=_optional_str(user, "email") if isinstance(user, dict) else None,
    )


def parse_run_response(body: Any) -> Run:
    """`GET /v1/loops/runs/{id}` -> `{"run": LoopsRunV1}`."""
    if not isinstance(body, dict) or "run" not in body:
        raise InvalidRun("body has no 'run' object")
    return parse_run(body["run"])


def parse_list_response(body: Any) -> list[Run]:
    """`GET /v1/loops/runs` -> `{"runs": [LoopsRunV1, ...]}`; one bad entry fails the list."""
    if not isinstance(body, dict) or not isinstance(body.get("runs"), list):
        raise InvalidRun("body has no 'runs' list")
    return [parse_run(item) for item in body["runs"]]
