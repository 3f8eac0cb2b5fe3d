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
import tomllib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from support import Exposition
from support.e2e import FAST, StartSimulator, StartWatcher, run_watcher, watcher_env

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


# --- --once for people and for scripts ---------------------------------------------------------


def test_once_shows_only_warnings_then_the_table_then_one_line_naming_the_cause(
    start_simulator: StartSimulator,
) -> None:
    served = start_simulator(dict.fromkeys(("once-a", "once-b", "once-c"), "ACTIVE"))
    args = ("--api-url", served.url, *FAST, "--run-id", "once-a", "--run-id", "once-b")
    finished = run_watcher(
        *args, "--run-id", "once-c", "--once", "--log-format", "console",
        env=watcher_env(api_key="e2e-wrong-key-0000"),
    )  # fmt: skip
    assert finished.returncode == 3, finished.stdout + finished.stderr
    *table, summary = finished.stdout.splitlines()
    assert len(table) == 4
    assert summary == (
        f"3 runs unreadable: 401 Unauthorized from {served.url}; check BASETEN_API_KEY"
    )
    logged = finished.stderr.splitlines()
    assert logged
    assert all(" WARN " in line or " ERROR " in line for line in logged), logged
    assert any("API key rejected" in line for line in logged)
    assert all(len(line) < 200 for line in logged)

    chosen = run_watcher(*args, "--once", "--log-level", "info", "--log-format", "json")
    assert chosen.returncode == 0
    assert {json.loads(line)["event"] for line in chosen.stderr.splitlines()} >= {
        "sampler_status_observed"
    }
    assert chosen.stdout.splitlines()[-1] == "2 runs read, none failing"


def test_once_output_json_is_the_table_for_scripts(start_simulator: StartSimulator) -> None:
    served = start_simulator({"json-ok": "ACTIVE", "json-failed": "FAILED", "json-none": None})
    finished = run_watcher(
        "--api-url", served.url, *FAST, "--run-id", "json-ok", "--run-id", "json-failed",
        "--run-id", "json-none", "--run-id", "json-missing", "--once", "--output", "json",
    )  # fmt: skip
    assert finished.returncode == 1
    found = json.loads(finished.stdout)
    assert found["exit_code"] == 1
    assert found["summary"].startswith("1 run failing: name-json-failed FAILED; 1 run unreadable")
    by_run = {row["run_id"]: row for row in found["runs"]}
    assert list(by_run) == ["json-failed", "json-missing", "json-none", "json-ok"]
    assert by_run["json-ok"]["sampler_status"] == "ACTIVE"
    assert by_run["json-ok"]["result"] == "ok"
    assert by_run["json-ok"]["run_name"] == "name-json-ok"
    assert by_run["json-ok"]["created_at"].endswith("Z")
    assert by_run["json-none"]["sampler_status"] is None
    assert by_run["json-missing"] == {
        "run_id": "json-missing", "run_name": None, "sampler_status": None,
        "created_at": None, "observed_at": None, "age_seconds": None, "model_id": None,
        "deployment_id": None, "result": "not_found",
    }  # fmt: skip


def test_an_unknown_variable_exits_2_with_a_suggestion_and_kubernetes_ones_are_silent() -> None:
    kubernetes = {
        "LOOPS_WATCHER_PORT": "tcp://10.0.0.1:9877",
        "LOOPS_WATCHER_PORT_9877_TCP_ADDR": "10.0.0.1",
        "LOOPS_WATCHER_SERVICE_HOST": "10.0.0.1",
    }
    quiet = run_watcher(*API, "--run-id", "a1", "--check-config", env=watcher_env(**kubernetes))
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == ""
    typo = run_watcher(
        *API, "--run-id", "a1", env=watcher_env(**kubernetes, LOOPS_WATCHER_POLL_INTERVL="5m")
    )
    assert typo.returncode == 2
    assert typo.stderr == (
        "loops-watcher: error: environment LOOPS_WATCHER_POLL_INTERVL: not an option "
        "(did you mean LOOPS_WATCHER_POLL_INTERVAL?)\n"
    )
    # --version and --help answer whatever the environment holds.
    version = run_watcher("--version", env=watcher_env(LOOPS_WATCHER_POLL_INTERVL="5m"))
    assert version.returncode == 0, version.stderr


def test_the_demo_serves_on_loopback_unless_told_otherwise() -> None:
    finished = run_watcher("--demo", "--check-config", env=watcher_env(api_key=None))
    assert 'listen_address = "127.0.0.1:9877"' in finished.stdout
    told = run_watcher(
        "--demo",
        "--listen-address",
        "0.0.0.0:9877",
        "--check-config",
        env=watcher_env(api_key=None),
    )
    assert 'listen_address = "0.0.0.0:9877"' in told.stdout


def test_seconds_options_take_durations_end_to_end(tmp_path: Path) -> None:
    config = tmp_path / "w.toml"
    config.write_text('run_id = ["a1"]\nrequest_timeout = "1m"\n')
    finished = run_watcher(
        *API, "--config", str(config), "--poll-interval", "1h", "--check-config",
        env=watcher_env(LOOPS_WATCHER_FAST_POLL_INTERVAL="1m30s"),
    )  # fmt: skip
    assert finished.returncode == 0, finished.stderr
    shown = tomllib.loads(finished.stdout)
    assert (shown["poll_interval"], shown["fast_poll_interval"], shown["request_timeout"]) == (
        3600,
        90,
        60,
    )
