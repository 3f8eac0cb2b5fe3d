"""Log rendering: one JSON object a line with the contract's keys, and never the key."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from datetime import datetime, timedelta

import pytest
import structlog

from watcher.logs import configure_logging, get_logger

SECRET = "fake-secret-for-log-test"


@pytest.fixture(autouse=True)
def reset_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


def test_json_lines_carry_timestamp_level_event_and_context() -> None:
    stream = io.StringIO()
    configure_logging("json", "info", secret=SECRET, stream=stream)
    log = get_logger()
    with structlog.contextvars.bound_contextvars(run_id="k4q95w5"):
        log.warning("poll_failed", result="timeout")
    log.debug("hidden")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["event"] == "poll_failed"
    assert record["level"] == "warning"
    assert record["run_id"] == "k4q95w5"
    assert record["timestamp"].endswith("Z")
    moment = datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00"))
    assert moment.utcoffset() == timedelta(0)


def test_level_filter() -> None:
    stream = io.StringIO()
    configure_logging("json", "error", stream=stream)
    get_logger().warning("quiet")
    get_logger().error("loud")
    assert [json.loads(line)["event"] for line in stream.getvalue().splitlines()] == ["loud"]


@pytest.mark.parametrize("log_format", ["json", "console"])
def test_the_key_is_scrubbed_wherever_it_appears(log_format: str) -> None:
    stream = io.StringIO()
    configure_logging(log_format, "debug", secret=SECRET, stream=stream)
    get_logger().error("oops", detail=f"header was Bearer {SECRET}")
    try:
        raise RuntimeError(f"failed with {SECRET}")
    except RuntimeError:
        get_logger().exception("crash")
    output = stream.getvalue()
    assert SECRET not in output
    assert "<redacted>" in output


# A key with the characters JSON and repr escape: its escaped forms must not get through either.
QUOTED_SECRET = 'fake"key\\with-quote'


def forms(secret: str) -> set[str]:
    return {secret, json.dumps(secret)[1:-1], repr(secret)[1:-1]}


@pytest.mark.parametrize("log_format", ["json", "console"])
def test_a_key_with_quotes_and_backslashes_is_scrubbed_in_every_rendered_form(
    log_format: str,
) -> None:
    stream = io.StringIO()
    configure_logging(log_format, "debug", secret=QUOTED_SECRET, stream=stream)
    echoed = f"HTTP 401: invalid API key {QUOTED_SECRET}"  # as an API might echo it
    get_logger().error(
        "api_key_rejected",
        detail=echoed,
        nested={"body": [echoed, (echoed,)]},
        obj=ValueError(echoed),
    )
    try:
        raise RuntimeError(echoed)
    except RuntimeError:
        get_logger().exception("crash")
    output = stream.getvalue()
    for form in forms(QUOTED_SECRET):
        assert form not in output
    assert output.count("<redacted>") >= 4
    if log_format == "json":
        first = json.loads(output.splitlines()[0])
        assert first["detail"] == "HTTP 401: invalid API key <redacted>"
        assert first["nested"] == {"body": [first["detail"], [first["detail"]]]}
