"""The shape of the package's import graph: no cycles, a pure core, the simulator kept out.

Read from the source with `ast`, so a lazy import inside a function counts as an arrow too
(it still ties the two modules together), and so does a relative one; only
`if TYPE_CHECKING:` blocks are left out.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import FAKE_KEY

import watcher

PACKAGE = Path(watcher.__file__).parent
# Pure modules: data and arithmetic only, no I/O, no clock, no logging.
PURE = frozenset({"watcher.model", "watcher.tracker"})
# All a pure module may import besides other pure modules: the standard library's data
# vocabulary. A new import there is added here only with the thought that it does no I/O,
# reads no clock and logs nothing.
PURE_LIBRARIES = frozenset(
    {
        "__future__",
        "codecs",
        "collections",
        "dataclasses",
        "datetime",  # to parse times: `datetime.now()` would still break the rule
        "enum",
        "json",
        "re",
        "sys",  # for `sys.intern`
        "types",
        "typing",
    }
)
# What only `--demo`, the tests and the benchmark may load.
DEMO_ONLY = ("watcher.simulator", "jsonschema")
# What only an option asks for: the state file (`--state-file`: SQLite, and pydantic to
# validate its rows) and the simulator's request models (`--demo`). Each costs the idle
# process megabytes (pydantic alone about 12 MB), so a start without them loads none of it.
OPTIONAL = ("watcher.state", "sqlite3", "pydantic")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, package: str) -> set[str]:
    """Every module imported, resolving `from package import submodule` to the submodule and a
    relative import against `package`, the importing module's own package."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            node.body = []
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
            for alias in node.names:
                submodule = f"{module}.{alias.name}"
                found.add(submodule if _is_source(submodule) else module)
    return found


def _is_source(name: str) -> bool:
    """Whether `name` is one of the package's own modules."""
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _graph() -> dict[str, set[str]]:
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        graph[name] = _imports(tree, package)
    return graph


GRAPH = _graph()


def _internal(name: str) -> set[str]:
    return {target for target in GRAPH[name] if target in GRAPH and target != "watcher"}


def test_the_graph_was_read() -> None:
    assert {"watcher.daemon", "watcher.tracker", "watcher.simulator.server"} <= set(GRAPH)
    assert "watcher.model" in _internal("watcher.tracker")


def test_relative_imports_are_read_as_the_modules_they_name() -> None:
    source = "from .api import LoopsClient\nfrom . import logs\nfrom .simulator import faults"
    assert _imports(ast.parse(source), "watcher") == {
        "watcher.api",
        "watcher.logs",
        "watcher.simulator.faults",
    }
    assert _imports(ast.parse("from ..model import Run"), "watcher.simulator") == {"watcher.model"}


def test_no_import_cycles() -> None:
    visiting: list[str] = []
    done: set[str] = set()

    def visit(name: str) -> None:
        if name in done:
            return
        assert name not in visiting, "import cycle: " + " -> ".join([*visiting, name])
        visiting.append(name)
        for target in sorted(_internal(name)):
            visit(target)
        visiting.pop()
        done.add(name)

    for name in GRAPH:
        visit(name)


@pytest.mark.parametrize("name", sorted(PURE))
def test_pure_modules_import_nothing_that_does_io(name: str) -> None:
    assert _internal(name) <= PURE, f"{name} imports {_internal(name) - PURE}"
    libraries = {target.partition(".")[0] for target in GRAPH[name]} - {"watcher"}
    assert libraries <= PURE_LIBRARIES, f"{name} imports {libraries - PURE_LIBRARIES}"


def test_only_the_demo_reaches_the_simulator() -> None:
    """Outside the simulator itself, only `cli` names it (for --demo, inside a function)."""
    importers = {
        name
        for name, targets in GRAPH.items()
        if not name.startswith("watcher.simulator")
        and any(target.startswith("watcher.simulator") for target in targets)
    }
    assert importers == {"watcher.cli"}
    cli_top_level = _imports(ast.Module(body=_top_level("watcher.cli"), type_ignores=[]), "watcher")
    assert not any(target.startswith(DEMO_ONLY) for target in cli_top_level)


def _top_level(name: str) -> list[ast.stmt]:
    path = PACKAGE.parent.joinpath(*name.split(".")).with_suffix(".py")
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [node for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)]


@pytest.mark.process
def test_normal_operation_loads_neither_the_simulator_nor_what_options_ask_for(
    tmp_path: Path,
) -> None:
    """What `python -X importtime` shows for a start that does not ask for --demo."""
    env = {**os.environ, "BASETEN_API_KEY": FAKE_KEY}
    env.pop("PYTHONWARNINGS", None)
    command = [sys.executable, "-X", "importtime", "-m", "watcher", "--check-config"]
    done = subprocess.run(
        [*command, "--run-id", "abc123"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
        check=True,
    )
    imported = {line.rpartition("|")[2].strip() for line in done.stderr.splitlines()}
    assert "watcher.daemon" in imported
    assert "watcher.cli" in imported
    assert not [name for name in imported if name.startswith(DEMO_ONLY + OPTIONAL)]


FIRST_REQUEST = """
import asyncio, sys
from watcher.api import LoopsClient

class Observer:
    def attempt_finished(self, code, seconds): pass
    def retrying(self, result, detail, attempt, delay): pass

async def answer(reader, writer):
    await reader.readuntil(b"\\r\\n\\r\\n")
    writer.write(b"HTTP/1.1 401 Unauthorized\\r\\ncontent-length: 0\\r\\n\\r\\n")
    await writer.drain()
    writer.close()

async def main():
    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = LoopsClient(
        api_url=f"http://127.0.0.1:{port}", api_key="x", auth_scheme="bearer",
        request_timeout=30, max_retries=0, max_concurrency=1, max_requests_per_second=100,
        observer=Observer(),
    )
    before = set(sys.modules)
    outcome = await client.get_run("r1")
    print(outcome.result, *sorted(set(sys.modules) - before))
    await client.aclose()
    server.close()

asyncio.run(main())
"""


@pytest.mark.process
def test_a_clients_first_request_imports_nothing() -> None:
    """What the first request needs is loaded with the client: imported inside the request, it
    blocked the loop for seconds on a busy machine and counted against the request's deadline."""
    done = subprocess.run(
        [sys.executable, "-c", FIRST_REQUEST],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.split() == ["unauthorized"]
