"""The `loops-watcher` command: parse configuration, pick a mode, map the ending to an exit code.

Exit codes: 0 clean shutdown; 2 bad usage or configuration; 1 unexpected failure.
`--once`: 0 all runs readable and none failing, 1 some run failing or failed, 3 some run
could not be read (a failing run outranks an unreadable one: it is the more certain news).
"""

from __future__ import annotations

import asyncio
import secrets
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import TextIO

from prometheus_client import CollectorRegistry, disable_created_metrics
from pydantic import SecretStr

from watcher.api import Result
from watcher.config import ConfigError, Settings, environment, load_settings, redacted, to_toml
from watcher.daemon import Watcher, install_signal_handlers
from watcher.logs import configure_logging, get_logger
from watcher.model import StatusClass, status_class
from watcher.simulator import Simulator, load_scenario
from watcher.tracker import RunRecord

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_UNREADABLE = 0, 1, 2, 3
DEMO_INTERVALS = {"poll_interval": 3.0, "fast_poll_interval": 1.0}


@asynccontextmanager
async def demo_backend(settings: Settings) -> AsyncIterator[Settings]:
    """Start the simulator on loopback; yield the settings aimed at it."""
    key = "demo-" + secrets.token_urlsafe(16)
    simulator = Simulator(load_scenario("demo"), api_keys=[key])
    await simulator.start("127.0.0.1", 0)
    overrides: dict[str, object] = {
        name: value
        for name, value in DEMO_INTERVALS.items()
        if name not in settings.model_fields_set
    }
    overrides["run_id"] = tuple(dict.fromkeys((*settings.run_id, *simulator.run_ids)))
    overrides["api_url"] = simulator.url
    overrides["api_key"] = SecretStr(key)
    try:
        yield settings.model_copy(update=overrides)
    finally:
        await simulator.close()


async def run_daemon(settings: Settings) -> None:
    stop = asyncio.Event()
    log = get_logger()
    started = time.monotonic()
    async with _backend(settings) as effective:
        watcher = Watcher(effective, registry=CollectorRegistry())
        install_signal_handlers(stop, watcher.request_run_ids_reload)

        def announce(port: int) -> None:
            if settings.demo:
                log.info(
                    "demo_started",
                    simulator_url=effective.api_url,
                    metrics_url=f"http://localhost:{port}/metrics",
                    landing_page=f"http://localhost:{port}/",
                    runs=len(effective.run_id),
                )

        await watcher.run(stop, on_listening=announce)
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
        await watcher.reload_run_ids_file("start")
        watcher.sync_runs(watcher.desired_runs(), spread=0.0)
        try:
            if watcher.list_mode():
                await watcher.list_round()
            unread = [run_id for run_id, record in watcher.tracker.runs.items() if not record.run]
            await asyncio.gather(*(watcher.poll_run(run_id) for run_id in unread))
        finally:
            await watcher.client.aclose()
    records = list(watcher.tracker.runs.values())
    out.write(format_table(records, now=time.time()))
    return once_exit_code(records)


def once_exit_code(records: Sequence[RunRecord]) -> int:
    if any(
        record.status is not None
        and status_class(record.status) in (StatusClass.FAILED, StatusClass.FAILING)
        for record in records
    ):
        return EXIT_FAILURE
    if any(record.last_result is not Result.OK for record in records):
        return EXIT_UNREADABLE
    return EXIT_OK


def _age(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def format_table(records: Sequence[RunRecord], *, now: float) -> str:
    header = ("RUN", "NAME", "SAMPLER STATUS", "CREATED", "OBSERVED", "MODEL", "DEPLOYMENT")
    rows: list[tuple[str, ...]] = [header]
    observed = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    for record in sorted(records, key=lambda r: r.run_id):
        run = record.run
        if run is None:
            rows.append((record.run_id, "", f"unreadable: {record.last_result}", "", "", "", ""))
            continue
        sampler = run.sampler
        rows.append(
            (
                run.id,
                run.name,
                record.status or "(no sampler)",
                _age(now - run.created_at),
                observed,
                sampler.model_id if sampler else "",
                sampler.deployment_id if sampler else (run.deployment_id or ""),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        + "\n"
        for row in rows
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
    configure_logging(
        settings.log_format,
        settings.log_level,
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
