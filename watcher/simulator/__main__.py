"""`python -m watcher.simulator --listen 127.0.0.1:8080 [--scenario demo|PATH] [--runs N]`:
serve the simulated API alone, accepting the key in `LOOPS_SIMULATOR_API_KEY`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
from collections.abc import Sequence

from watcher.simulator.scenarios import Scenario, load_scenario, synthetic_scenario
from watcher.simulator.server import Simulator

DEFAULT_API_KEY = "sim-key-not-secret"


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
