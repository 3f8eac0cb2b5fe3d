"""The Loops API simulator, exercised over loopback as its users (demo, e2e, benchmark) see it."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from pydantic import ValidationError
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from support import FAKE_KEY, FakeClock, wait_until

from watcher.model import SAMPLER_STATUSES, InvalidRun, ListDecoder, parse_run_response
from watcher.simulator import Fault, Simulator, SimulatorThread
from watcher.simulator.scenarios import RunSpec, Scenario, Step, load_scenario, synthetic_scenario

AUTH = {"Authorization": f"Bearer {FAKE_KEY}"}
# The published schema excerpt, kept in the repository (see tests/data/README.md).
OPENAPI = Path(__file__).resolve().parents[1] / "data" / "baseten-loops-openapi.json"
# Runs in the demo scenario that the tests lean on.
OWN_RUN = "k4q95w5"  # Qwen/Qwen3-8B, owned by the caller, starts SCALED_TO_ZERO
OTHER_OWNER_RUN = "0epf91d"  # owned by someone else in the org
TRAINER_ONLY_RUN = "t9lgmxg"


def _validator(schema_name: str) -> jsonschema.Draft202012Validator:
    document = json.loads(OPENAPI.read_text())
    registry: Registry[Any] = Registry().with_resource(
        "urn:loops-api", Resource.from_contents(document, default_specification=DRAFT202012)
    )
    return jsonschema.Draft202012Validator(
        {"$ref": f"urn:loops-api#/components/schemas/{schema_name}"}, registry=registry
    )


RUN_BODY = _validator("GetLoopsRunResponseV1")
LIST_BODY = _validator("ListLoopsRunsResponseV1")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def served(clock: FakeClock) -> Iterator[SimulatorThread]:
    with SimulatorThread(load_scenario("demo"), [FAKE_KEY], clock=clock) as served:
        yield served


@pytest.fixture
def sim(served: SimulatorThread) -> Simulator:
    return served.sim


@pytest.fixture
def client(served: SimulatorThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served.url, headers=AUTH, timeout=5) as client:
        yield client


def _run(client: httpx.Client, run_id: str) -> dict[str, Any]:
    response = client.get(f"/v1/loops/runs/{run_id}")
    assert response.status_code == 200, response.text
    run: dict[str, Any] = response.json()["run"]
    return run


def _status(client: httpx.Client, run_id: str) -> str | None:
    sampler = _run(client, run_id)["sampler"]
    return None if sampler is None else str(sampler["status"]["name"])


def _ids(response: httpx.Response) -> set[str]:
    assert response.status_code == 200, response.text
    return {run["id"] for run in response.json()["runs"]}


# --- the API as served -------------------------------------------------------------------------


def test_bodies_match_the_published_schema_throughout_the_demo(
    client: httpx.Client, sim: Simulator, clock: FakeClock
) -> None:
    seen: set[str] = set()
    for _ in range(120):  # the demo's first half hour
        response = client.get("/v1/loops/runs", params={"scope": "org"})
        listed = response.json()
        LIST_BODY.validate(listed)
        decoder = ListDecoder()
        decoder.feed(response.content)
        assert len(decoder.finish().runs) == 14
        for run in listed["runs"]:
            single = client.get(f"/v1/loops/runs/{run['id']}").json()
            RUN_BODY.validate(single)
            assert single["run"] == run
            for created_at in (run["created_at"], (run["sampler"] or run)["created_at"]):
                assert created_at.endswith("Z")
                assert datetime.fromisoformat(created_at).tzinfo is not None
            if run["sampler"] is not None:
                seen.add(run["sampler"]["status"]["name"])
        clock.now += 15
    # The demo never shows the unrecoverable failures (each would be one more alert than its
    # story has), but the simulator serves them like any other status.
    unrecoverable = {"DEPLOY_FAILED", "BUILD_FAILED", "BUILD_STOPPED"}
    assert seen == set(SAMPLER_STATUSES) - unrecoverable, "the demo shows every other status"
    for status in unrecoverable:
        sim.set_status(OWN_RUN, status)
        single = client.get(f"/v1/loops/runs/{OWN_RUN}").json()
        RUN_BODY.validate(single)
        assert single["run"]["sampler"]["status"]["name"] == status


def test_run_carries_every_field_the_watcher_uses(client: httpx.Client) -> None:
    run = parse_run_response(client.get(f"/v1/loops/runs/{OWN_RUN}").json())
    assert (run.id, run.base_model, run.status, run.user_email) == (
        OWN_RUN,
        "Qwen/Qwen3-8B",
        "ACTIVE",
        "ada@example.com",
    )
    assert run.sampler is not None
    assert run.sampler.status == "SCALED_TO_ZERO"
    assert run.sampler.instance_type == "1xH100"
    assert len(run.sampler.model_id) == 7
    assert run.sampler.model_id.isalnum()
    assert (
        parse_run_response(client.get(f"/v1/loops/runs/{TRAINER_ONLY_RUN}").json()).sampler is None
    )


@pytest.mark.parametrize("scheme", ["Bearer", "Api-Key", "bearer"])
def test_both_auth_schemes_are_accepted(served: SimulatorThread, scheme: str) -> None:
    response = httpx.get(
        f"{served.url}/v1/loops/runs/{OWN_RUN}", headers={"Authorization": f"{scheme} {FAKE_KEY}"}
    )
    assert response.status_code == 200


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-key-not-secret"},
        {"Authorization": f"Token {FAKE_KEY}"},
        {"Authorization": "Bearer"},
    ],
    ids=["missing", "wrong key", "unknown scheme", "no key"],
)
def test_bad_credentials_get_401_without_echoing_them(
    served: SimulatorThread, headers: dict[str, str]
) -> None:
    for path in (f"/v1/loops/runs/{OWN_RUN}", "/v1/loops/runs"):
        response = httpx.get(served.url + path, headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]
        assert "not-secret" not in response.text


def test_unknown_runs_paths_and_methods(client: httpx.Client) -> None:
    assert client.get("/v1/loops/runs/nosuch1").status_code == 404
    assert client.get("/v1/loops/runs/nosuch1").json() == {"error": "run not found"}
    assert client.get("/v1/loops/runs/a/b").status_code == 404
    assert client.get("/v1/loops/samplers").status_code == 404
    assert client.get("/").status_code == 404
    response = client.post("/v1/loops/runs", json={})
    assert response.status_code == 405
    assert response.headers["allow"] == "GET"
    assert client.delete(f"/v1/loops/runs/{OWN_RUN}").status_code == 405


def test_list_scope_and_filters(client: httpx.Client) -> None:
    own = _ids(client.get("/v1/loops/runs"))
    org = _ids(client.get("/v1/loops/runs", params={"scope": "org"}))
    assert OWN_RUN in own
    assert OTHER_OWNER_RUN not in own
    assert own < org
    assert len(org) == 14
    by_id = client.get("/v1/loops/runs", params={"scope": "org", "run_id": OTHER_OWNER_RUN})
    assert _ids(by_id) == {OTHER_OWNER_RUN}
    assert _ids(client.get("/v1/loops/runs", params={"run_id": OTHER_OWNER_RUN})) == set()
    qwen = client.get("/v1/loops/runs", params={"scope": "org", "base_model": "Qwen/Qwen3-8B"})
    assert OWN_RUN in _ids(qwen)
    assert {run["base_model"] for run in qwen.json()["runs"]} == {"Qwen/Qwen3-8B"}
    assert client.get("/v1/loops/runs", params={"scope": "everyone"}).status_code == 400


# --- timelines ---------------------------------------------------------------------------------


def _scenario(*runs: RunSpec) -> Scenario:
    return Scenario(caller="ada@example.com", runs=runs)


def _spec(run_id: str, *steps: Step, loop: bool = True, offset: float = 0.0) -> RunSpec:
    return RunSpec(
        id=run_id,
        name=run_id,
        base_model="Qwen/Qwen3-8B",
        owner="ada@example.com",
        timeline=steps,
        loop=loop,
        offset=offset,
    )


def test_timelines_follow_the_injected_clock(clock: FakeClock) -> None:
    wake = (Step("SCALED_TO_ZERO", 10), Step("WAKING_UP", 5), Step("ACTIVE", 20))
    retire = (Step("ACTIVE", 10), Step("DEACTIVATING", 5), Step("INACTIVE", 1, "INACTIVE"))
    scenario = _scenario(
        _spec("looping", *wake),
        _spec("shifted", *wake, offset=12),
        _spec("retiring", *retire, loop=False),
    )
    expected = {
        0: ("SCALED_TO_ZERO", "WAKING_UP", "ACTIVE"),
        9.9: ("SCALED_TO_ZERO", "ACTIVE", "ACTIVE"),
        10: ("WAKING_UP", "ACTIVE", "DEACTIVATING"),
        15: ("ACTIVE", "ACTIVE", "INACTIVE"),
        35: ("SCALED_TO_ZERO", "WAKING_UP", "INACTIVE"),
        1003: ("ACTIVE", "SCALED_TO_ZERO", "INACTIVE"),
    }
    start = clock.now
    with (
        SimulatorThread(scenario, [FAKE_KEY], clock=clock) as served,
        httpx.Client(base_url=served.url, headers=AUTH) as client,
    ):
        for elapsed, statuses in expected.items():
            clock.now = start + elapsed
            assert tuple(_status(client, run_id) for run_id in served.sim.run_ids) == statuses
        assert _run(client, "retiring")["status"] == {"name": "INACTIVE"}


def test_set_status_pins_the_run(client: httpx.Client, sim: Simulator, clock: FakeClock) -> None:
    sim.set_status(OWN_RUN, "FAILED")
    for _ in range(5):
        clock.now += 17
        assert _status(client, OWN_RUN) == "FAILED"
    sim.set_status(OWN_RUN, "HIBERNATING")  # an undocumented status is served as it is
    assert _status(client, OWN_RUN) == "HIBERNATING"


def test_set_run_changes_creates_and_removes(client: httpx.Client, sim: Simulator) -> None:
    sim.set_run(OWN_RUN, sampler=None, run_status="INACTIVE", name="renamed")
    body = client.get(f"/v1/loops/runs/{OWN_RUN}").json()
    RUN_BODY.validate(body)
    assert (body["run"]["sampler"], body["run"]["status"], body["run"]["name"]) == (
        None,
        {"name": "INACTIVE"},
        "renamed",
    )
    sim.set_status(OWN_RUN, "WAKING_UP")  # a trainer-only run gets its sampler back
    assert _status(client, OWN_RUN) == "WAKING_UP"

    sim.set_run("newrun1", base_model="meta-llama/Llama-3.1-8B-Instruct", owner="x@example.com")
    RUN_BODY.validate(client.get("/v1/loops/runs/newrun1").json())
    assert _status(client, "newrun1") == "ACTIVE"
    assert "newrun1" in sim.run_ids
    assert "newrun1" in _ids(client.get("/v1/loops/runs", params={"scope": "org"}))
    assert "newrun1" not in _ids(client.get("/v1/loops/runs"))

    sim.remove_run("newrun1")
    assert client.get("/v1/loops/runs/newrun1").status_code == 404
    with pytest.raises(KeyError):
        sim.remove_run("newrun1")
    with pytest.raises(ValidationError):
        sim.set_run(OWN_RUN, colour="blue")
    with pytest.raises(ValueError, match="not both"):
        sim.set_run(OWN_RUN, status="ACTIVE", sampler=None)


def test_demo_and_synthetic_scenarios() -> None:
    demo = load_scenario("demo")
    owners = {run.owner for run in demo.runs}
    assert len(demo.runs) >= 12
    assert len(owners) > 1
    assert demo.caller in owners
    assert any(run.timeline is None for run in demo.runs)
    for run in demo.runs:
        assert len(run.id) == 7
        assert run.id.isalnum()
        assert run.id.lower() == run.id
        assert {step.status for step in run.timeline or ()} <= set(SAMPLER_STATUSES)

    synthetic = synthetic_scenario(500, seed=3)
    assert synthetic == synthetic_scenario(500, seed=3)
    assert len({run.id for run in synthetic.runs}) == 500
    settled = [run for run in synthetic.runs if run.timeline and len(run.timeline) == 1]
    assert len(settled) > 400


def test_scenario_files(tmp_path: Path) -> None:
    path = tmp_path / "one.json"
    path.write_text(
        json.dumps(
            {
                "caller": "a@example.com",
                "runs": [
                    {
                        "id": "abc1234",
                        "name": "one",
                        "base_model": "Qwen/Qwen3-8B",
                        "owner": "a@example.com",
                        "timeline": [{"status": "BUILDING", "seconds": 3}],
                        "loop": False,
                    }
                ],
            }
        )
    )
    assert load_scenario(str(path)).runs[0].at(100) == Step("BUILDING", 3)
    path.write_text('{"caller": "a@example.com", "runs": [{"id": "abc1234", "timeline": null}]}')
    with pytest.raises(ValidationError, match="name"):
        load_scenario(str(path))
    with pytest.raises(FileNotFoundError):
        load_scenario(str(tmp_path / "missing.json"))


# --- faults ------------------------------------------------------------------------------------


def test_status_fault_with_retry_after_and_count(client: httpx.Client, sim: Simulator) -> None:
    sim.add_fault(Fault(kind="status", status=429, retry_after="7", count=2))
    for path in (f"/v1/loops/runs/{OWN_RUN}", "/v1/loops/runs"):
        response = client.get(path)
        assert response.status_code == 429
        assert response.headers["retry-after"] == "7"
        assert response.json() == {"error": "Too Many Requests"}
    assert client.get(f"/v1/loops/runs/{OWN_RUN}").status_code == 200

    date = "Wed, 21 Oct 2026 07:28:00 GMT"
    sim.add_fault(Fault(kind="status", status=503, retry_after=date))
    for _ in range(3):
        assert client.get("/v1/loops/runs").headers["retry-after"] == date
    sim.clear_faults()
    assert client.get("/v1/loops/runs").status_code == 200


@pytest.mark.parametrize(
    ("fault", "failing"),
    [
        (Fault(kind="status", status=500, run_id=OWN_RUN), {OWN_RUN}),
        (Fault(kind="status", status=500, run_id=OWN_RUN, endpoint="run"), {OWN_RUN}),
        (Fault(kind="status", status=500, endpoint="run"), {OWN_RUN, OTHER_OWNER_RUN}),
        (Fault(kind="status", status=500, endpoint="list"), {"list"}),
        (Fault(kind="status", status=500), {OWN_RUN, OTHER_OWNER_RUN, "list"}),
    ],
    ids=["one run", "one run explicitly", "every run", "list only", "everything"],
)
def test_faults_hit_the_requests_they_target(
    client: httpx.Client, sim: Simulator, fault: Fault, failing: set[str]
) -> None:
    sim.add_fault(fault)
    answers = {
        target: client.get("/v1/loops/runs" if target == "list" else f"/v1/loops/runs/{target}")
        for target in (OWN_RUN, OTHER_OWNER_RUN, "list")
    }
    assert {target for target, answer in answers.items() if answer.status_code == 500} == failing


def test_delay_fault_holds_only_its_own_connection(
    served: SimulatorThread, client: httpx.Client
) -> None:
    served.sim.add_fault(Fault(kind="delay", delay=0.6, run_id=OWN_RUN, count=1))
    delayed: list[float] = []

    def slow_request() -> None:
        started = time.monotonic()
        assert _run(client, OWN_RUN)["id"] == OWN_RUN
        delayed.append(time.monotonic() - started)

    thread = threading.Thread(target=slow_request)
    thread.start()
    with httpx.Client(base_url=served.url, headers=AUTH) as other:
        wait_until(
            lambda: served.sim.request_counts().get(f"/v1/loops/runs/{OWN_RUN}") == 1,
            timeout=5,
            what="the slow request to arrive",
        )
        started = time.monotonic()
        assert _run(other, OTHER_OWNER_RUN)["id"] == OTHER_OWNER_RUN
        assert time.monotonic() - started < 0.3
    thread.join(5)
    assert delayed
    assert delayed[0] >= 0.6


def test_trickle_fault_sends_a_byte_per_interval(client: httpx.Client, sim: Simulator) -> None:
    sim.add_fault(Fault(kind="trickle", trickle_interval=0.03, count=1))
    started = time.monotonic()
    response = client.get("/v1/loops/runs", params={"base_model": "none"})
    elapsed = time.monotonic() - started
    assert response.json() == {"runs": []}
    assert elapsed >= 0.03 * len(b'{"runs":[]}')
    assert elapsed < 2


def test_truncate_fault_breaks_the_body(client: httpx.Client, sim: Simulator) -> None:
    sim.add_fault(Fault(kind="truncate", count=1))
    with pytest.raises(httpx.RemoteProtocolError):
        client.get(f"/v1/loops/runs/{OWN_RUN}")
    assert _run(client, OWN_RUN)["id"] == OWN_RUN


def test_reset_fault_aborts_the_connection(client: httpx.Client, sim: Simulator) -> None:
    sim.add_fault(Fault(kind="reset", run_id=OWN_RUN, count=1))
    with pytest.raises(httpx.ReadError):
        client.get(f"/v1/loops/runs/{OWN_RUN}")
    assert _run(client, OWN_RUN)["id"] == OWN_RUN


def test_non_json_and_redirect_faults(client: httpx.Client, sim: Simulator) -> None:
    sim.add_fault(Fault(kind="non_json", count=1))
    page = client.get(f"/v1/loops/runs/{OWN_RUN}")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    with pytest.raises(json.JSONDecodeError):
        page.json()

    sim.add_fault(Fault(kind="redirect", location="https://login.example.com/", count=1))
    moved = client.get("/v1/loops/runs")
    assert moved.status_code == 302
    assert moved.headers["location"] == "https://login.example.com/"


def test_body_faults_break_the_schema_as_described(client: httpx.Client, sim: Simulator) -> None:
    sim.add_fault(Fault(kind="missing_fields", count=2))
    body = client.get(f"/v1/loops/runs/{OWN_RUN}").json()
    assert "session_id" not in body["run"]
    assert "status" not in body["run"]["sampler"]
    with pytest.raises(InvalidRun):
        parse_run_response(body)
    listed = client.get("/v1/loops/runs", params={"scope": "org"}).json()
    assert all("session_id" not in run for run in listed["runs"])

    sim.add_fault(Fault(kind="unknown_status", value="HIBERNATING", count=1))
    body = client.get(f"/v1/loops/runs/{OWN_RUN}").json()
    with pytest.raises(jsonschema.ValidationError):
        RUN_BODY.validate(body)
    sampler = parse_run_response(body).sampler
    assert sampler is not None
    assert sampler.status == "HIBERNATING"
    RUN_BODY.validate(client.get(f"/v1/loops/runs/{OWN_RUN}").json())

    sim.add_fault(Fault(kind="missing_fields", run_id="nosuch1"))
    assert client.get("/v1/loops/runs/nosuch1").json() == {"error": "run not found"}


def test_a_body_fault_for_one_run_damages_its_list_entry_only(
    client: httpx.Client, sim: Simulator
) -> None:
    sim.add_fault(Fault(kind="missing_fields", run_id=OWN_RUN, endpoint="list"))
    response = client.get("/v1/loops/runs", params={"scope": "org"})
    entries = {run["id"]: run for run in response.json()["runs"]}
    assert "session_id" not in entries[OWN_RUN]
    assert all("session_id" in run for run_id, run in entries.items() if run_id != OWN_RUN)
    decoder = ListDecoder()
    decoder.feed(response.content)
    listed = decoder.finish()
    assert [entry.run_id for entry in listed.invalid] == [OWN_RUN]
    assert len(listed.runs) == len(entries) - 1
    assert "session_id" in _run(client, OWN_RUN)  # endpoint "list": its own GET is whole


def test_deep_nesting_fault_nests_the_run(client: httpx.Client, sim: Simulator) -> None:
    sim.add_fault(Fault(kind="deep_nesting", depth=5, count=2))
    assert client.get(f"/v1/loops/runs/{OWN_RUN}").content == b'{"run":[[[[[]]]]]}'
    assert client.get("/v1/loops/runs").content == b'{"runs":[[[[[[]]]]]]}'
    assert _run(client, OWN_RUN)["id"] == OWN_RUN


def test_a_serverless_sampler_has_null_ids(client: httpx.Client, sim: Simulator) -> None:
    sim.set_run(OWN_RUN, serverless=True, name="x\udc80")
    sampler = _run(client, OWN_RUN)["sampler"]
    assert (sampler["model_id"], sampler["deployment_id"]) == (None, None)
    run = parse_run_response(client.get(f"/v1/loops/runs/{OWN_RUN}").json())
    assert run.name == "x\ufffd"
    assert run.sampler is not None
    assert run.sampler.model_id == ""


def test_oversized_fault_streams_valid_json_of_the_given_size(
    client: httpx.Client, sim: Simulator
) -> None:
    size = 3_000_000
    sim.add_fault(Fault(kind="oversized", size=size, count=1))
    response = client.get(f"/v1/loops/runs/{OWN_RUN}")
    assert int(response.headers["content-length"]) == len(response.content) == size
    assert response.json()["run"]["id"] == OWN_RUN
    assert _run(client, OWN_RUN)["id"] == OWN_RUN


def test_oversized_fault_can_leave_the_length_undeclared(
    client: httpx.Client, sim: Simulator
) -> None:
    size = 2_000_000
    sim.add_fault(Fault(kind="oversized", size=size, declare_length=False, count=1))
    response = client.get(f"/v1/loops/runs/{OWN_RUN}")
    assert "content-length" not in response.headers
    assert response.headers["connection"] == "close"
    assert len(response.content) == size
    assert response.json()["run"]["id"] == OWN_RUN
    assert _run(client, OWN_RUN)["id"] == OWN_RUN


def test_faults_are_validated() -> None:
    with pytest.raises(ValidationError, match="kind"):
        Fault(kind="gremlins")
    with pytest.raises(ValidationError):
        Fault(kind="status", status=99)
    with pytest.raises(ValidationError):
        Fault(kind="status", retry_after="1\r\nX-Injected: yes")
    with pytest.raises(ValidationError):
        Fault(kind="status", count=0)
    with pytest.raises(ValidationError, match="list endpoint"):
        Fault(kind="status", run_id=OWN_RUN, endpoint="list")
    with pytest.raises(ValidationError):
        Fault(kind="status", endpoint="sideways")  # type: ignore[arg-type]


# --- control interface -------------------------------------------------------------------------


def test_control_interface(served: SimulatorThread, client: httpx.Client) -> None:
    control = httpx.Client(base_url=served.url)  # no key: the control interface needs none
    with control:
        response = control.put(f"/_sim/runs/{OWN_RUN}", json={"status": "FAILED"})
        assert response.status_code == 200
        assert response.json()["run"]["status"] == "FAILED"
        assert _status(client, OWN_RUN) == "FAILED"
        control.put(f"/_sim/runs/{OWN_RUN}", json={"sampler": None, "run_status": "INACTIVE"})
        assert _run(client, OWN_RUN)["sampler"] is None

        assert control.put("/_sim/runs/brandnew", json={}).status_code == 200
        assert _status(client, "brandnew") == "ACTIVE"
        assert control.delete("/_sim/runs/brandnew").status_code == 200
        assert control.delete("/_sim/runs/brandnew").status_code == 404

        fault = {"kind": "status", "status": 502, "run_id": OTHER_OWNER_RUN, "count": 1}
        assert control.post("/_sim/faults", json=fault).status_code == 201
        state = control.get("/_sim/state").json()
        assert state["faults"][0]["remaining"] == 1
        runs = {run["id"]: run for run in state["runs"]}
        assert runs[OWN_RUN]["status"] is None
        assert runs[OWN_RUN]["run_status"] == "INACTIVE"
        assert runs[OWN_RUN]["pinned"] is True
        assert client.get(f"/v1/loops/runs/{OTHER_OWNER_RUN}").status_code == 502
        control.post("/_sim/faults", json={"kind": "status"})
        assert control.delete("/_sim/faults").status_code == 200
        assert control.get("/_sim/state").json()["faults"] == []

        requests = control.get("/_sim/requests").json()["requests"]
        assert requests == served.sim.request_counts()
        assert requests[f"/v1/loops/runs/{OTHER_OWNER_RUN}"] == 1
        assert not any(path.startswith("/_sim") for path in requests)


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("PUT", f"/_sim/runs/{OWN_RUN}", b"{not json"),
        ("PUT", f"/_sim/runs/{OWN_RUN}", b"[1, 2]"),
        ("PUT", f"/_sim/runs/{OWN_RUN}", b'{"colour": "blue"}'),
        ("PUT", f"/_sim/runs/{OWN_RUN}", b'{"status": 3}'),
        ("PUT", f"/_sim/runs/{OWN_RUN}", b'{"status": ""}'),
        ("PUT", f"/_sim/runs/{OWN_RUN}", b'{"sampler": {"id": "x"}}'),
        ("PUT", f"/_sim/runs/{OWN_RUN}", b'{"status": "ACTIVE", "sampler": null}'),
        ("PUT", "/_sim/runs/bad%20id", b'{"status": "ACTIVE"}'),
        ("POST", "/_sim/faults", b'{"kind": "gremlins"}'),
        ("POST", "/_sim/faults", b'{"kind": "delay", "delay": "long"}'),
        ("POST", "/_sim/faults", b'{"kind": "status", "colour": "blue"}'),
        ("POST", "/_sim/faults", b""),
    ],
)
def test_bad_control_requests_get_400(
    served: SimulatorThread, method: str, path: str, body: bytes
) -> None:
    response = httpx.request(method, served.url + path, content=body)
    assert response.status_code == 400
    assert response.json()["error"]


def test_control_routes_and_methods(served: SimulatorThread) -> None:
    with httpx.Client(base_url=served.url) as control:
        assert control.get("/_sim/nothing").status_code == 404
        assert control.get("/_sim/runs/a/b").status_code == 404
        for method, path, allowed in [
            ("GET", f"/_sim/runs/{OWN_RUN}", "PUT, DELETE"),
            ("POST", "/_sim/state", "GET"),
            ("DELETE", "/_sim/requests", "GET"),
            ("GET", "/_sim/faults", "POST, DELETE"),
        ]:
            refused = control.request(method, path)
            assert refused.status_code == 405, (method, path)
            assert refused.headers["allow"] == allowed


# --- HTTP robustness ---------------------------------------------------------------------------


def _exchange(url: str, raw: bytes) -> bytes:
    """Send raw bytes and end the stream; return everything until the server closes."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as connection:
        connection.sendall(raw)
        connection.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := connection.recv(65536):
            received += chunk
    return received


@pytest.mark.parametrize(
    "raw",
    [
        b"GARBAGE\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
        b"GET /v1/loops/runs HTTP/9.9\r\n\r\n",
        b"GET http://elsewhere/ HTTP/1.1\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"GET / HTTP/1.1\r\nno colon here\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost : x\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: -4\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: \xb2\r\n\r\n",
        b"POST /_sim/faults HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n",
        b"GET / HTTP/1.1\r\n" + b"X-Many: header\r\n" * 2000 + b"\r\n",
        b"GARBAGE WITHOUT ANY END",
    ],
)
def test_garbage_gets_400_and_the_server_lives_on(
    served: SimulatorThread, client: httpx.Client, raw: bytes
) -> None:
    answer = _exchange(served.url, raw)
    # An unfinished request is dropped silently when the client goes away.
    assert answer.startswith(b"HTTP/1.1 400 ") or (answer == b"" and b"\r\n\r\n" not in raw)
    assert _run(client, OWN_RUN)["id"] == OWN_RUN


def test_oversized_request_body_gets_413(served: SimulatorThread) -> None:
    answer = _exchange(served.url, b"PUT /_sim/runs/x HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 413 ")


def test_keep_alive_pipelining_and_connection_close(served: SimulatorThread) -> None:
    request = f"GET /v1/loops/runs/{OWN_RUN} HTTP/1.1\r\nAuthorization: Bearer {FAKE_KEY}\r\n"
    answer = _exchange(
        served.url,
        (request + "\r\n" + request + "\r\n" + request + "Connection: close\r\n\r\n").encode(),
    )
    assert answer.count(b"HTTP/1.1 200 OK") == 3
    assert answer.count(b"Connection: close") == 1
    one_zero = f"GET /v1/loops/runs HTTP/1.0\r\nAuthorization: Api-Key {FAKE_KEY}\r\n\r\n"
    assert _exchange(served.url, one_zero.encode()).startswith(b"HTTP/1.1 200 OK")


def test_simulator_on_the_callers_event_loop() -> None:
    async def scenario() -> None:
        sim = Simulator(synthetic_scenario(20), [FAKE_KEY])
        with pytest.raises(RuntimeError):
            _ = sim.url
        await sim.start()
        async with httpx.AsyncClient(base_url=sim.url, headers=AUTH) as client:
            listed = await asyncio.gather(
                *(client.get("/v1/loops/runs", params={"scope": "org"}) for _ in range(20))
            )
        assert {len(response.json()["runs"]) for response in listed} == {20}
        await sim.close()

    asyncio.run(scenario())


@pytest.mark.process
def test_command_line_serves_until_terminated() -> None:
    environment = {**os.environ, "LOOPS_SIMULATOR_API_KEY": FAKE_KEY}
    command = [sys.executable, "-m", "watcher.simulator", "--listen", "127.0.0.1:0", "--runs", "30"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=environment) as process:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert "listening on http://127.0.0.1:" in line
        url = line.split()[4]
        response = httpx.get(f"{url}/v1/loops/runs", params={"scope": "org"}, headers=AUTH)
        assert len(response.json()["runs"]) == 30
        process.terminate()
        assert process.wait(timeout=5) == 0
