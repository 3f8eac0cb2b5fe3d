"""Log rendering: one JSON object a line with the contract's keys, and never the key."""

from __future__ import annotations

import io
import json
import re
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
        "an_event_shown_with_all_its_fields",
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


def console_lines(events: list[tuple[str, str, dict[str, object]]]) -> list[str]:
    stream = io.StringIO()
    configure_logging("console", "debug", stream=stream)
    log = get_logger()
    for level, event, fields in events:
        getattr(log, level)(event, **fields)
    return stream.getvalue().splitlines()


def test_console_lines_are_short_and_scannable() -> None:
    run = {"run_id": "ujzde8g", "run_name": "llama31-8b-dpo", "sampler_id": "s1", "base_model": "m"}
    lines = console_lines(
        [
            ("info", "sampler_status_observed", {**run, "status": "ACTIVE"}),
            (
                "error",
                "sampler_status_changed",
                {**run, "from_status": "ACTIVE", "to_status": "FAILED",
                 "seconds_in_previous_status": 51.8},
            ),
            (
                "warning",
                "sampler_status_changed",
                {**run, "from_status": "FAILED", "to_status": "INACTIVE",
                 "seconds_in_previous_status": 754.2},
            ),
            (
                "warning",
                "poll_failed",
                {"run_id": "ujzde8g", "result": "timeout", "attempts": 4,
                 "detail": "no complete response within 10 s", "http_status": "error"},
            ),
            ("info", "sampler_status_observed",
             {"run_id": "t9lgmxg", "run_name": "", "status": None}),
            ("info", "some_new_event", {"count": 3, "note": "line one\nline two"}),
        ]
    )  # fmt: skip
    assert len(lines) == 6
    stamp = r"\d\d:\d\d:\d\d"
    expected = [
        rf"{stamp} INFO   llama31-8b-dpo \(ujzde8g\)  ACTIVE  first seen",
        rf"{stamp} ERROR  llama31-8b-dpo \(ujzde8g\)  ACTIVE -> FAILED  after 51\.8s",
        rf"{stamp} WARN   llama31-8b-dpo \(ujzde8g\)  FAILED -> INACTIVE  after 12m34s",
        # The run's name is remembered from earlier events that carried it.
        rf"{stamp} WARN   llama31-8b-dpo \(ujzde8g\)  poll failed: no complete response within "
        r"10 s \(4 attempts\)",
        rf"{stamp} INFO   t9lgmxg  no sampler  first seen",
        rf"{stamp} INFO   some_new_event  count=3 note=line one line two",
    ]
    for line, pattern in zip(lines, expected, strict=True):
        assert re.fullmatch(pattern, line), line
    assert all(len(line) < 120 for line in lines)


def test_console_lines_for_the_watcher_itself() -> None:
    lines = console_lines(
        [
            ("info", "watcher_started", {"version": "1.2.3", "runs": 14, "listen": "0.0.0.0:9877",
                                          "config": {"poll_interval": 30}}),
            ("error", "run_ids_file_invalid", {"path": "/x", "reason": "changed",
                                               "error": "--run-ids-file: '/x' is a FIFO"}),
            ("info", "watcher_stopped", {"uptime_seconds": 7322.5}),
        ]
    )  # fmt: skip
    assert lines[0].endswith(
        "INFO   watching 14 runs; endpoints on 0.0.0.0:9877 (loops-watcher 1.2.3)"
    )
    assert lines[1].endswith(
        "ERROR  --run-ids-file: '/x' is a FIFO; still watching the last good set"
    )
    assert lines[2].endswith("INFO   stopped after 2h02m")


def test_json_stays_the_same_when_console_exists() -> None:
    stream = io.StringIO()
    configure_logging("json", "info", stream=stream)
    get_logger().error("sampler_status_changed", run_id="r1", seconds_in_previous_status=1.5)
    record = json.loads(stream.getvalue())
    assert set(record) == {"event", "level", "timestamp", "run_id", "seconds_in_previous_status"}
    assert record["timestamp"].endswith("Z")
