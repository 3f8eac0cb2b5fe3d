"""The status page and its JSON API, rendered from tracker records without a server."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import Awaitable, Mapping
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import jsonschema
import pytest
from support import factories
from support.factories import make_run

from watcher.model import Result, Run, parse_run
from watcher.page import (
    CACHE_KEPT,
    CLASS_ORDER,
    PAGE_SIZE,
    SECURITY_HEADERS,
    Page,
    Problem,
    Query,
    duration,
    iso,
    render_page,
    run_json,
)
from watcher.server import Request, Response
from watcher.tracker import RunRecord, Tracker

SCHEMA = json.loads(
    (Path(__file__).resolve().parents[2] / "docs" / "api-v1-runs.schema.json").read_text()
)
NOW = 1_800_000_000.0
HOSTILE = '<img src=x onerror="alert(1)">\'&\udc80'


def validate(document: Any) -> None:
    jsonschema.validate(document, SCHEMA)


def read(tracker: Tracker, run: Run, now: float) -> None:
    """A successful poll of `run`, as the watcher records it."""
    tracker.observe(run, now)
    tracker.record_poll(run.id, Result.OK, now)


def world() -> Tracker:
    """Runs in most classes: failing with history, ready, idle, no sampler, never read."""
    tracker = Tracker()
    read(tracker, make_run("ACTIVE", "fail001", user_email="ada@example.com"), NOW - 600)
    read(tracker, make_run("UNHEALTHY", "fail001", user_email="ada@example.com"), NOW - 90)
    read(
        tracker,
        make_run("ACTIVE", "ready01", base_model="Qwen/Qwen3-32B", name="qwen-big"),
        NOW - 30,
    )
    read(tracker, make_run("SCALED_TO_ZERO", "idle001"), NOW - 20)
    read(tracker, make_run(None, "trainer"), NOW - 10)
    tracker.watch("unread1")
    tracker.record_poll("unread1", Result.NOT_FOUND, NOW - 5)
    return tracker


class Elements(HTMLParser):
    """Every start tag with its attributes, and the text of the page."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def rows(self) -> list[str]:
        return [str(a["data-run-id"]) for tag, a in self.tags if tag == "tr" and "data-run-id" in a]


def parse(query: str) -> Query:
    return Query.parse(parse_qs(query))


async def awaited(answer: Awaitable[Response]) -> Response:
    return await answer


def get(api: Page, path: str, query: str = "") -> tuple[int, bytes, str, Mapping[str, str]]:
    """Answer as the server would: the exact route, else the longest one ending in `/` above."""
    routes = api.routes()
    below = [p for p in routes if p.endswith("/") and p != "/" and path.startswith(p)]
    handler = routes.get(path) or routes[max(below, key=len)]
    answer = handler(Request("GET", path, parse_qs(query), {}))
    reply = answer if isinstance(answer, Response) else asyncio.run(awaited(answer))
    body = reply.body if isinstance(reply.body, bytes) else b"".join(reply.body)
    return reply.status, body, reply.content_type, reply.headers


def page(tracker: Tracker, query: str = "", problems: tuple[Problem, ...] = ()) -> str:
    return render_page(
        list(tracker.runs.values()),
        query=parse(query),
        problems=problems,
        version="1.2.3",
        now=NOW,
        base="",
    )


# --- JSON --------------------------------------------------------------------------------


def test_a_run_with_history_as_json() -> None:
    found = run_json(world().runs["fail001"])
    validate({"generated_at": "2027-01-15T08:00:00.000Z", "run": found})
    assert found["status"] == "UNHEALTHY"
    assert found["status_class"] == "failing"
    assert found["owner"] == "ada@example.com"
    assert found["status_since"] == "2027-01-15T07:58:30.000Z"
    assert found["status_since_exact"] is True
    assert found["transitions"] == [
        {"at": "2027-01-15T07:58:30.000Z", "from_status": "ACTIVE", "to_status": "UNHEALTHY"}
    ]
    assert found["last_poll"] == {
        "result": "ok",
        "at": "2027-01-15T07:58:30.000Z",
        "consecutive_failures": 0,
    }


def test_unread_and_samplerless_runs_as_json() -> None:
    runs = world().runs
    unread = run_json(runs["unread1"])
    assert unread["status_class"] == "unread"
    assert unread["name"] is None
    assert unread["last_poll"]["result"] == "not_found"
    assert unread["last_success_at"] is None
    trainer = run_json(runs["trainer"])
    assert trainer["status_class"] == "no_sampler"
    assert trainer["sampler"] is None
    assert trainer["status"] is None
    assert run_json(RunRecord("fresh01"))["last_poll"] is None


def test_the_list_follows_its_schema_and_filters_by_class() -> None:
    tracker = world()
    api = Page(lambda: tracker.runs, lambda: [], lambda: NOW, version="1.2.3")
    status, body, content_type, headers = get(api, "/api/v1/runs", "")
    assert (status, content_type) == (200, "application/json")
    assert headers["Content-Security-Policy"] == SECURITY_HEADERS["Content-Security-Policy"]
    document = json.loads(body)
    validate(document)
    assert [run["run_id"] for run in document["runs"]] == list(tracker.runs)
    assert document["counts"]["failing"] == 1
    assert set(document["counts"]) == set(CLASS_ORDER)
    assert document["watcher"] == {"version": "1.2.3", "watched_runs": 5, "problems": []}

    _, body, _, _ = get(api, "/api/v1/runs", "status_class=failing")
    failing = json.loads(body)
    assert [run["run_id"] for run in failing["runs"]] == ["fail001"]
    assert failing["counts"] == document["counts"]  # counts are over every watched run
    _, body, _, _ = get(api, "/api/v1/runs", "status_class=idle,no_sampler&q=IDLE")
    assert [run["run_id"] for run in json.loads(body)["runs"]] == ["idle001"]


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("status_class=broken", "status_class: 'broken' is not one of failing"),
        ("sort=colour", "sort: 'colour' is not one of"),
        ("page=0", "page: '0' is not a page number"),
        ("dir=up", "dir: 'up' is not asc or desc"),
    ],
)
def test_a_bad_query_is_a_400_naming_the_parameter(query: str, message: str) -> None:
    api = Page(dict, list, lambda: NOW, version="1.2.3")
    status, body, _, _ = get(api, "/api/v1/runs", query)
    assert status == 400
    error = json.loads(body)
    validate(error)
    assert error["error"].startswith(message)
    status, html_body, content_type, _ = get(api, "/", query)
    assert (status, content_type) == (400, "text/html; charset=utf-8")
    assert message.split(":", maxsplit=1)[0] in html_body.decode()


def test_one_run_and_an_unknown_one() -> None:
    tracker = world()
    api = Page(lambda: tracker.runs, list, lambda: NOW, version="1.2.3")
    status, body, _, _ = get(api, "/api/v1/runs/ready01", "")
    assert status == 200
    document = json.loads(body)
    validate(document)
    assert document["run"]["name"] == "qwen-big"
    status, body, _, _ = get(api, "/api/v1/runs/<nope>", "")
    assert status == 404
    assert json.loads(body) == {"error": "run '<nope>' is not watched"}


def test_each_runs_json_is_redone_only_when_the_run_changed() -> None:
    tracker = world()
    api = Page(lambda: tracker.runs, list, lambda: NOW, version="1.2.3")
    first = api.fragments()
    read(tracker, make_run("ACTIVE", "ready01"), NOW)
    second = api.fragments()
    assert second["idle001"] is first["idle001"]
    assert second["ready01"] is not first["ready01"]
    assert json.loads(second["ready01"])["last_poll"]["at"] == "2027-01-15T08:00:00.000Z"
    # A run watched again starts from a new record: its old JSON must not come back.
    tracker.unwatch("idle001")
    assert "idle001" not in api.fragments()
    read(tracker, make_run("FAILED", "idle001"), NOW)
    assert json.loads(api.fragments()["idle001"])["status"] == "FAILED"


@pytest.mark.looptime
async def test_the_runs_json_is_let_go_once_nobody_reads_it() -> None:
    tracker = world()
    api = Page(lambda: tracker.runs, list, lambda: NOW, version="1.2.3")
    request = Request("GET", "/api/v1/runs", {}, {})
    await api.runs(request)
    first = api.fragments()
    await asyncio.sleep(CACHE_KEPT / 2)
    await api.runs(request)  # a page still open keeps it
    await asyncio.sleep(CACHE_KEPT / 2 + 1)
    kept = api.fragments()
    assert kept["ready01"] is first["ready01"]
    await asyncio.sleep(CACHE_KEPT + 1)  # nobody read it since
    assert api.fragments()["ready01"] is not first["ready01"]


def test_problems_are_in_the_document() -> None:
    problem = Problem("key_rejected", "The Loops API answers 401/403.", NOW - 60)
    api = Page(dict, lambda: [problem], lambda: NOW, version="1.2.3")
    _, body, _, _ = get(api, "/api/v1/runs", "")
    document = json.loads(body)
    validate(document)
    assert document["watcher"]["problems"] == [
        {
            "kind": "key_rejected",
            "message": "The Loops API answers 401/403.",
            "since": "2027-01-15T07:59:00.000Z",
        }
    ]


def test_hostile_values_stay_valid_json() -> None:
    tracker = Tracker()
    read(tracker, make_run("ACTIVE", "hostile", name=HOSTILE), NOW)
    api = Page(lambda: tracker.runs, list, lambda: NOW, version="1.2.3")
    _, body, _, _ = get(api, "/api/v1/runs", "")
    raw = body
    raw.decode("ascii")  # every non-ASCII character is escaped, a lone surrogate too
    assert b"<img" not in raw
    assert json.loads(raw)["runs"][0]["name"] == HOSTILE


# --- query -------------------------------------------------------------------------------


def test_query_round_trips_through_its_string() -> None:
    query = parse("status_class=failing,failed&owner=a%40b.c&q=x+y&sort=since&dir=desc")
    assert query.status_class == {"failing", "failed"}
    assert (query.owner, query.text, query.sort, query.descending) == (
        "a@b.c",
        "x y",
        "since",
        True,
    )
    assert parse(query.query_string()[1:]) == query
    assert Query().query_string() == "?"
    assert parse(query.query_string(page=3)[1:]).page == 3


def test_sort_by_trouble_first_and_unknown_values_last() -> None:
    records = list(world().runs.values())
    by_status = Query().sorted(records, NOW)
    assert [r.run_id for r in by_status] == ["fail001", "unread1", "ready01", "idle001", "trainer"]
    by_owner = parse("sort=owner&dir=desc").sorted(records, NOW)
    assert by_owner[0].run_id == "fail001"
    assert by_owner[-1].run_id == "unread1"  # never read: no owner, last both ways
    by_since = parse("sort=since").sorted(records, NOW)
    assert [r.run_id for r in by_since][:3] == ["idle001", "ready01", "fail001"]


# --- HTML --------------------------------------------------------------------------------


def test_the_page_lists_every_run_with_class_word_and_colour() -> None:
    parsed = Elements(page(world()))
    assert sorted(parsed.rows()) == sorted(["fail001", "ready01", "idle001", "trainer", "unread1"])
    pills = [a.get("class") for tag, a in parsed.tags if "pill" in str(a.get("class"))]
    assert "pill c-failing" in pills
    text = " ".join(parsed.text)
    for words in ("UNHEALTHY", "failing", "SCALED_TO_ZERO", "scaled to zero", "no sampler"):
        assert words in text
    assert "ACTIVE → UNHEALTHY" in " ".join(" ".join(parsed.text).split())
    assert "1m 30s" in text  # time in status as of rendering
    assert "not_found" in text


def test_the_page_loads_only_its_own_files() -> None:
    parsed = Elements(page(world()))
    scripts = [a for tag, a in parsed.tags if tag == "script"]
    assert len(scripts) == 1
    assert str(scripts[0]["src"]).startswith("/static/page.js?v=")
    for tag, attrs in parsed.tags:
        for name, value in attrs.items():
            assert not name.startswith("on"), (tag, name)
            assert "//" not in str(value) or name == "content", (tag, name, value)
        assert tag != "style"


def test_hostile_names_are_text_not_markup() -> None:
    tracker = Tracker()
    run = make_run("ACTIVE", "hostile", name=HOSTILE, base_model='"><b>', user_email="<i>@x")
    read(tracker, run, NOW)
    api = Page(lambda: tracker.runs, list, lambda: NOW, version="1.2.3")
    status, body, _, _ = get(api, "/", "q=%3Cimg")
    assert status == 200
    text = body.decode("utf-8")  # the lone surrogate became a replacement mark
    parsed = Elements(text)
    assert not any(tag in ("img", "b", "i") for tag, _ in parsed.tags)
    assert parsed.rows() == ["hostile"]
    assert '<img src=x onerror="alert(1)">' in "".join(parsed.text)


def test_filters_and_sorting_work_without_javascript() -> None:
    tracker = world()
    assert Elements(page(tracker, "status_class=failing")).rows() == ["fail001"]
    assert Elements(page(tracker, "base_model=Qwen%2FQwen3-32B")).rows() == ["ready01"]
    assert Elements(page(tracker, "owner=ada%40example.com")).rows() == ["fail001"]
    assert Elements(page(tracker, "q=qwen-BIG")).rows() == ["ready01"]
    by_name = [
        "ready01",
        "fail001",
        "idle001",
        "trainer",
        "unread1",
    ]  # qwen-big, sft x3, ID
    assert Elements(page(tracker, "sort=run")).rows() == by_name
    assert Elements(page(tracker, "sort=run&dir=desc")).rows() == by_name[::-1]
    empty = page(tracker, "q=nothing-like-this")
    assert "No run matches these filters." in empty


def test_sort_links_toggle_and_keep_the_filters() -> None:
    parsed = Elements(page(world(), "q=qwen&sort=run"))
    links = {
        str(attrs["href"])
        for tag, attrs in parsed.tags
        if tag == "a" and str(attrs.get("href", "")).startswith("?")
    }
    assert "?q=qwen&sort=run&dir=desc" in links  # the current column flips
    assert "?q=qwen&sort=owner" in links


def test_many_runs_are_paged() -> None:
    tracker = Tracker()
    for n in range(PAGE_SIZE * 2 + 50):
        read(tracker, make_run("ACTIVE", f"run{n:05d}"), NOW)
    first = page(tracker, "sort=run")
    assert len(Elements(first).rows()) == PAGE_SIZE
    assert "page 1 of 3" in first
    last = Elements(page(tracker, "sort=run&page=3"))
    assert len(last.rows()) == 50
    assert last.rows()[0] == f"run{PAGE_SIZE * 2:05d}"
    assert "page 3 of 3" in page(tracker, "page=99")  # past the end: the last page


def test_banners_name_watcher_level_trouble() -> None:
    problems = (
        Problem("key_rejected", "The Loops API answers 401/403.", NOW - 120),
        Problem("data_stale", "No run has been read for a while."),
    )
    text = "".join(Elements(page(Tracker(), problems=problems)).text)
    assert "API key rejected. The Loops API answers 401/403. (for 2m 00s)" in text
    assert "Data is stale." in text
    assert "No runs are watched yet." in text


def test_links_and_files_live_under_the_external_path() -> None:
    text = render_page([], query=Query(), problems=(), version="1", now=NOW, base="/team/watcher")
    hrefs = [str(a.get("href") or a.get("src")) for _, a in Elements(text).tags]
    assert "/team/watcher/metrics" in hrefs
    assert any(h.startswith("/team/watcher/static/page.css?v=") for h in hrefs)
    assert 'data-api="/team/watcher/api/v1/runs"' in text


def test_static_files_are_served_with_long_caching() -> None:
    api = Page(dict, list, lambda: NOW, version="1")
    status, body, content_type, headers = get(api, "/static/page.js", "v=whatever")
    assert (status, content_type) == (200, "text/javascript; charset=utf-8")
    assert b"use strict" in body
    assert "immutable" in headers["Cache-Control"]
    assert get(api, "/static/../page.py")[0] == 404
    assert get(api, "/static/")[0] == 404


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (59.9, "59s"), (61, "1m 01s"), (3600 * 2 + 300, "2h 05m"), (86400 * 3, "3d 00h")],
)
def test_durations_read_short(seconds: float, text: str) -> None:
    assert duration(seconds) == text


def test_the_list_is_gzipped_for_a_browser_that_accepts_it() -> None:
    tracker = world()
    api = Page(lambda: tracker.runs, list, lambda: NOW, version="1.2.3")
    plain = get(api, "/api/v1/runs")
    reply = asyncio.run(api.runs(Request("GET", "/api/v1/runs", {}, {"accept-encoding": "gzip"})))
    assert reply.headers["Content-Encoding"] == "gzip"
    assert reply.headers["Vary"] == "Accept-Encoding"
    body = reply.body if isinstance(reply.body, bytes) else b"".join(reply.body)
    assert gzip.decompress(body) == plain[1]
    assert "Content-Encoding" not in plain[3]


def test_a_time_past_year_9999_in_utc_shows_as_unknown_not_an_error() -> None:
    tracker = Tracker()
    run = parse_run(
        factories.run_json("far0001", created_at="9999-12-31T23:59:59-05:00", sampler=None)
    )
    read(tracker, run, NOW)
    api = Page(lambda: tracker.runs, list, lambda: NOW, version="1")
    status, body, _, _ = get(api, "/api/v1/runs/far0001")
    assert status == 200
    assert json.loads(body)["run"]["created_at"] is None
    assert get(api, "/")[0] == 200
    assert iso(float("nan")) is None
    assert iso(1e300) is None
