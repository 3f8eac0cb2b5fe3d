"""The wire format: what a hostile or newer API body turns into, and the streamed list decoder."""

from __future__ import annotations

import copy
import json
import random
import tracemalloc
from typing import Any

import pytest
from support.factories import mutate, run_json

from watcher.model import (
    MAX_TEXT,
    Failed,
    Fetched,
    InvalidRun,
    ListDecoder,
    Result,
    Run,
    RunList,
    clean_text,
    parse_run,
    parse_run_response,
)


def decode(body: bytes, chunk: int | None = None) -> RunList:
    decoder = ListDecoder()
    step = chunk or max(len(body), 1)
    for start in range(0, len(body), step):
        decoder.feed(body[start : start + step])
    return decoder.finish()


def test_an_outcome_carries_a_value_exactly_when_its_result_is_ok() -> None:
    assert Fetched(parse_run(run_json()), 1, "200").result is Result.OK
    for result in Result:
        if result is not Result.OK:
            assert Failed(result, "why", 1, "error").result is result
    with pytest.raises(ValueError, match="cannot have the result 'ok'"):
        Failed(Result.OK, "", 1, "200")


def test_serverless_sampler_ids_are_null() -> None:
    body = run_json()
    body["sampler"].update(model_id=None, deployment_id=None)
    sampler = parse_run(body).sampler
    assert sampler is not None
    assert (sampler.model_id, sampler.deployment_id) == ("", "")


def test_serverless_sampler_ids_may_be_left_out_or_must_be_strings() -> None:
    body = run_json()
    del body["sampler"]["model_id"], body["sampler"]["deployment_id"]
    sampler = parse_run(body).sampler
    assert sampler is not None
    assert (sampler.model_id, sampler.deployment_id) == ("", "")
    body["sampler"]["model_id"] = 7
    with pytest.raises(InvalidRun, match="model_id is not a string"):
        parse_run(body)


def test_empty_status_name_is_a_status_like_any_undocumented_one() -> None:
    sampler = parse_run(run_json(status="")).sampler
    assert sampler is not None
    assert sampler.status == ""


@pytest.mark.parametrize(
    "text",
    ["2026-11-01t10:00:00z", "2026-11-01T10:00:00z", "2026-11-01t10:00:00.5+00:00"],
)
def test_rfc3339_lowercase_t_and_z(text: str) -> None:
    assert parse_run(run_json(created_at=text)).created_at == pytest.approx(1_793_527_200, abs=1)


@pytest.mark.parametrize("text", ["2026-11-01T10:00:00", "yesterday", "2026-13-01T00:00:00Z"])
def test_bad_times_are_invalid(text: str) -> None:
    with pytest.raises(InvalidRun, match="created_at"):
        parse_run(run_json(created_at=text))


def test_lone_surrogate_becomes_the_replacement_character() -> None:
    # json.loads turns the escape into a str that UTF-8 cannot encode: the crash of old.
    body = json.loads('{"run": ' + json.dumps(run_json(name="a\udc80b")) + "}")
    run = parse_run_response(body)
    assert run.name == "a\ufffdb"
    run.name.encode()


def test_long_text_is_capped() -> None:
    run = parse_run(run_json(name="n" * 1_000_000))
    assert len(run.name) == MAX_TEXT
    assert run.name.endswith("\u2026")
    assert clean_text("short") == "short"


def list_body(*runs: Any, **extra: Any) -> bytes:
    return json.dumps({**extra, "runs": list(runs)}).encode()


@pytest.mark.parametrize("chunk", [None, 1, 2, 3, 7, 64])
def test_streamed_list_matches_whole_decode_at_every_chunk_size(chunk: int | None) -> None:
    runs = [run_json(f"r{i}", name=f"caf\u00e9 \U0001f600 {i}") for i in range(5)]
    body = list_body(*runs, total=12345, next=None, meta={"a": [1, {"b": "]}"}]})
    result = decode(body, chunk)
    assert [run.id for run in result.runs] == [f"r{i}" for i in range(5)]
    assert result.runs == [parse_run(run) for run in runs]
    assert result.invalid == []


def test_one_bad_entry_fails_only_itself() -> None:
    bad = run_json("b2")
    del bad["session_id"]
    result = decode(list_body(run_json("a1"), bad, run_json("c3"), {"id": 42}), 10)
    assert [run.id for run in result.runs] == ["a1", "c3"]
    assert [(entry.run_id, "session_id" in str(entry)) for entry in result.invalid] == [
        ("b2", True),
        (None, False),
    ]


def test_a_list_keeps_of_each_entry_what_keep_returns() -> None:
    held = parse_run(run_json("a1"))
    body = list_body(run_json("a1"), run_json("b2"), run_json("c3", "FAILED"), {"id": 42})

    def keep(run: Run) -> Run | None:
        if run.id == "b2":
            return None
        return held if run == held else run

    for step in (1, 7, len(body)):
        decoder = ListDecoder(keep)
        for start in range(0, len(body), step):
            decoder.feed(body[start : start + step])
        result = decoder.finish()
        assert [run.id for run in result.runs] == ["a1", "c3"]
        assert result.runs[0] is held  # an unchanged run costs a reference, not a copy
        assert result.runs[1].sampler is not None
        assert result.runs[1].sampler.status == "FAILED"
        assert len(result.invalid) == 1  # a bad entry is never the keeper's to drop


def test_a_list_of_unchanged_runs_costs_no_second_copy_of_them() -> None:
    """The list's peak beyond the runs already held, counted in bytes, not timed: about 1 kB an
    entry when every entry was kept as a fresh copy, a reference each now."""
    entries = 2_000
    body = list_body(*(run_json(f"r{i:05d}", name=f"run {i}") for i in range(entries)))
    held = {run.id: run for run in decode(body, 65_536).runs}

    def keep(run: Run) -> Run | None:
        return held[run.id] if held[run.id] == run else run

    tracemalloc.start()
    try:
        decoder = ListDecoder(keep)
        for start in range(0, len(body), 65_536):
            decoder.feed(body[start : start + 65_536])
        result = decoder.finish()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert all(run is held[run.id] for run in result.runs)
    # A 64 KiB chunk of text, the entry being parsed and a pointer per kept run.
    assert peak < 3 * 65_536 + 100 * entries, peak


def test_values_many_runs_share_are_held_once() -> None:
    def parsed(run_id: str) -> Run:
        body = run_json(run_id, user={"email": "ada@example.com"})
        body["status"] = {"name": "ACTIVE"}
        body["sampler"]["instance_type"] = {"name": "1xH100"}
        return parse_run(json.loads(json.dumps(body)))  # fresh strings for every run

    first, second = parsed("a1"), parsed("b2")
    assert first.sampler is not None
    assert second.sampler is not None
    assert first.base_model is second.base_model is first.sampler.base_model
    assert first.status is second.status
    assert first.user_email is second.user_email
    assert first.sampler.status is second.sampler.status
    assert first.sampler.instance_type is second.sampler.instance_type == "1xH100"
    assert first.session_id == second.session_id  # equal, and each run's own: never shared


def test_empty_list_is_a_list() -> None:
    assert decode(b' {"runs" : [ ] } \n') == RunList([], [])


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"[]",
        b"{}",
        b'{"runs": 5}',
        b'{"runs": [] } x',
        b'{"runs": [{"id": "a"}',
        b'{"runs": [], "runs": []}',
        b'{"runs": [1 2]}',
        b'{"runs": [],}x',
        b"<html>",
        b"[" * 200_000 + b"]" * 200_000,
        b'{"runs": [' + b"[" * 200_000 + b"]" * 200_000 + b"]}",
    ],
)
def test_broken_list_bodies_are_invalid(body: bytes) -> None:
    with pytest.raises((InvalidRun, ValueError, RecursionError)):
        decode(body, 4096)


def test_a_large_single_entry_is_decoded_in_linear_time() -> None:
    huge = run_json("a1", name="x" * 4_000_000)
    result = decode(list_body(huge), 1024)  # 4,000 chunks: a square retry would take minutes
    assert len(result.runs[0].name) == MAX_TEXT


def structurally_mutated(rng: random.Random) -> dict[str, Any]:
    body = {"runs": [run_json(f"r{i}") for i in range(3)]}
    victim = copy.deepcopy(body)
    values: list[Any] = [
        None, 0, -1, 1.5, True, "", "\udc80", [], {}, "x" * 300, {"name": None}, [[[]]],
    ]  # fmt: skip
    for _ in range(rng.randint(1, 3)):
        node: Any = victim
        while isinstance(node, dict | list) and node and rng.random() < 0.8:
            key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
            if not isinstance(node[key], dict | list) or rng.random() < 0.3:
                node[key] = copy.deepcopy(rng.choice(values))
                break
            node = node[key]
    return victim


def test_fuzzed_bodies_only_ever_raise_invalid() -> None:
    """A seeded mutation loop: byte-level and structural damage to valid bodies."""
    rng = random.Random(8)
    valid = list_body(*(run_json(f"r{i}", name="n\u00e9") for i in range(3)))
    for _ in range(3000):
        body = mutate(valid, rng)
        try:
            result = decode(body, rng.choice([None, 1, 5, 64]))
        except (InvalidRun, ValueError, RecursionError):
            continue
        for run in result.runs:
            for text in (run.id, run.name, run.base_model, run.session_id):
                text.encode()  # whatever was kept is exportable
    for _ in range(1000):
        victim = structurally_mutated(rng)
        try:
            result = decode(json.dumps(victim).encode())
        except InvalidRun:
            assert not isinstance(victim.get("runs"), list)
            continue
        assert len(result.runs) + len(result.invalid) == len(victim["runs"])
