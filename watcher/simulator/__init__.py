"""A stand-in for the Baseten Loops API, for loopback use: tests, the benchmark and `--demo`.

A test instrument, not part of the product: the daemon never imports it unless `--demo` is
given. `scenarios` holds the runs and the timelines their statuses follow, `server` the
simulated API, `faults` the misbehaviours a test can inject, `protocol` the raw asyncio
HTTP/1.1 side that puts them on the wire, `control` the `/_sim/` interface other processes
steer it with, and `__main__` the `python -m watcher.simulator` command.
"""

from watcher.simulator.faults import FAULT_KINDS, Fault
from watcher.simulator.scenarios import Scenario, load_scenario, synthetic_scenario
from watcher.simulator.server import Simulator, SimulatorThread

__all__ = [
    "FAULT_KINDS",
    "Fault",
    "Scenario",
    "Simulator",
    "SimulatorThread",
    "load_scenario",
    "synthetic_scenario",
]
