"""The `loops-watcher` command: parse configuration, pick a mode, map the ending to an exit code.

Exit codes: 0 clean shutdown; 2 bad usage or configuration; 1 unexpected failure.
`--once`: 0 all runs readable and none failing, 1 some run failing or failed, 3 some run
could not be read (a failing run outranks an unreadable one: it is the more certain news).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, TextIO

from prometheus_client import CollectorRegistry, disable_created_metrics

from watcher.config import (
    API_KEY_ENV,
    ConfigError,
    Secret,
    Settings,
    environment,
    load_settings,
    redacted,
    to_toml,
)
from watcher.daemon import Watcher, install_signal_handlers
from watcher.logs import configure_logging, get_logger
from watcher.model import Result, StatusClass, status_class
from watcher.tracker import RunRecord

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_UNREADABLE = 0, 1, 2, 3
DEMO_INTERVALS = {"poll_interval": 3.0, "fast_poll_interval": 1.0}


@asynccontextmanager
async def demo_backend(settings: Settings) -> AsyncIterator[Settings]:
    """Start the simulator on loopback; yield the settings aimed at it."""
    # Imported here: the simulator is a test instrument, loaded only when --demo asks for it.
    from watcher.simulator import Simulator, load_scenario  # noqa: PLC0415

    key = "demo-" + secrets.token_urlsafe(16)
    simulator = Simulator(load_scenario("demo"), api_keys=[key])
    await simulator.start("127.0.0.1", 0)
    intervals = {
        name: value for name, value in DEMO_INTERVALS.items() if name not in settings.given
    }
    if "poll_interval" in intervals:  # never below a fast interval the user chose
        fast = intervals.get("fast_poll_interval", settings.fast_poll_interval)
        intervals["poll_interval"] = max(intervals["poll_interval"], fast)
    overrides: dict[str, object] = {
        **intervals,
        "run_id": tuple(dict.fromkeys((*settings.run_id, *simulator.run_ids))),
        "api_url": simulator.url,
        "api_key": Secret(key),
    }
    try:
        yield settings.updated(**overrides)
    finally:
        await simulator.close()


async def run_daemon(settings: Settings) -> None:
    stop = asyncio.Event()
    log = get_logger()
    started = time.monotonic()
    async with _backend(settings) as effective:
        watcher = Watcher(effective, registry=CollectorRegistry())
        install_signal_handlers(stop, watcher.watchlist.request_reload)

        def announce(port: int) -> None:
            if settings.demo:
                page = f"http://localhost:{port}{settings.web_path}/"
                # The first line logged: what a newcomer should open.
                log.info(
                    "demo_started",
                    status_page=page,
                    metrics_url=f"{page}metrics",
                    simulator_url=effective.api_url,
                    runs=len(effective.run_id),
                )

        await watcher.lifecycle.serve(stop, on_listening=announce)
    log.info("watcher_stopped", uptime_seconds=round(time.monotonic() - started, 3))


@asynccontextmanager
async def _backend(settings: Settings) -> AsyncIterator[Settings]:
    if settings.demo:
        async with demo_backend(settings) as effective:
            yield effective
    else:
        yield settings


async def run_once(settings: Settings, out: TextIO) -> int:
    async with _backend(settings) as effective:
        watcher = Watcher(effective, registry=CollectorRegistry())
        await watcher.lifecycle.once()
    records = sorted(watcher.tracker.runs.values(), key=lambda record: record.run_id)
    code = once_exit_code(records)
    rows = once_rows(records, now=time.time())
    summary = once_summary(records, settings)
    if settings.output == "json":
        report = json.dumps({"runs": rows, "summary": summary, "exit_code": code}, indent=2) + "\n"
    else:
        report = format_table(rows) + summary + "\n"
    try:
        out.write(report)
        out.flush()
    except BrokenPipeError:
        # The reader went away (`| head -1`): stop quietly, as command-line tools do. Later
        # writes, the interpreter's own flush at exit among them, go nowhere.
        os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
    return code


def _failing(record: RunRecord) -> bool:
    return record.status is not None and status_class(record.status) in (
        StatusClass.FAILED,
        StatusClass.FAILING,
    )


def once_exit_code(records: Sequence[RunRecord]) -> int:
    if any(_failing(record) for record in records):
        return EXIT_FAILURE
    if any(record.last_result is not Result.OK for record in records):
        return EXIT_UNREADABLE
    return EXIT_OK


def _runs(count: int) -> str:
    return f"{count} run" if count == 1 else f"{count} runs"


# Why a run could not be read, as a person would say it, and what to check.
_CAUSES = {
    Result.UNAUTHORIZED: "401 Unauthorized",
    Result.FORBIDDEN: "403 Forbidden",
    Result.NOT_FOUND: "404 Not Found",
    Result.RATE_LIMITED: "429 Too Many Requests",
    Result.SERVER_ERROR: "server errors (5xx)",
    Result.TIMEOUT: "no complete answer in time",
    Result.CONNECTION_ERROR: "no connection",
    Result.INVALID_RESPONSE: "answers it could not use",
}


def _hint(result: Result, settings: Settings) -> str:
    if result in (Result.UNAUTHORIZED, Result.FORBIDDEN):
        if settings.api_key_file is not None:
            return f"check the key in {settings.api_key_file} and --auth-scheme"
        return f"check {API_KEY_ENV}"
    return {
        Result.NOT_FOUND: "check the run IDs",
        Result.RATE_LIMITED: "lower --max-requests-per-second",
        Result.SERVER_ERROR: "the API is failing; try again later",
        Result.TIMEOUT: f"raise --request-timeout ({settings.request_timeout:g} s) or check the "
        "network",
        Result.CONNECTION_ERROR: "check --api-url and the network",
    }.get(result, "see the poll_failed lines above")


def once_summary(records: Sequence[RunRecord], settings: Settings) -> str:
    """One line under the table naming what is wrong, or saying that nothing is."""
    parts = []
    failing = [record for record in records if _failing(record)]
    if failing:
        named = ", ".join(
            f"{(record.run.name if record.run else '') or record.run_id} {record.status}"
            for record in failing[:3]
        )
        parts.append(f"{_runs(len(failing))} failing: {named}" + (", ..." if failing[3:] else ""))
    unreadable: dict[Result, int] = {}
    for record in records:
        if record.last_result is not None and record.last_result is not Result.OK:
            unreadable[record.last_result] = unreadable.get(record.last_result, 0) + 1
    api = "the demo simulator" if settings.demo else settings.api_url
    parts.extend(
        f"{_runs(count)} unreadable: {_CAUSES[result]} from {api}; {_hint(result, settings)}"
        for result, count in sorted(unreadable.items(), key=lambda item: -item[1])
    )
    return "; ".join(parts) or f"{_runs(len(records))} read, none failing"


def _iso(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def once_rows(records: Sequence[RunRecord], *, now: float) -> list[dict[str, Any]]:
    """What `--once` found, a dict a run: the table's cells and the `--output json` objects."""
    rows = []
    for record in records:
        run = record.run
        sampler = run.sampler if run else None
        rows.append(
            {
                "run_id": record.run_id,
                "run_name": run.name if run else None,
                "sampler_status": record.status,
                "created_at": _iso(run.created_at) if run else None,
                "observed_at": _iso(now) if run else None,
                "age_seconds": round(now - run.created_at, 3) if run else None,
                "model_id": sampler.model_id if sampler else None,
                "deployment_id": sampler.deployment_id if sampler else (run and run.deployment_id),
                "result": str(record.last_result) if record.last_result else None,
            }
        )
    return rows


def _age(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    header = ("RUN", "NAME", "SAMPLER STATUS", "CREATED", "OBSERVED", "MODEL", "DEPLOYMENT")
    lines: list[tuple[str, ...]] = [header]
    for row in rows:
        if row["created_at"] is None:
            lines.append((row["run_id"], "", f"unreadable: {row['result']}", "", "", "", ""))
            continue
        lines.append(
            (
                row["run_id"],
                row["run_name"],
                row["sampler_status"] or "(no sampler)",
                _age(row["age_seconds"]),
                row["observed_at"],
                row["model_id"] or "",
                row["deployment_id"] or "",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        + "\n"
        for line in lines
    )


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = load_settings(argv, environment(), stdout_is_tty=sys.stdout.isatty())
    except ConfigError as exc:
        print(f"loops-watcher: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if settings.check_config:
        sys.stdout.write(to_toml(redacted(settings)))
        return EXIT_OK

    secret = settings.api_key.get_secret_value() if settings.api_key else None
    # With --once the table owns stdout; logs go to stderr.
    # With --once only warnings and errors go above the table, unless a level was chosen.
    quiet = settings.once and "log_level" not in settings.given
    configure_logging(
        settings.log_format,
        "warning" if quiet else settings.log_level,
        secret=secret,
        stream=sys.stderr if settings.once else sys.stdout,
    )
    disable_created_metrics()  # type: ignore[no-untyped-call]
    log = get_logger()
    try:
        if settings.once:
            return asyncio.run(run_once(settings, sys.stdout))
        asyncio.run(run_daemon(settings))
    except ConfigError as exc:  # found only on start, such as a port already in use
        log.error("watcher_stopped", error=str(exc))
        print(f"loops-watcher: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_OK
    except Exception:
        log.exception("watcher_crashed")
        return EXIT_FAILURE
    return EXIT_OK
