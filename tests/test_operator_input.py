"""End to end: what an operator types or points the watcher at can stop it only with exit 2.

Each bad input is refused at start with one line naming the option and the value (never a
password or the key), and a run-IDs file that turns hostile while the watcher runs is reported
once while the last good set keeps being watched.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from e2e_support import (
    FAST,
    Exposition,
    StartSimulator,
    StartWatcher,
    run_watcher,
    watcher_env,
)

pytestmark = pytest.mark.e2e

API = ("--api-url", "http://127.0.0.1:9")
PASSWORD = "hunter2-not-a-real-password"


def bad_input(case: str, tmp_path: Path) -> tuple[list[str], dict[str, str], tuple[str, ...]]:
    """(arguments, environment, what the one error line must contain) for one bad input."""
    config = tmp_path / "watcher.toml"
    ids = tmp_path / "run-ids"
    if case == "toml-not-utf8":
        config.write_bytes(b'run_id = ["a1"]\n# caf\xe9\n')
    elif case == "toml-bool-interval":
        config.write_text('run_id = ["a1"]\npoll_interval = true\n')
    elif case == "toml-string-bool":
        config.write_text('run_id = ["a1"]\ndemo = "yes"\n')
    elif case == "run-ids-fifo":
        os.mkfifo(ids)
    elif case == "run-ids-dev-zero":
        ids.symlink_to("/dev/zero")
    elif case == "run-ids-huge":
        with ids.open("wb") as handle:
            handle.truncate(64 * 1024 * 1024)  # sparse
    cases: dict[str, tuple[list[str], dict[str, str], tuple[str, ...]]] = {
        "url-userinfo": (
            ["--api-url", f"http://admin:{PASSWORD}@127.0.0.1:9", "--run-id", "a1"],
            watcher_env(),
            ("--api-url", "'http://<redacted>@127.0.0.1:9'", "password"),
        ),
        "url-port": (
            ["--api-url", "http://127.0.0.1:70000", "--run-id", "a1"],
            watcher_env(),
            ("--api-url", "'http://127.0.0.1:70000'", "1 to 65535"),
        ),
        "run-id-newline": ([*API, "--run-id", "abc\n"], watcher_env(), ("--run-id", r"'abc\n'")),
        "toml-not-utf8": (["--config", str(config)], watcher_env(), (str(config), "UTF-8")),
        "toml-bool-interval": (
            ["--config", str(config)],
            watcher_env(),
            ("--poll-interval", str(config), "True", "TOML boolean"),
        ),
        "toml-string-bool": (
            ["--config", str(config)],
            watcher_env(),
            ("--demo", str(config), "'yes'", "true or false"),
        ),
        "fast-slower-than-slow": (
            [*API, "--run-id", "a1", "--poll-interval", "10", "--fast-poll-interval", "20"],
            watcher_env(),
            ("--fast-poll-interval", "20", "--poll-interval", "10"),
        ),
        "tiny-interval": (
            [*API, "--run-id", "a1", "--poll-interval", "1e-9"],
            watcher_env(),
            ("--poll-interval", "'1e-9'", "0.1"),
        ),
        "tiny-rate": (
            [*API, "--run-id", "a1", "--max-requests-per-second", "1e-300"],
            watcher_env(),
            ("--max-requests-per-second", "'1e-300'", "0.01"),
        ),
        "run-ids-fifo": ([*API, "--run-ids-file", str(ids)], watcher_env(), ("FIFO",)),
        "run-ids-dev-zero": (
            [*API, "--run-ids-file", str(ids)],
            watcher_env(),
            ("character device",),
        ),
        "run-ids-huge": ([*API, "--run-ids-file", str(ids)], watcher_env(), ("limit",)),
        "key-not-ascii": (
            [*API, "--run-id", "a1"],
            watcher_env(api_key="fake-clé-0000"),
            ("BASETEN_API_KEY", "non-ASCII"),
        ),
    }
    return cases[case]


@pytest.mark.parametrize(
    "case",
    [
        "url-userinfo",
        "url-port",
        "run-id-newline",
        "toml-not-utf8",
        "toml-bool-interval",
        "toml-string-bool",
        "fast-slower-than-slow",
        "tiny-interval",
        "tiny-rate",
        "run-ids-fifo",
        "run-ids-dev-zero",
        "run-ids-huge",
        "key-not-ascii",
    ],
)
@pytest.mark.parametrize("check_config", [False, True], ids=["run", "check-config"])
def test_bad_input_exits_2_with_one_line(case: str, check_config: bool, tmp_path: Path) -> None:
    args, env, named = bad_input(case, tmp_path)
    finished = run_watcher(*args, *(["--check-config"] if check_config else []), env=env)
    assert finished.returncode == 2, finished.stdout + finished.stderr
    assert finished.stdout == ""
    lines = finished.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("loops-watcher: error: ")
    for name in named:
        assert name in lines[0]
    assert PASSWORD not in finished.stderr
    assert "clé" not in finished.stderr


def test_a_run_ids_file_turned_hostile_is_reported_and_the_last_good_set_kept(
    start_simulator: StartSimulator, start_watcher: StartWatcher, tmp_path: Path
) -> None:
    runs = dict.fromkeys(("keep-aaa", "keep-bbb", "keep-ccc"), "ACTIVE")
    served = start_simulator(runs)
    ids = tmp_path / "run-ids"
    ids.write_text("keep-aaa\nkeep-bbb\n")
    watcher = start_watcher("--api-url", served.url, *FAST, "--run-ids-file", str(ids))
    watcher.wait_for_metrics(
        lambda m: m.run_ids() == {"keep-aaa", "keep-bbb"}, what="the runs in the file"
    )

    def replace(make: str) -> None:
        ids.unlink()
        if make == "fifo":
            os.mkfifo(ids)
        elif make == "dev-zero":
            ids.symlink_to("/dev/zero")
        else:
            with ids.open("wb") as handle:
                handle.truncate(64 * 1024 * 1024)

    for make, reason in (
        ("fifo", "is a FIFO"),
        ("dev-zero", "is a character device"),
        ("huge", "is larger than the 16,777,216-byte limit"),
    ):
        mark = watcher.mark()
        replace(make)
        invalid = watcher.wait_for_log("run_ids_file_invalid", since=mark, reason="changed")
        assert reason in invalid["error"]
        assert watcher.get("/healthz").status_code == 200
        polled = watcher.scrape().total("loops_watcher_polls_total", run_id="keep-bbb")

        def polled_again(metrics: Exposition, before: float = polled) -> bool:
            return metrics.total("loops_watcher_polls_total", run_id="keep-bbb") > before

        watcher.wait_for_metrics(polled_again, what="the last good runs to be polled on")
        # One line per change of the file, not one per check.
        assert len(watcher.logs("run_ids_file_invalid", since=mark)) == 1
        assert watcher.scrape().run_ids() == {"keep-aaa", "keep-bbb"}

    # SIGHUP re-reads even an unchanged hostile file, and says so once more.
    mark = watcher.mark()
    watcher.send(signal.SIGHUP)
    watcher.wait_for_log("run_ids_file_invalid", since=mark, reason="SIGHUP")
    assert watcher.memory_kib()["VmHWM"] < 200 * 1024

    ids.unlink()
    ids.write_text("keep-ccc\n")
    watcher.wait_for_metrics(
        lambda m: m.run_ids() == {"keep-ccc"}, what="a good file to be loaded again"
    )


class _EchoingApi(BaseHTTPRequestHandler):
    """An API that refuses the key and quotes it back in its JSON error body."""

    def do_GET(self) -> None:
        key = self.headers.get("Authorization", "").partition(" ")[2]
        body = json.dumps({"error": f"invalid API key {key}"}).encode()
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def echoing_api() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _EchoingApi)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_key_with_quotes_echoed_by_the_api_never_shows(
    echoing_api: str, start_watcher: StartWatcher
) -> None:
    key = 'e2e-FAKE"key\\not-a-real-secret'
    watcher = start_watcher(
        "--api-url", echoing_api, *FAST, "--run-id", "echo-run", "--log-level", "debug",
        api_key=key, ready=False,
    )  # fmt: skip
    rejected = watcher.wait_for_log("api_key_rejected")
    assert rejected["detail"] == "HTTP 401: invalid API key <redacted>"
    pages = [watcher.get(path).text for path in ("/", "/metrics", "/healthz", "/readyz")]
    watcher.send(signal.SIGTERM)
    assert watcher.wait_exit(timeout=5) == 0
    watcher.join_output()
    everything = "\n".join((watcher.all_output(), *pages))
    for form in (key, json.dumps(key)[1:-1], repr(key)[1:-1], 'FAKE"key', 'FAKE\\"key'):
        assert form not in everything
