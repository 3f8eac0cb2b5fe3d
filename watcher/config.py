"""Configuration: the command line, `LOOPS_WATCHER_*` variables and the TOML file, merged once.

Precedence is flag > environment > file > default. The result is one frozen `Settings` object
passed down to everything else; nothing outside this module reads the environment. Every bad
value becomes a `ConfigError` whose message names the option, where it came from and the value.

Each option's check is a small function in `_CHECKS`, run in field order once the sources are
merged, and its messages are the ones pydantic gave before: loading pydantic for two dozen
fields checked once at start made up 11 MB of the idle process's 47 MB.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import socket
import stat
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, NoReturn
from urllib.parse import urlsplit

from watcher import __version__
from watcher.sharding import hostname_ordinal

ENV_PREFIX = "LOOPS_WATCHER_"
API_KEY_ENV = "BASETEN_API_KEY"
RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
# Files are read whole, so each has a ceiling; anything but a regular file is refused.
CONFIG_FILE_CAP = 1024 * 1024
API_KEY_FILE_CAP = 64 * 1024
RUN_IDS_FILE_CAP = 16 * 1024 * 1024
# Bounds of the numeric options: beyond them a value is a typo, not a tuning choice.
MIN_SECONDS = 0.1
MAX_INTERVAL = 86_400.0
MAX_REQUEST_TIMEOUT = 600.0
MIN_RATE = 0.01
MAX_RATE = 100_000.0


class ConfigError(Exception):
    """A configuration problem the user has to fix; the message is shown as it is."""


# Prometheus's duration syntax: units from largest to smallest, each at most once.
_DURATION = re.compile(
    r"(?:(?P<y>\d+)y)?(?:(?P<w>\d+)w)?(?:(?P<d>\d+)d)?(?:(?P<h>\d+)h)?"
    r"(?:(?P<m>\d+)m)?(?:(?P<s>\d+)s)?(?:(?P<ms>\d+)ms)?"
)
_UNIT_SECONDS = {"y": 365 * 86_400, "w": 7 * 86_400, "d": 86_400, "h": 3_600, "m": 60, "s": 1}


def parse_duration(value: object) -> object:
    """Seconds from a number or a Prometheus-style duration (`30s`, `5m`, `1h30m`, `500ms`).

    A plain number is seconds, as the option names say; anything else but text is left for
    the type check to refuse (a TOML `true` is not a duration)."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    try:
        return float(text)
    except ValueError:
        pass
    match = _DURATION.fullmatch(text)
    if not text or match is None:
        raise ValueError("not a duration: use seconds (30, 0.5) or 30s, 5m, 1h, 1h30m, 500ms")
    parts = match.groupdict()
    seconds = sum(int(parts[unit] or 0) * size for unit, size in _UNIT_SECONDS.items())
    return seconds + int(parts["ms"] or 0) / 1000


def check_run_id(run_id: str) -> str:
    if not RUN_ID_PATTERN.fullmatch(run_id):
        raise ValueError(f"{run_id[:80]!r} is not a run ID (letters, digits, '_', '-', '.')")
    return run_id


def _shard_number(value: object) -> int:
    if isinstance(value, str) and re.fullmatch(r"\s*[0-9]+\s*", value):
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError("a shard is a number from 0 to --total-shards minus 1, or auto")
    return value


def check_http_url(value: str) -> str:
    """An http(s) base URL without credentials, query or fragment; the reason never quotes it."""
    if re.search(r"\s", value) or not value.isprintable():
        raise ValueError("contains whitespace or control characters")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("not an http(s) URL such as https://api.baseten.co")
    if "@" in parts.netloc:
        # httpx would send these as Basic auth instead of the key, and they would be printed.
        raise ValueError(
            "must not carry a user name or password (user:password@host); "
            f"the API key comes from {API_KEY_ENV} or --api-key-file"
        )
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise ValueError("the port must be a number from 1 to 65535")
    if parts.query or parts.fragment or value.endswith(("?", "#")):
        raise ValueError("must not have a query (?) or fragment (#)")
    return value.rstrip("/")


def hide_userinfo(text: str) -> str:
    """`scheme://user:password@host` with the credentials replaced, for error messages."""
    return re.sub(r"(?<=://)[^/?#]*@", "<redacted>@", text)


@dataclass(frozen=True, slots=True)
class ListenAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_listen_address(text: str) -> ListenAddress:
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r} is not HOST:PORT (for example 0.0.0.0:9877 or [::]:9877)")
    host = host.removeprefix("[").removesuffix("]")
    return ListenAddress(host or "0.0.0.0", int(port_text))


class Secret:
    """A value kept out of reprs and tracebacks; `get_secret_value()` is the one way to read it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get_secret_value(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True, slots=True)
class Settings:
    """The effective configuration; validated once at start (`load_settings`), never changed."""

    config: Path | None = None
    api_url: str = "https://api.baseten.co"
    api_key_file: Path | None = None
    auth_scheme: Literal["bearer", "api-key"] = "bearer"
    run_id: tuple[str, ...] = ()
    run_ids_file: Path | None = None
    discover: Literal["own", "org"] | None = None
    discover_base_model: str | None = None
    poll_interval: float = 30.0
    fast_poll_interval: float = 5.0
    request_timeout: float = 10.0
    max_retries: int = 3
    max_concurrency: int = 16
    max_requests_per_second: float = 20.0
    state_file: Path | None = None
    total_shards: int = 1
    shard: int = 0  # `auto` is resolved before
    max_list_body_bytes: int = 64 * 1024 * 1024
    web_external_url: str | None = None
    listen_address: str = "0.0.0.0:9877"
    log_format: Literal["json", "console"] = "json"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    demo: bool = False
    check_config: bool = False
    once: bool = False
    output: Literal["table", "json"] = "table"
    # Not an option: loaded from --api-key-file or BASETEN_API_KEY, never from a flag.
    api_key: Secret | None = None
    # The fields given a value rather than left at their default (the user's choices).
    given: frozenset[str] = field(default=frozenset(), compare=False)

    def updated(self, **changes: Any) -> Settings:
        """These settings with some fields set, counted as given; nothing is checked again."""
        return replace(self, given=self.given | changes.keys(), **changes)

    @property
    def web_path(self) -> str:
        """The path the endpoints are reached under, without a trailing slash ('' for /)."""
        url = self.web_external_url or ""
        path = re.sub(r"^https?://[^/]+", "", url)
        return path.rstrip("/")

    @property
    def listen(self) -> ListenAddress:
        return parse_listen_address(self.listen_address)


class _Invalid(ValueError):
    """A field's value refused: why, whether for its type, which item of a list; the field's
    name is added by `_checked`."""

    def __init__(self, reason: str, *, wrong_type: bool = False, index: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.wrong_type = wrong_type
        self.index = index
        self.name = ""


Check = Callable[[Any], Any]


def _type(kind: type, reason: str) -> Check:
    """Exactly this type (TOML values are not converted; `True` is not a number)."""
    allowed = (int, float) if kind is float else (kind,)

    def check(value: Any) -> Any:
        exact = isinstance(value, allowed) and isinstance(value, bool) is (kind is bool)
        if not exact:
            raise _Invalid(reason, wrong_type=True)
        return float(value) if kind is float else value

    return check


_STR = _type(str, "must be a string")
_INT = _type(int, "must be a whole number")
_FLOAT = _type(float, "must be a number")
_BOOL = _type(bool, "must be true or false")


def _bound(limit: float) -> str:
    return str(int(limit)) if float(limit).is_integer() else repr(limit)


def _within(kind: Check, low: float, high: float) -> Check:
    """A value of the kind between two bounds; NaN and infinities are outside them."""

    def check(value: Any) -> Any:
        value = kind(value)
        if not value <= high:
            raise _Invalid(f"Input should be less than or equal to {_bound(high)}")
        if not value >= low:
            raise _Invalid(f"Input should be greater than or equal to {_bound(low)}")
        return value

    return check


def _seconds(low: float, high: float) -> Check:
    bounded = _within(_FLOAT, low, high)

    def check(value: Any) -> Any:
        try:
            value = parse_duration(value)
        except ValueError as exc:
            raise _Invalid(str(exc)) from None
        return float(bounded(value))

    return check


def _one_of(*choices: str) -> Check:
    quoted = [repr(choice) for choice in choices]
    reason = f"Input should be {', '.join(quoted[:-1])} or {quoted[-1]}"

    def check(value: Any) -> Any:
        if not isinstance(value, str) or value not in choices:
            raise _Invalid(reason)
        return value

    return check


def _path(value: Any) -> Path:
    if not isinstance(value, str):
        raise _Invalid("Input is not a valid path for <class 'pathlib.Path'>")
    return Path(value)


def _then(first: Check, second: Callable[[Any], object]) -> Check:
    """`first`, then `second` on its result (its ValueError is the reason); `first`'s value."""

    def check(value: Any) -> Any:
        value = first(value)
        try:
            second(value)
        except ValueError as exc:
            raise _Invalid(str(exc)) from None
        return value

    return check


def _run_ids(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list | tuple):
        raise _Invalid("Input should be a valid tuple")
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise _Invalid("must be a string", wrong_type=True, index=index)
        try:
            check_run_id(item)
        except ValueError as exc:
            raise _Invalid(str(exc), index=index) from None
    return tuple(value)


def _shard(value: Any) -> int:
    try:
        return _shard_number(value)
    except ValueError as exc:
        raise _Invalid(str(exc)) from None


def _api_url(value: Any) -> str:
    try:
        return check_http_url(_STR(value))
    except _Invalid:
        raise
    except ValueError as exc:
        raise _Invalid(str(exc)) from None


def _check_external_url(value: str) -> None:
    if re.match(r"https?://", value):
        check_http_url(value)  # refuses credentials without quoting them
    url = r"^(https?://[^/\s?#]+)?(/(?!/)[^\s?#]*)?$"
    if not (value.isprintable() and re.match(url, value)):
        raise ValueError("not a URL or path such as https://example.com/watcher or /watcher")


# How each option's merged value is checked and converted, in field order.
_CHECKS: dict[str, Check] = {
    "config": _path,
    "api_url": _api_url,
    "api_key_file": _path,
    "auth_scheme": _one_of("bearer", "api-key"),
    "run_id": _run_ids,
    "run_ids_file": _path,
    "discover": _one_of("own", "org"),
    "discover_base_model": _STR,
    "poll_interval": _seconds(MIN_SECONDS, MAX_INTERVAL),
    "fast_poll_interval": _seconds(MIN_SECONDS, MAX_INTERVAL),
    "request_timeout": _seconds(MIN_SECONDS, MAX_REQUEST_TIMEOUT),
    "max_retries": _within(_INT, 0, 10),
    "max_concurrency": _within(_INT, 1, 1024),
    "max_requests_per_second": _within(_FLOAT, MIN_RATE, MAX_RATE),
    "state_file": _path,
    "total_shards": _within(_INT, 1, 1000),
    "shard": _shard,
    "max_list_body_bytes": _within(_INT, 1024 * 1024, 2**32),
    "web_external_url": _then(_STR, _check_external_url),
    "listen_address": _then(_STR, parse_listen_address),
    "log_format": _one_of("json", "console"),
    "log_level": _one_of("debug", "info", "warning", "error"),
    "demo": _BOOL,
    "check_config": _BOOL,
    "once": _BOOL,
    "output": _one_of("table", "json"),
}


def _checked(values: Mapping[str, Any]) -> Settings:
    """Settings from merged values; raises _Invalid, naming it, for the first bad field."""
    checked = {}
    for name in (f.name for f in fields(Settings)):
        if name in values:
            try:
                checked[name] = _CHECKS[name](values[name])
            except _Invalid as exc:
                exc.name = name
                raise
    return Settings(**checked, given=frozenset(values))


# Options as the user spells them; `kind` decides how a string from the environment is read.
@dataclass(frozen=True, slots=True)
class Option:
    name: str  # snake_case: the TOML key and the Settings field
    kind: Literal["str", "path", "int", "float", "seconds", "bool", "list"]
    help: str
    metavar: str | None = None
    choices: tuple[str, ...] | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


OPTIONS: tuple[Option, ...] = (
    Option("config", "path", "TOML configuration file (examples in config/)", "PATH"),
    Option("api_url", "str", "Baseten API base URL (default https://api.baseten.co)", "URL"),
    Option(
        "api_key_file",
        "path",
        f"file holding the API key; otherwise {API_KEY_ENV} is read from the environment",
        "PATH",
    ),
    Option("auth_scheme", "str", "Authorization header scheme", choices=("bearer", "api-key")),
    Option("run_id", "list", "a run to watch (repeatable)", "ID"),
    Option("run_ids_file", "path", "file with one run ID a line; re-read on change", "PATH"),
    Option("discover", "str", "also watch every run the key can list", choices=("own", "org")),
    Option("discover_base_model", "str", "with --discover: only runs of this base model", "MODEL"),
    Option("poll_interval", "seconds", "interval between polls of a settled run (30s)", "SECONDS"),
    Option("fast_poll_interval", "seconds", "interval for a changing run (5s)", "SECONDS"),
    Option("request_timeout", "seconds", "deadline for one HTTP attempt, body included (10s)", "S"),
    Option("max_retries", "int", "retries of one poll on transient failure (3)", "N"),
    Option("max_concurrency", "int", "requests in flight at once (16)", "N"),
    Option("max_requests_per_second", "float", "global cap on requests to the API (20)", "R"),
    Option("state_file", "path", "SQLite file keeping per-run state across restarts", "PATH"),
    Option("total_shards", "int", "split the runs among N watchers by their ID's hash (1)", "N"),
    Option("shard", "str", "this watcher's shard: 0 to N-1, or auto (hostname's ordinal)", "I"),
    Option("max_list_body_bytes", "int", "largest list response read, in bytes (64 MiB)", "N"),
    Option(
        "web_external_url",
        "str",
        "URL or path prefix the endpoints are reached under, for the status page's links",
        "URL",
    ),
    Option("listen_address", "str", "where /metrics is served (0.0.0.0:9877)", "HOST:PORT"),
    Option("log_format", "str", "json unless stdout is a terminal", choices=("json", "console")),
    Option("log_level", "str", "minimum log level", choices=("debug", "info", "warning", "error")),
    Option("demo", "bool", "watch the built-in Loops API simulator; no key needed"),
    Option("check_config", "bool", "validate and print the effective configuration, then exit"),
    Option("once", "bool", "poll every run once, print a table and exit"),
    Option("output", "str", "with --once: the table as text or JSON", choices=("table", "json")),
)
_BY_NAME = {option.name: option for option in OPTIONS}
# Kubernetes injects these for a Service named loops-watcher; they are not options.
_KUBERNETES_SERVICE_VARIABLE = re.compile(
    ENV_PREFIX + r"(?:SERVICE_HOST|SERVICE_PORT(?:_[A-Z0-9_]+)?"
    r"|PORT(?:_[0-9]+_(?:TCP|UDP|SCTP)(?:_(?:PROTO|PORT|ADDR))?)?)"
)
DEMO_LISTEN_ADDRESS = "127.0.0.1:9877"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def did_you_mean(word: str, known: Iterable[str]) -> str:
    """` (did you mean X?)` for the closest known spelling, or nothing when none is close."""
    close = difflib.get_close_matches(word, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


class _Parser(argparse.ArgumentParser):
    """An argument parser that never echoes stray values: one might be a pasted API key."""

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments:"):
            tokens = message.split(":", 1)[1].split()
            flags = [token.split("=", 1)[0] for token in tokens if token.startswith("-")]
            known = [option.flag for option in OPTIONS] + ["--help", "--version"]
            shown = [flag + did_you_mean(flag, known) for flag in flags]
            message = "unrecognized arguments: " + (", ".join(shown) or "(values not shown)")
            if any(flag.startswith("--api-key") for flag in flags):
                message += f"; the key is never a flag: set {API_KEY_ENV} or use --api-key-file"
        # One line, like every other configuration error, instead of argparse's usage block.
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="loops-watcher",
        allow_abbrev=False,
        description="Watch Baseten Loops runs and export their sampler status to Prometheus.",
        epilog=f"Every option also reads {ENV_PREFIX}<OPTION> from the environment and "
        "<option> from the TOML file; precedence: flag > environment > file > default.",
        argument_default=argparse.SUPPRESS,
    )
    for option in OPTIONS:
        if option.kind == "bool":
            parser.add_argument(option.flag, action="store_true", help=option.help)
        elif option.kind == "list":
            parser.add_argument(
                option.flag, action="append", help=option.help, metavar=option.metavar
            )
        else:
            parser.add_argument(
                option.flag, help=option.help, metavar=option.metavar, choices=option.choices
            )
    parser.add_argument("--version", action="version", version=f"loops-watcher {__version__}")
    return parser


def _typed(name: str, value: Any, source: str) -> Any:
    return _from_text(_BY_NAME[name], value, source) if isinstance(value, str) else value


def _from_text(option: Option, text: str, source: str) -> Any:
    """A flag's or variable's text as the option's type; TOML values arrive typed already."""
    try:
        if option.kind == "int":
            return int(text.strip())
        if option.kind == "float":
            return float(text.strip())
    except ValueError:
        noun = "a whole number" if option.kind == "int" else "a number"
        raise ConfigError(
            f"{option.flag} (from {source}): invalid value {_shown(text)}: must be {noun}"
        ) from None
    if option.kind == "bool":
        lowered = text.strip().lower()
        if lowered in _TRUE | _FALSE:
            return lowered in _TRUE
        raise ConfigError(f"{option.env}: {_shown(text)} is not a boolean (use true or false)")
    if option.kind == "list":
        return [item for item in re.split(r"[\s,]+", text) if item]
    return text


_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _refuse_irregular(mode: int, size: int, cap: int) -> str | None:
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")
        return f"is {kind}, not a regular file"
    if size > cap:
        return f"is larger than the {cap:,}-byte limit"
    return None


def read_regular_file(path: Path, cap: int, flag: str) -> bytes:
    """The whole content of a regular file of at most `cap` bytes, or a ConfigError.

    Never blocks on a FIFO or reads an endless device: the path is checked before opening,
    opened non-blocking, checked again on the open descriptor, and read to at most cap+1 bytes
    (a file can grow, and some report a size of 0)."""
    where = repr(str(path))
    try:
        reason = _refuse_irregular(os.stat(path).st_mode, 0, cap)
        if reason is None:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
            try:
                info = os.fstat(fd)
                reason = _refuse_irregular(info.st_mode, info.st_size, cap)
                if reason is None:
                    chunks, size = [], 0
                    while size <= cap and (chunk := os.read(fd, cap + 1 - size)):
                        chunks.append(chunk)
                        size += len(chunk)
                    if size <= cap:
                        return b"".join(chunks)
                    reason = _refuse_irregular(info.st_mode, size, cap)
            finally:
                os.close(fd)
    except FileNotFoundError:
        raise ConfigError(f"{flag}: file {where} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"{flag}: cannot read {where}: {exc.strerror or exc}") from None
    raise ConfigError(f"{flag}: {where} {reason}")


def _read_text(path: Path, cap: int, flag: str) -> str:
    data = read_regular_file(path, cap, flag)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{flag}: {str(path)!r} is not UTF-8 text (byte {exc.start + 1} is not)"
        ) from None


def _read_toml(path: Path) -> dict[str, Any]:
    text = _read_text(path, CONFIG_FILE_CAP, "--config")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config: {str(path)!r} is not valid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"--config: {str(path)!r} nests arrays or tables too deeply") from None
    unknown = sorted(set(data) - set(_BY_NAME) | ({"config"} & set(data)))
    if unknown:
        key = unknown[0]
        hint = did_you_mean(key, set(_BY_NAME) - {"config"}) or (
            " (keys are option names in snake_case, such as poll_interval)"
        )
        raise ConfigError(f"--config: {str(path)!r} has unknown key {_shown(key)}{hint}")
    if isinstance(data.get("run_id"), str):
        data["run_id"] = [data["run_id"]]
    return data


def read_api_key(path: Path) -> Secret:
    # The decode error would quote the key's bytes: say only that it is not UTF-8.
    data = read_regular_file(path, API_KEY_FILE_CAP, "--api-key-file")
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ConfigError(f"--api-key-file: {str(path)!r} is not UTF-8 text") from None
    if not text:
        raise ConfigError(f"--api-key-file: {str(path)!r} is empty")
    return _check_key(text, f"--api-key-file {str(path)!r}")


def _check_key(key: str, source: str) -> Secret:
    # Never echo the key itself, only where it came from.
    if not key.isascii():
        raise ConfigError(f"{source}: the API key contains non-ASCII characters")
    if any(ch.isspace() or not ch.isprintable() for ch in key):
        raise ConfigError(f"{source}: the API key contains whitespace or control characters")
    return Secret(key)


def _shown(value: Any, limit: int = 100) -> str:
    """A value for an error message: one line, bounded, credentials in URLs hidden."""
    text = repr(hide_userinfo(value) if isinstance(value, str) else value)
    return text if len(text) <= limit else text[:limit] + "..."


def _describe(name: str, sources: Mapping[str, str]) -> str:
    option = _BY_NAME.get(name)
    if option is None:
        return name
    source = sources.get(name, "default")
    return f"{option.flag} (from {source})"


def _invalid_message(
    invalid: _Invalid, values: Mapping[str, Any], sources: Mapping[str, str]
) -> str:
    name = invalid.name
    value = values.get(name)
    if invalid.index is not None and isinstance(value, list | tuple):
        value = value[invalid.index]  # the one bad item of a list
    reason = invalid.reason
    if invalid.wrong_type and sources.get(name, "").startswith("config file"):
        reason += f", not a TOML {_TOML_TYPES.get(type(value), type(value).__name__)}"
    return f"{_describe(name, sources)}: invalid value {_shown(value)}: {reason}"


_TOML_TYPES = {bool: "boolean", int: "integer", float: "float", str: "string", list: "array"}


def load_settings(
    argv: Sequence[str] | None,
    environ: Mapping[str, str],
    *,
    stdout_is_tty: bool,
    hostname: Callable[[], str] = socket.gethostname,
) -> Settings:
    """Parse, merge and validate; raise ConfigError (exit 2) on any bad input."""
    given = vars(build_parser().parse_args(argv))  # --help and --version exit here
    _refuse_unknown_variables(environ)
    environment_given = {
        option.name: environ[option.env] for option in OPTIONS if option.env in environ
    }
    flags = {name: _typed(name, value, "command line") for name, value in given.items()}
    env_values = {
        name: _typed(name, text, f"environment {_BY_NAME[name].env}")
        for name, text in environment_given.items()
    }
    config_path = flags.get("config", env_values.get("config"))
    file_values = _read_toml(Path(config_path)) if config_path else {}

    values: dict[str, Any] = {}
    said: dict[str, Any] = {}  # each value as the user wrote it, for error messages
    sources: dict[str, str] = {}
    for layer, raw, label in (
        (file_values, file_values, f"config file {config_path}"),
        (env_values, environment_given, "environment"),
        (flags, given, "command line"),
    ):
        for name, value in layer.items():
            values[name], said[name] = value, raw[name]
            sources[name] = f"environment {_BY_NAME[name].env}" if label == "environment" else label
    values.setdefault("log_format", "console" if stdout_is_tty else "json")
    shown_shard = values.get("shard")
    if str(shown_shard).strip().lower() == "auto":
        name = hostname()
        values["shard"] = _shard_from_hostname(name, sources)
        shown_shard = f"auto (hostname {name!r})"

    try:
        settings = _checked(values)
    except _Invalid as exc:
        raise ConfigError(_invalid_message(exc, said, sources)) from None
    if settings.shard >= settings.total_shards:
        raise ConfigError(
            f"{_describe('shard', sources)}: invalid value {shown_shard}: "
            f"{_describe('total_shards', sources)} is {settings.total_shards}, so shards "
            f"are numbered 0 to {settings.total_shards - 1}"
        )
    settings = _fit_fast_interval(settings, sources)

    if settings.demo:
        # The demo is for this machine's eyes: no endpoint on the network unless asked for.
        if "listen_address" not in sources:
            settings = settings.updated(listen_address=DEMO_LISTEN_ADDRESS)
        return settings
    if settings.api_key_file is not None:
        key = read_api_key(settings.api_key_file)
    elif environ.get(API_KEY_ENV):
        key = _check_key(environ[API_KEY_ENV], API_KEY_ENV)
    else:
        raise ConfigError(
            f"no API key: put it in the environment as {API_KEY_ENV}, or in a file named by "
            f"--api-key-file (or {ENV_PREFIX}API_KEY_FILE, or api_key_file in the config file); "
            "to try the watcher without a key, run it with --demo"
        )
    if not (settings.run_id or settings.run_ids_file or settings.discover):
        raise ConfigError(
            "nothing to watch: give --run-id ID (repeatable), --run-ids-file PATH or "
            "--discover own|org"
        )
    if settings.run_ids_file is not None:
        read_run_ids_file(settings.run_ids_file)  # fail at start, not on the first re-read
    return settings.updated(api_key=key)


def _shard_from_hostname(hostname: str, sources: Mapping[str, str]) -> int:
    ordinal = hostname_ordinal(hostname)
    if ordinal is None:
        raise ConfigError(
            f"{_describe('shard', sources)}: invalid value 'auto': the hostname {hostname!r} "
            "does not end in -<ordinal> as a StatefulSet pod's does (loops-watcher-2); "
            "give the shard number instead"
        )
    return ordinal


def _refuse_unknown_variables(environ: Mapping[str, str]) -> None:
    known = [option.env for option in OPTIONS]
    for name in sorted(environ):
        if (
            name.startswith(ENV_PREFIX)
            and name not in known
            and not _KUBERNETES_SERVICE_VARIABLE.fullmatch(name)
        ):
            # Never its value: it might be a key put in the wrong variable.
            note = (
                f"; the key is read from {API_KEY_ENV} or --api-key-file" if "KEY" in name else ""
            )
            raise ConfigError(f"environment {name}: not an option{did_you_mean(name, known)}{note}")


def _fit_fast_interval(settings: Settings, sources: Mapping[str, str]) -> Settings:
    """Transitional runs are never polled less often than settled ones.

    A fast interval the user chose larger than the slow one is a mistake; the default one
    simply follows a short `--poll-interval` down."""
    fast, slow = settings.fast_poll_interval, settings.poll_interval
    if fast <= slow:
        return settings
    if "fast_poll_interval" in sources:
        raise ConfigError(
            f"{_describe('fast_poll_interval', sources)}: invalid value {fast:g}: must not be "
            f"longer than {_describe('poll_interval', sources)} {slow:g}"
        )
    return settings.updated(fast_poll_interval=slow)


def read_run_ids_file(path: Path) -> tuple[str, ...]:
    """One run ID a line; `#` starts a comment; blank lines are ignored; order kept, no repeats."""
    text = _read_text(path, RUN_IDS_FILE_CAP, "--run-ids-file")
    ids: dict[str, None] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        run_id = line.split("#", 1)[0].strip()
        if not run_id:
            continue
        try:
            ids[check_run_id(run_id)] = None
        except ValueError as exc:
            raise ConfigError(f"--run-ids-file: {str(path)!r} line {number}: {exc}") from None
    return tuple(ids)


def redacted(settings: Settings) -> dict[str, Any]:
    """The effective configuration with the key replaced by a note saying it is set."""
    shown: dict[str, Any] = {}
    for option in OPTIONS:
        value = getattr(settings, option.name)
        if value is None or option.name in {"check_config"}:
            continue
        shown[option.name] = (
            list(value)
            if isinstance(value, tuple)
            else (str(value) if isinstance(value, Path) else value)
        )
    shown["api_key"] = "<redacted>" if settings.api_key is not None else None
    return shown


def to_toml(values: Mapping[str, Any]) -> str:
    """Render flat settings as TOML, so `--check-config` output can be reused as a config file."""
    lines = []
    for name, value in values.items():
        if name == "api_key":
            state = "set (redacted)" if value else "not set"
            lines.append(f"# api key: {state}; it is never printed")
        elif name == "config":
            lines.insert(0, f"# read from {value}")
        elif value is not None:
            lines.append(f"{name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def environment() -> Mapping[str, str]:
    """The process environment; the one place it is read."""
    return os.environ
