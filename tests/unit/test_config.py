"""Configuration: precedence, validation messages, the key, the run-IDs file."""

from __future__ import annotations

import os
import threading
import tomllib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from support import FAKE_KEY

from watcher.cli import main
from watcher.config import (
    OPTIONS,
    ConfigError,
    Settings,
    load_settings,
    read_regular_file,
    read_run_ids_file,
    redacted,
    to_toml,
)

BASE_ENV = {"BASETEN_API_KEY": FAKE_KEY}


def load(argv: list[str], env: dict[str, str] | None = None, tty: bool = False) -> Settings:
    return load_settings(argv, {**BASE_ENV, **(env or {})}, stdout_is_tty=tty)


def test_defaults_follow_the_contract() -> None:
    settings = load(["--run-id", "abc1234"])
    assert settings.api_url == "https://api.baseten.co"
    assert settings.auth_scheme == "bearer"
    assert settings.poll_interval == 30
    assert settings.fast_poll_interval == 5
    assert settings.request_timeout == 10
    assert settings.max_retries == 3
    assert settings.max_concurrency == 16
    assert settings.max_requests_per_second == 20
    assert settings.listen_address == "0.0.0.0:9877"
    assert settings.log_format == "json"
    assert settings.log_level == "info"
    assert settings.api_key is not None
    assert settings.api_key.get_secret_value() == FAKE_KEY


def test_log_format_defaults_to_console_on_a_terminal() -> None:
    assert load(["--run-id", "a"], tty=True).log_format == "console"


def test_precedence_flag_over_env_over_file_over_default(tmp_path: Path) -> None:
    config = tmp_path / "watcher.toml"
    config.write_text(
        'poll_interval = 11\nfast_poll_interval = 2\nmax_retries = 5\nrun_id = ["f1"]\n'
    )
    env = {"LOOPS_WATCHER_POLL_INTERVAL": "12", "LOOPS_WATCHER_FAST_POLL_INTERVAL": "3"}
    settings = load(["--config", str(config), "--poll-interval", "13"], env)
    assert settings.poll_interval == 13  # flag
    assert settings.fast_poll_interval == 3  # environment
    assert settings.max_retries == 5  # file
    assert settings.request_timeout == 10  # default
    assert settings.run_id == ("f1",)


def test_config_path_from_environment(tmp_path: Path) -> None:
    config = tmp_path / "w.toml"
    config.write_text('run_id = "solo123"\n')
    settings = load([], {"LOOPS_WATCHER_CONFIG": str(config)})
    assert settings.run_id == ("solo123",)


def test_repeatable_run_id_and_env_list() -> None:
    assert load(["--run-id", "a1", "--run-id", "b2"]).run_id == ("a1", "b2")
    assert load([], {"LOOPS_WATCHER_RUN_ID": "a1, b2 c3"}).run_id == ("a1", "b2", "c3")


def test_booleans_from_environment() -> None:
    assert load([], {"LOOPS_WATCHER_DEMO": "true"}).demo
    with pytest.raises(ConfigError, match="LOOPS_WATCHER_ONCE: 'maybe' is not a boolean"):
        load(["--run-id", "a"], {"LOOPS_WATCHER_ONCE": "maybe"})


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        (
            ["--poll-interval", "abc"],
            {},
            r"--poll-interval \(from command line\): invalid value 'abc'",
        ),
        (["--poll-interval", "0"], {}, r"--poll-interval .*'0'.*greater than or equal to 0.1"),
        (["--poll-interval", "nan"], {}, r"--poll-interval .*'nan'"),
        (
            [],
            {"LOOPS_WATCHER_MAX_RETRIES": "-1"},
            r"--max-retries \(from environment LOOPS_WATCHER_MAX_RETRIES\): invalid value '-1'",
        ),
        (["--max-concurrency", "0"], {}, r"--max-concurrency .*'0'"),
        (["--api-url", "ftp://x"], {}, r"--api-url .*not an http\(s\) URL"),
        (["--listen-address", "9877"], {}, r"--listen-address .*not HOST:PORT"),
        (["--run-id", "../etc"], {}, r"--run-id .*not a run ID"),
    ],
)
def test_bad_values_name_option_source_and_value(
    argv: list[str], env: dict[str, str], expected: str
) -> None:
    with pytest.raises(ConfigError, match=expected):
        load(["--run-id", "ok1", *argv] if "--run-id" not in argv else argv, env)


def test_shard_options_from_flags_environment_and_file(tmp_path: Path) -> None:
    assert (load(["--run-id", "a"]).shard, load(["--run-id", "a"]).total_shards) == (0, 1)
    settings = load(["--run-id", "a", "--total-shards", "4", "--shard", "3"])
    assert (settings.shard, settings.total_shards) == (3, 4)
    env = {"LOOPS_WATCHER_TOTAL_SHARDS": "3", "LOOPS_WATCHER_SHARD": "2"}
    assert load(["--run-id", "a"], env).shard == 2
    config = tmp_path / "w.toml"
    config.write_text('run_id = ["a"]\ntotal_shards = 2\nshard = "auto"\n')
    from_file = load_settings(
        ["--config", str(config)], BASE_ENV, stdout_is_tty=False, hostname=lambda: "lw-1"
    )
    assert (from_file.shard, from_file.total_shards) == (1, 2)


@pytest.mark.parametrize(
    ("hostname", "ordinal"),
    [("loops-watcher-2", 2), ("loops-watcher-0.loops-watcher.monitoring.svc", 0)],
)
def test_shard_auto_takes_the_statefulset_ordinal(hostname: str, ordinal: int) -> None:
    settings = load_settings(
        ["--run-id", "a", "--total-shards", "3", "--shard", "auto"],
        BASE_ENV,
        stdout_is_tty=False,
        hostname=lambda: hostname,
    )
    assert settings.shard == ordinal
    assert redacted(settings)["shard"] == ordinal


@pytest.mark.parametrize(
    ("argv", "hostname", "expected"),
    [
        (
            ["--shard", "auto", "--total-shards", "3"],
            "worker",
            r"--shard \(from command line\): invalid value 'auto': the hostname 'worker' does "
            r"not end in -<ordinal>",
        ),
        (
            ["--shard", "auto", "--total-shards", "3"],
            "loops-watcher-3",
            r"--shard \(from command line\): invalid value auto \(hostname 'loops-watcher-3'\): "
            r"--total-shards \(from command line\) is 3, so shards are numbered 0 to 2",
        ),
        (["--shard", "1"], "x", r"--shard .*invalid value 1: --total-shards \(from default\) is 1"),
        (["--shard", "-1", "--total-shards", "2"], "x", r"--shard .*'-1': a shard is a number"),
        (["--shard", "one"], "x", r"--shard .*invalid value 'one': a shard is a number .* or auto"),
        (["--shard", "²"], "x", r"--shard .*invalid value '²'"),
        (["--total-shards", "0"], "x", r"--total-shards .*invalid value '0'"),
        (["--total-shards", "many"], "x", r"--total-shards .*invalid value 'many'"),
    ],
)
def test_bad_shard_values_name_the_option_and_value(
    argv: list[str], hostname: str, expected: str
) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_settings(
            ["--run-id", "a", *argv], BASE_ENV, stdout_is_tty=False, hostname=lambda: hostname
        )


def test_bad_file_value_names_the_file(tmp_path: Path) -> None:
    config = tmp_path / "w.toml"
    config.write_text('run_id = ["a"]\npoll_interval = "soon"\n')
    with pytest.raises(
        ConfigError, match=r"--poll-interval \(from config file .*w.toml\): invalid value 'soon'"
    ):
        load(["--config", str(config)])


def test_unknown_file_key_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "w.toml"
    config.write_text("poll_intervall = 3\n")
    with pytest.raises(ConfigError, match="unknown key 'poll_intervall'"):
        load(["--config", str(config), "--run-id", "a"])


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load(["--config", str(tmp_path / "missing.toml")])
    broken = tmp_path / "broken.toml"
    broken.write_text("poll_interval = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(["--config", str(broken)])


def test_unrelated_prefixed_variables_are_ignored() -> None:
    # Kubernetes injects LOOPS_WATCHER_PORT and friends for a Service named loops-watcher.
    env = {"LOOPS_WATCHER_PORT": "tcp://10.0.0.1:9877", "LOOPS_WATCHER_SERVICE_HOST": "10.0.0.1"}
    assert load(["--run-id", "a"], env).run_id == ("a",)


def test_missing_key_says_how_to_provide_it() -> None:
    with pytest.raises(ConfigError, match=r"BASETEN_API_KEY.*--api-key-file.*--demo"):
        load_settings(["--run-id", "a"], {}, stdout_is_tty=False)


def test_key_from_file_wins_and_is_stripped(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("file-key-1234\n")
    settings = load(["--run-id", "a", "--api-key-file", str(key_file)])
    assert settings.api_key is not None
    assert settings.api_key.get_secret_value() == "file-key-1234"


def test_bad_key_files_never_echo_the_key(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("  \n")
    with pytest.raises(ConfigError, match="is empty"):
        load(["--run-id", "a", "--api-key-file", str(empty)])
    spaced = tmp_path / "spaced"
    spaced.write_text("secret part two\n")
    with pytest.raises(ConfigError, match="whitespace") as caught:
        load(["--run-id", "a", "--api-key-file", str(spaced)])
    assert "secret" not in str(caught.value).split(":", 1)[1].replace("whitespace", "")


@pytest.mark.parametrize("argv", [["--api-key", FAKE_KEY], [f"--api-key={FAKE_KEY}"]])
def test_key_is_not_a_flag_and_is_not_echoed(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        load(["--run-id", "a", *argv])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "--api-key" in err
    assert "BASETEN_API_KEY" in err
    assert FAKE_KEY not in err


def test_nothing_to_watch() -> None:
    with pytest.raises(ConfigError, match="nothing to watch"):
        load([])


def test_demo_needs_no_key_and_no_runs() -> None:
    settings = load_settings(["--demo"], {}, stdout_is_tty=False)
    assert settings.demo
    assert settings.api_key is None


def test_run_ids_file(tmp_path: Path) -> None:
    path = tmp_path / "runs.txt"
    path.write_text("# production runs\nk4q95w5\n\n7wq2m3x  # the big one\nk4q95w5\n")
    assert read_run_ids_file(path) == ("k4q95w5", "7wq2m3x")
    path.write_text("good1\nbad id\n")
    with pytest.raises(ConfigError, match="line 2"):
        read_run_ids_file(path)


def test_run_ids_file_checked_at_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--run-ids-file: file .* does not exist"):
        load(["--run-ids-file", str(tmp_path / "nope")])


def test_effective_config_is_redacted_and_reusable(tmp_path: Path) -> None:
    settings = load(["--run-id", "a1", "--poll-interval", "7"])
    shown = redacted(settings)
    assert shown["api_key"] == "<redacted>"
    text = to_toml(shown)
    assert FAKE_KEY not in text
    reloaded = tomllib.loads(text)
    assert reloaded["poll_interval"] == 7
    assert reloaded["run_id"] == ["a1"]
    path = tmp_path / "again.toml"
    path.write_text(text)
    assert load(["--config", str(path)]).poll_interval == 7


def test_example_file_documents_every_option_with_its_default() -> None:
    example = Path(__file__).resolve().parents[2] / "config" / "watcher.example.toml"
    text = example.read_text()
    for option in OPTIONS:
        if option.name not in {"config", "check_config"}:
            assert f"{option.name} = " in text, option.name
    from_file = load(["--config", str(example), "--run-id", "a1"])
    defaults = load(["--run-id", "a1"])
    assert replace(from_file, config=None) == defaults  # `given` is left out of equality


# --- what an operator types: refused at start, one line, never the secret ----------------------


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://user:hunter2@127.0.0.1:8080", "user name or password"),
        ("https://:hunter2@api.example.com/", "user name or password"),
        ("https://token-hunter2@api.example.com", "user name or password"),
        ("http://127.0.0.1:0", "port must be a number from 1 to 65535"),
        ("http://127.0.0.1:65536", "port must be a number from 1 to 65535"),
        ("http://127.0.0.1:99999999", "port must be a number from 1 to 65535"),
        ("http://127.0.0.1:x80", "port must be a number from 1 to 65535"),
        ("https://api.example.com/?a=1", "query"),
        ("https://api.example.com/\n", "control characters"),
    ],
)
def test_api_url_with_credentials_or_a_bad_port_is_refused_without_echoing_the_password(
    url: str, reason: str
) -> None:
    with pytest.raises(ConfigError, match="--api-url") as caught:
        load(["--run-id", "a", "--api-url", url])
    message = str(caught.value)
    assert reason in message
    assert "hunter2" not in message
    assert "\n" not in message


def test_api_url_keeps_ports_in_range_and_ipv6_hosts() -> None:
    assert load(["--run-id", "a", "--api-url", "http://[::1]:65535/"]).api_url == (
        "http://[::1]:65535"
    )
    assert load(["--run-id", "a", "--api-url", "https://h.example:1"]).api_url == (
        "https://h.example:1"
    )


@pytest.mark.parametrize("run_id", ["abc\n", "abc\r\n", "\nabc", "ab\x00c", "abc "])
def test_a_run_id_with_a_line_break_or_control_character_is_refused(run_id: str) -> None:
    with pytest.raises(ConfigError, match=r"--run-id .*not a run ID") as caught:
        load(["--run-id", "good1", "--run-id", run_id])
    assert "\n" not in str(caught.value)
    assert repr(run_id) in str(caught.value)  # the bad item, shown escaped


def test_a_run_id_with_a_line_break_in_the_file_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "w.toml"
    config.write_text('run_id = ["good1", "abc\\n"]\n')
    with pytest.raises(ConfigError, match=r"--run-id \(from config file .*\): invalid value 'abc"):
        load(["--config", str(config)])


def test_a_config_file_that_is_not_utf8_is_one_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "w.toml"
    config.write_bytes(b'run_id = ["a"]\napi_url = "http://h\xff\xfe"\n')
    with pytest.raises(ConfigError, match=r"--config: .*w.toml' is not UTF-8 text") as caught:
        load(["--config", str(config)])
    assert "\n" not in str(caught.value)


def test_a_config_file_nested_too_deeply_is_one_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "w.toml"
    config.write_text("run_id = " + "[" * 50_000 + "]" * 50_000 + "\n")
    with pytest.raises(ConfigError, match="too deeply"):
        load(["--config", str(config)])


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            "poll_interval = true",
            r"--poll-interval .*invalid value True: must be a number, not a TOML boolean",
        ),
        ('demo = "yes"', r"--demo .*invalid value 'yes': must be true or false, not a TOML string"),
        ("once = 1", r"--once .*must be true or false, not a TOML integer"),
        ('max_retries = "3"', r"--max-retries .*must be a whole number, not a TOML string"),
        ("max_retries = 2.5", r"--max-retries .*must be a whole number, not a TOML float"),
        ("max_concurrency = true", r"--max-concurrency .*must be a whole number"),
        ('max_requests_per_second = "20"', r"--max-requests-per-second .*must be a number"),
        ("api_url = 8080", r"--api-url .*must be a string, not a TOML integer"),
        ("run_id = [1]", r"--run-id .*invalid value 1: must be a string"),
    ],
)
def test_toml_values_of_the_wrong_type_are_refused_not_coerced(
    tmp_path: Path, line: str, expected: str
) -> None:
    config = tmp_path / "w.toml"
    config.write_text(f"{line}\n")
    args = ["--config", str(config)] + ([] if line.startswith("run_id") else ["--run-id", "a"])
    with pytest.raises(ConfigError, match=expected):
        load(args)


def test_strings_from_flags_and_environment_are_parsed_into_their_types() -> None:
    env = {"LOOPS_WATCHER_MAX_RETRIES": " 5 ", "LOOPS_WATCHER_ONCE": "yes"}
    settings = load(["--run-id", "a", "--max-concurrency", "4", "--request-timeout", "2.5"], env)
    assert (settings.max_retries, settings.once) == (5, True)
    assert (settings.max_concurrency, settings.request_timeout) == (4, 2.5)
    with pytest.raises(ConfigError, match=r"--max-retries \(from command line\): .*'2.5'.*whole"):
        load(["--run-id", "a", "--max-retries", "2.5"])


def test_a_fast_interval_longer_than_the_slow_one_is_refused() -> None:
    with pytest.raises(
        ConfigError,
        match=r"--fast-poll-interval \(from command line\): invalid value 60: must not be "
        r"longer than --poll-interval \(from environment LOOPS_WATCHER_POLL_INTERVAL\) 30",
    ):
        load(["--run-id", "a", "--fast-poll-interval", "60"], {"LOOPS_WATCHER_POLL_INTERVAL": "30"})
    # Left at its default, the fast interval follows a short slow one down.
    settings = load(["--run-id", "a", "--poll-interval", "2"])
    assert (settings.poll_interval, settings.fast_poll_interval) == (2, 2)
    same = load(["--run-id", "a", "--poll-interval", "2", "--fast-poll-interval", "2"])
    assert same.fast_poll_interval == 2


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--poll-interval", "1e-9"], r"--poll-interval .*'1e-9'.*greater than or equal to 0.1"),
        (["--fast-poll-interval", "0.01"], r"--fast-poll-interval .*greater than or equal to 0.1"),
        (["--poll-interval", "1e9"], r"--poll-interval .*less than or equal to 86400"),
        (["--poll-interval", "inf"], r"--poll-interval .*'inf'"),
        (["--request-timeout", "1e-9"], r"--request-timeout .*greater than or equal to 0.1"),
        (["--request-timeout", "3600"], r"--request-timeout .*less than or equal to 600"),
        (["--max-requests-per-second", "1e-300"], r"--max-requests-per-second .*0.01"),
        (["--max-requests-per-second", "1e300"], r"--max-requests-per-second .*100000"),
        (["--max-concurrency", "100000"], r"--max-concurrency .*1024"),
        (["--max-retries", "1000"], r"--max-retries .*10"),
    ],
)
def test_absurd_values_are_refused(argv: list[str], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load(["--run-id", "a", *argv])


def in_thread(call: Callable[[], Any], timeout: float = 5.0) -> Any:
    """Run `call` in a daemon thread; fail (instead of hanging) if it blocks."""
    outcome: list[Any] = []

    def target() -> None:
        try:
            outcome.append(call())
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"blocked for more than {timeout} s"
    return outcome[0]


def special_file(kind: str, tmp_path: Path) -> Path:
    path = tmp_path / "run-ids"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero":
        path.symlink_to("/dev/zero")
    elif kind == "directory":
        path.mkdir()
    elif kind == "huge":
        with path.open("wb") as handle:
            handle.truncate(16 * 1024 * 1024 + 1)  # sparse: costs no disk
    return path


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("fifo", "is a FIFO, not a regular file"),
        ("dev-zero", "is a character device, not a regular file"),
        ("directory", "is a directory, not a regular file"),
        ("huge", "is larger than the 16,777,216-byte limit"),
    ],
)
def test_run_ids_file_must_be_a_bounded_regular_file(
    tmp_path: Path, kind: str, reason: str
) -> None:
    path = special_file(kind, tmp_path)
    error = in_thread(lambda: read_run_ids_file(path))
    assert isinstance(error, ConfigError)
    assert str(error) == f"--run-ids-file: {str(path)!r} {reason}"
    at_start = in_thread(lambda: load(["--run-ids-file", str(path)]))
    assert isinstance(at_start, ConfigError)
    assert str(at_start) == str(error)


def test_a_file_that_grows_past_its_cap_while_read_is_refused(tmp_path: Path) -> None:
    # /proc files report a size of 0: the cap must hold on what is read, not on what fstat says.
    assert read_regular_file(Path("/proc/self/status"), 64 * 1024, "--x").startswith(b"Name:")
    with pytest.raises(ConfigError, match="larger than the 16-byte limit"):
        read_regular_file(Path("/proc/self/status"), 16, "--x")


def test_run_ids_file_symlinked_to_a_regular_file_is_fine(tmp_path: Path) -> None:
    # Kubernetes mounts ConfigMap keys as symlinks.
    target = tmp_path / "data"
    target.write_text("k4q95w5\n")
    (tmp_path / "link").symlink_to(target)
    assert read_run_ids_file(tmp_path / "link") == ("k4q95w5",)


def test_a_config_file_or_key_file_that_is_a_fifo_does_not_block(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for argv in (["--config", str(fifo)], ["--run-id", "a", "--api-key-file", str(fifo)]):
        error = in_thread(lambda argv=argv: load(argv))  # type: ignore[misc]
        assert isinstance(error, ConfigError)
        assert "is a FIFO, not a regular file" in str(error)


@pytest.mark.parametrize("key", ["clé-0000", "key\u200b0000", "ключ"])
def test_a_non_ascii_key_is_one_clear_error(tmp_path: Path, key: str) -> None:
    with pytest.raises(ConfigError, match="BASETEN_API_KEY: the API key contains non-ASCII") as c:
        load(["--run-id", "a"], {"BASETEN_API_KEY": key})
    assert key not in str(c.value)
    key_file = tmp_path / "key"
    key_file.write_text(key + "\n")
    with pytest.raises(ConfigError, match=r"--api-key-file .*non-ASCII") as c:
        load(["--run-id", "a", "--api-key-file", str(key_file)])
    assert key not in str(c.value)
    key_file.write_bytes(b"key\xff0000\n")
    with pytest.raises(ConfigError, match=r"--api-key-file: .* is not UTF-8 text$"):
        load(["--run-id", "a", "--api-key-file", str(key_file)])


# --- durations, suggestions, the demo on loopback ----------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30),
        ("5m", 300),
        ("1h", 3600),
        ("1h30m", 5400),
        ("1d", 86400),
        ("500ms", 0.5),
        ("1m30s250ms", 90.25),
        ("45", 45),
        ("0.5", 0.5),
    ],
)
def test_every_seconds_option_takes_prometheus_durations(text: str, seconds: float) -> None:
    assert load(["--run-id", "a", "--poll-interval", text]).poll_interval == seconds
    env = {"LOOPS_WATCHER_FAST_POLL_INTERVAL": text, "LOOPS_WATCHER_POLL_INTERVAL": "1d"}
    assert load(["--run-id", "a"], env).fast_poll_interval == seconds
    if seconds <= 600:
        assert load(["--run-id", "a", "--request-timeout", text]).request_timeout == seconds


def test_durations_in_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "w.toml"
    config.write_text('run_id = ["a"]\npoll_interval = "5m"\nfast_poll_interval = 10\n')
    settings = load(["--config", str(config)])
    assert (settings.poll_interval, settings.fast_poll_interval) == (300, 10)


@pytest.mark.parametrize("text", ["5x", "m5", "1m1h", "5 m", "1.5m", "-5s", ""])
def test_a_malformed_duration_is_refused(text: str) -> None:
    with pytest.raises(
        ConfigError, match=r"--poll-interval .*not a duration: use seconds \(30, 0.5\) or 30s, 5m"
    ):
        load(["--run-id", "a", f"--poll-interval={text}"])


def test_an_unknown_flag_gets_a_suggestion(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        load(["--run-id", "a", "--pol-interval", "5", "--run-ids", "x", "--zzz"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "--pol-interval (did you mean --poll-interval?)" in err
    assert "--run-ids (did you mean --run-id?)" in err
    assert "--zzz (see --help)" in err  # nothing close: no guess
    assert "'5'" not in err


def test_an_unknown_config_key_gets_a_suggestion(tmp_path: Path) -> None:
    config = tmp_path / "w.toml"
    config.write_text("fast_pol_interval = 3\n")
    with pytest.raises(
        ConfigError, match=r"unknown key 'fast_pol_interval' \(did you mean fast_poll_interval\?\)$"
    ):
        load(["--config", str(config), "--run-id", "a"])
    config.write_text("zzz = 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'zzz' \(keys are option names"):
        load(["--config", str(config), "--run-id", "a"])


def test_an_unknown_watcher_variable_gets_a_suggestion_and_never_its_value() -> None:
    with pytest.raises(
        ConfigError,
        match=r"^environment LOOPS_WATCHER_POLL_INTERVALL: not an option "
        r"\(did you mean LOOPS_WATCHER_POLL_INTERVAL\?\)$",
    ):
        load(["--run-id", "a"], {"LOOPS_WATCHER_POLL_INTERVALL": "5"})
    with pytest.raises(ConfigError, match="LOOPS_WATCHER_API_KEY: not an option") as caught:
        load(["--run-id", "a"], {"LOOPS_WATCHER_API_KEY": "pasted-secret-0000"})
    assert "pasted-secret" not in str(caught.value)
    assert "BASETEN_API_KEY" in str(caught.value)


def test_variables_kubernetes_injects_for_the_service_stay_silent() -> None:
    env = {
        "LOOPS_WATCHER_PORT": "tcp://10.0.0.1:9877",
        "LOOPS_WATCHER_SERVICE_HOST": "10.0.0.1",
        "LOOPS_WATCHER_SERVICE_PORT": "9877",
        "LOOPS_WATCHER_SERVICE_PORT_METRICS": "9877",
        "LOOPS_WATCHER_PORT_9877_TCP": "tcp://10.0.0.1:9877",
        "LOOPS_WATCHER_PORT_9877_TCP_ADDR": "10.0.0.1",
        "LOOPS_WATCHER_PORT_9877_TCP_PORT": "9877",
        "LOOPS_WATCHER_PORT_9877_TCP_PROTO": "tcp",
    }
    assert load(["--run-id", "a"], env).run_id == ("a",)
    with pytest.raises(ConfigError, match="LOOPS_WATCHER_LISTEN_PORT: not an option"):
        load(["--run-id", "a"], {"LOOPS_WATCHER_LISTEN_PORT": "9877"})


def test_the_demo_listens_on_loopback_unless_told_otherwise() -> None:
    assert load(["--demo"]).listen_address == "127.0.0.1:9877"
    assert load(["--demo", "--listen-address", "0.0.0.0:9877"]).listen_address == "0.0.0.0:9877"
    env = {"LOOPS_WATCHER_LISTEN_ADDRESS": "[::]:9000"}
    assert load(["--demo"], env).listen_address == "[::]:9000"
    assert load(["--run-id", "a"]).listen_address == "0.0.0.0:9877"


def test_output_is_table_or_json() -> None:
    assert load(["--run-id", "a", "--once"]).output == "table"
    assert load(["--run-id", "a", "--once", "--output", "json"]).output == "json"


@pytest.mark.parametrize(
    ("value", "path"),
    [
        ("https://ops.example.com/loops-watcher/", "/loops-watcher"),
        ("http://localhost:9877", ""),
        ("/team/watcher", "/team/watcher"),
        ("/", ""),
    ],
)
def test_web_external_url_gives_the_page_its_path(value: str, path: str) -> None:
    assert load(["--run-id", "a", "--web-external-url", value]).web_path == path
    from_env = load(["--run-id", "a"], {"LOOPS_WATCHER_WEB_EXTERNAL_URL": value})
    assert from_env.web_path == path


def test_web_external_url_from_the_file(tmp_path: Path) -> None:
    config = tmp_path / "w.toml"
    config.write_text('run_id = "a1"\nweb_external_url = "/watcher"\n')
    assert load(["--config", str(config)]).web_path == "/watcher"
    assert load(["--run-id", "a"]).web_path == ""


@pytest.mark.parametrize(
    "value", ["//elsewhere.example/x", "ftp://host/x", "watcher", "/a b", "/a\x00b", "/a\u2028"]
)
def test_web_external_url_must_be_a_url_or_an_absolute_path(value: str) -> None:
    with pytest.raises(ConfigError, match=r"--web-external-url .*: invalid value"):
        load(["--run-id", "a", "--web-external-url", value])


@pytest.mark.parametrize(
    "value",
    [
        "https://user:hunter2@watcher.example/",
        "http://:hunter2@watcher.example",
        "https://hunter2@w/",
    ],
)
def test_web_external_url_with_credentials_is_refused_without_echoing_the_password(
    value: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError, match="--web-external-url") as caught:
        load(["--run-id", "a", "--web-external-url", value])
    assert "user name or password" in str(caught.value)
    assert "hunter2" not in str(caught.value)
    monkeypatch.setenv("BASETEN_API_KEY", FAKE_KEY)
    assert main(["--run-id", "a", "--web-external-url", value]) == 2
    out, err = capsys.readouterr()
    assert "user name or password" in err
    assert "hunter2" not in out + err
