"""The status page at `/` and its JSON API at `/api/v1/runs`: every watched run, live.

Rendering is a pure function of the tracker's records, the watcher-level problems and the
time: `run_json`, `runs_document` and `render_page` read nothing else, so they are tested
without a server. The one piece of state is `Page`'s cache of each run's JSON, redone only
when that run's record changed: a browser refreshing the page every few seconds then costs a
list of cached bytes, sent without joining them, not a re-render of 10,000 runs, and scrapes
of `/metrics` in the same event loop are not held up. The cache (about 600 bytes a run) is
let go once nobody has read `/api/v1/runs` for `CACHE_KEPT` seconds.

The HTML works without JavaScript (filters and sorting are query parameters the server
applies, pages of PAGE_SIZE rows); `static/page.js` then takes over, fetching the JSON every
few seconds and redrawing the table in place. Nothing is loaded from elsewhere, no script or
style is inline, and every value that came from the API is escaped.
"""

from __future__ import annotations

import asyncio
import hashlib
import html
import importlib.resources
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from watcher.model import StatusClass, status_class
from watcher.server import AsyncHandler, Handler, Request, Response, compressed, text
from watcher.tracker import RunRecord

PAGE_SIZE = 100
# Seconds the runs' JSON stays cached after the last read of /api/v1/runs: many times the
# page's refresh, so an open page never redoes it, and nothing is held for nobody.
CACHE_KEPT = 60.0
HTML = "text/html; charset=utf-8"
API_PREFIX = "/api/v1/runs"
STATIC_PREFIX = "/static/"
# Status classes in the order that matters to someone looking for trouble; the last two are
# not sampler statuses: a run the watcher has not read yet, and a run without a sampler.
CLASS_ORDER: tuple[str, ...] = (
    StatusClass.FAILING.value,
    StatusClass.FAILED.value,
    StatusClass.UNKNOWN.value,
    "unread",
    StatusClass.TRANSITIONAL.value,
    StatusClass.READY.value,
    StatusClass.IDLE.value,
    StatusClass.SHUT_DOWN.value,
    "no_sampler",
)
CLASS_LABELS = {
    "failing": "failing",
    "failed": "failed",
    "unknown": "unknown status",
    "unread": "not read yet",
    "transitional": "changing",
    "ready": "ready",
    "idle": "scaled to zero",
    "shut_down": "shut down",
    "no_sampler": "no sampler",
}
SORT_KEYS = ("run", "owner", "base_model", "status", "since", "last_poll")
COLUMNS = (
    ("run", "Run"),
    ("owner", "Owner"),
    ("base_model", "Base model"),
    ("status", "Sampler status"),
    ("since", "In status"),
    ("last_poll", "Last poll"),
    ("", "Recent transitions"),
)
TRANSITIONS_SHOWN = 3
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class QueryError(ValueError):
    """A query parameter the page or the API cannot use; the message says which and why."""


@dataclass(frozen=True, slots=True)
class Problem:
    """Watcher-level trouble shown as a banner above the table."""

    kind: str  # key_rejected, api_unreachable, discovery_failing, data_stale
    message: str
    since: float | None = None


def run_class(record: RunRecord) -> str:
    if record.run is None:
        return "unread"
    if record.status is None:
        return "no_sampler"
    return status_class(record.status).value


def iso(moment: float | None) -> str | None:
    """ISO 8601 UTC with milliseconds; None for a time no datetime can hold."""
    if moment is None:
        return None
    try:  # `9999-12-31T23:59:59-05:00` is a valid API time, but past year 9999 in UTC
        stamp = datetime.fromtimestamp(moment, UTC)
    except (OverflowError, ValueError, OSError):
        return None
    return stamp.isoformat(timespec="milliseconds")[:-6] + "Z"


# --- what is asked for -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Query:
    """Filters, sort order and page, from the query string of `/` or `/api/v1/runs`."""

    status_class: frozenset[str] = frozenset()
    base_model: str = ""
    owner: str = ""
    text: str = ""
    sort: str = "status"
    descending: bool = False
    page: int = 1

    @classmethod
    def parse(cls, query: Mapping[str, Sequence[str]]) -> Query:
        params = {name: values[0].strip() for name, values in query.items() if values}
        classes = frozenset(c for c in params.get("status_class", "").split(",") if c)
        unknown = sorted(classes - set(CLASS_ORDER))
        if unknown:
            raise QueryError(
                f"status_class: {unknown[0][:40]!r} is not one of {', '.join(CLASS_ORDER)}"
            )
        sort = params.get("sort") or "status"
        if sort not in SORT_KEYS:
            raise QueryError(f"sort: {sort[:40]!r} is not one of {', '.join(SORT_KEYS)}")
        direction = params.get("dir") or "asc"
        if direction not in ("asc", "desc"):
            raise QueryError(f"dir: {direction[:40]!r} is not asc or desc")
        page_text = params.get("page") or "1"
        if not page_text.isdigit() or not 1 <= int(page_text) <= 1_000_000:
            raise QueryError(f"page: {page_text[:40]!r} is not a page number")
        return cls(
            status_class=classes,
            base_model=params.get("base_model", ""),
            owner=params.get("owner", ""),
            text=params.get("q", ""),
            sort=sort,
            descending=direction == "desc",
            page=int(page_text),
        )

    def query_string(self, **changes: Any) -> str:
        """This query with some fields changed, as `?…` (defaults left out)."""
        query = replace(self, **changes)
        params = {
            "status_class": ",".join(sorted(query.status_class)),
            "base_model": query.base_model,
            "owner": query.owner,
            "q": query.text,
            "sort": "" if query.sort == "status" else query.sort,
            "dir": "desc" if query.descending else "",
            "page": "" if query.page == 1 else str(query.page),
        }
        text = urlencode({name: value for name, value in params.items() if value})
        return f"?{text}" if text else "?"

    def matches(self, record: RunRecord) -> bool:
        if self.status_class and run_class(record) not in self.status_class:
            return False
        run = record.run
        if self.base_model and (run is None or run.base_model != self.base_model):
            return False
        if self.owner and (run is None or (run.user_email or "") != self.owner):
            return False
        return not self.text or self.text.casefold() in _haystack(record)

    def sorted(self, records: Iterable[RunRecord], now: float) -> list[RunRecord]:
        key = _SORTS[self.sort]
        present = [(key(record, now), record) for record in records]
        known = [pair for pair in present if pair[0] is not None]
        missing = [record for value, record in present if value is None]
        known.sort(key=lambda pair: (pair[0], pair[1].run_id), reverse=self.descending)
        return [record for _, record in known] + missing  # unknown values always last


def _haystack(record: RunRecord) -> str:
    run = record.run
    words = [record.run_id, record.status or "", CLASS_LABELS[run_class(record)]]
    if run is not None:
        words += [run.name, run.base_model, run.user_email or "", run.session_id]
        if run.sampler is not None:
            words.append(run.sampler.id)
    return "\n".join(words).casefold()


def _since_key(record: RunRecord, now: float) -> Any:
    return None if record.since is None else now - record.since


_SORTS: dict[str, Callable[[RunRecord, float], Any]] = {
    "run": lambda r, _now: (r.run.name if r.run else "").casefold() or r.run_id,
    "owner": lambda r, _now: (r.run.user_email or None) if r.run else None,
    "base_model": lambda r, _now: r.run.base_model if r.run else None,
    "status": lambda r, _now: (CLASS_ORDER.index(run_class(r)), r.status or ""),
    "since": _since_key,
    "last_poll": lambda r, now: None if r.last_poll is None else now - r.last_poll,
}


# --- JSON --------------------------------------------------------------------------------


def run_json(record: RunRecord) -> dict[str, Any]:
    """One run as `/api/v1/runs` shows it (the README documents every field)."""
    run = record.run
    sampler = run.sampler if run else None
    return {
        "run_id": record.run_id,
        "name": run.name if run else None,
        "owner": run.user_email if run else None,
        "base_model": run.base_model if run else None,
        "session_id": run.session_id if run else None,
        "created_at": iso(run.created_at) if run else None,
        "run_status": run.status if run else None,
        "sampler": None
        if sampler is None
        else {
            "id": sampler.id,
            "model_id": sampler.model_id,
            "deployment_id": sampler.deployment_id,
            "instance_type": sampler.instance_type,
            "node_count": sampler.node_count,
        },
        "status": record.status,
        "status_class": run_class(record),
        "status_since": iso(record.since),
        "status_since_exact": record.saw_status_begin,
        "last_poll": None
        if record.last_result is None
        else {
            "result": str(record.last_result),
            "at": iso(record.last_poll),
            "consecutive_failures": record.consecutive_failures,
        },
        "last_success_at": iso(record.last_success),
        "transitions": [
            {"at": iso(t.at), "from_status": t.from_status, "to_status": t.to_status}
            for t in reversed(record.recent)
        ],
    }


def encode_json(value: Any) -> bytes:
    # ASCII escapes keep a lone surrogate from the API encodable; no spaces keep 10,000 runs
    # small; and like Go's encoder, no raw `<>&` for a browser that sniffs JSON as HTML.
    rendered = json.dumps(value, ensure_ascii=True, separators=(",", ":"))
    return rendered.translate(_JSON_HTML).encode()


_JSON_HTML = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026"})


def counts(records: Iterable[RunRecord]) -> dict[str, int]:
    found = dict.fromkeys(CLASS_ORDER, 0)
    for record in records:
        found[run_class(record)] += 1
    return found


def watcher_json(problems: Sequence[Problem], watched: int, version: str) -> dict[str, Any]:
    return {
        "version": version,
        "watched_runs": watched,
        "problems": [
            {"kind": p.kind, "message": p.message, "since": iso(p.since)} for p in problems
        ],
    }


def runs_document(
    records: Sequence[RunRecord],
    fragments: Mapping[str, bytes],
    *,
    query: Query,
    problems: Sequence[Problem],
    version: str,
    now: float,
) -> list[bytes]:
    """`/api/v1/runs`: the runs matching `query`, made of each run's cached JSON."""
    head = {
        "generated_at": iso(now),
        "watcher": watcher_json(problems, len(records), version),
        "counts": counts(records),
    }
    selected = [fragments[record.run_id] for record in records if query.matches(record)]
    # The runs with commas between them, as parts: joined, 10,000 runs would be a 6 MB copy.
    runs = [b","] * (2 * len(selected) - 1) if selected else []
    runs[::2] = selected
    return [encode_json(head)[:-1], b',"runs":[', *runs, b"]}"]


class Page:
    """The page's routes, and the cache of each run's JSON between changes."""

    def __init__(
        self,
        records: Callable[[], Mapping[str, RunRecord]],
        problems: Callable[[], Sequence[Problem]],
        clock: Callable[[], float],
        *,
        version: str,
        base: str = "",
    ) -> None:
        self._records = records
        self._problems = problems
        self._clock = clock
        self._version = version
        self.base = base
        self._cache: dict[str, tuple[RunRecord, int, bytes]] = {}
        self._release: asyncio.TimerHandle | None = None

    def routes(self) -> dict[str, Handler | AsyncHandler]:
        """Path -> handler, for `Server.route` (a path ending in `/` serves those below it)."""
        return {
            "/": self.html,
            API_PREFIX: self.runs,
            API_PREFIX + "/": self.run,
            STATIC_PREFIX: static_file,
        }

    def fragments(self) -> dict[str, bytes]:
        """Each watched run's JSON; only runs whose record changed are rendered again."""
        cache: dict[str, tuple[RunRecord, int, bytes]] = {}
        for run_id, record in self._records().items():
            hit = self._cache.get(run_id)
            if hit is None or hit[0] is not record or hit[1] != record.version:
                hit = (record, record.version, encode_json(run_json(record)))
            cache[run_id] = hit
        self._cache = cache  # runs no longer watched drop out here
        return {run_id: entry[2] for run_id, entry in cache.items()}

    def _drop_cache(self) -> None:
        self._cache = {}

    async def runs(self, request: Request) -> Response:
        try:
            query = Query.parse(request.query)
        except QueryError as exc:
            return _json_error(400, str(exc))
        records = list(self._records().values())
        if self._release is not None:
            self._release.cancel()
        self._release = asyncio.get_running_loop().call_later(CACHE_KEPT, self._drop_cache)
        body = runs_document(
            records,
            self.fragments(),
            query=query,
            problems=self._problems(),
            version=self._version,
            now=self._clock(),
        )
        # 10,000 runs make about 6 MB of JSON, fetched every few seconds: worth a gzip.
        return await compressed(request, Response(200, body, "application/json", SECURITY_HEADERS))

    def run(self, request: Request) -> Response:
        run_id = request.path.removeprefix(API_PREFIX + "/")
        record = self._records().get(run_id)
        if record is None:
            return _json_error(404, f"run {run_id[:80]!r} is not watched")
        body = encode_json({"generated_at": iso(self._clock()), "run": run_json(record)})
        return Response(200, body, "application/json", SECURITY_HEADERS)

    def html(self, request: Request) -> Response:
        try:
            query = Query.parse(request.query)
        except QueryError as exc:
            page = (
                f"<!doctype html><meta charset=utf-8><title>Bad request</title>"
                f"<p>{_e(exc)}. <a href='{_e(self.base)}/'>All runs</a>"
            )
            return Response(400, page.encode(), HTML, SECURITY_HEADERS)
        markup = render_page(
            list(self._records().values()),
            query=query,
            problems=self._problems(),
            version=self._version,
            now=self._clock(),
            base=self.base,
        )
        # A lone surrogate from the API cannot be UTF-8: it becomes a replacement mark.
        return Response(200, markup.encode("utf-8", "replace"), HTML, SECURITY_HEADERS)


def _json_error(status: int, message: str) -> Response:
    return Response(status, encode_json({"error": message}), "application/json", SECURITY_HEADERS)


# --- static files ------------------------------------------------------------------------

STATIC_TYPES = {
    "page.js": "text/javascript; charset=utf-8",
    "page.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}


def _read_static() -> dict[str, tuple[bytes, str]]:
    folder = importlib.resources.files("watcher") / "static"
    files = {}
    for name in STATIC_TYPES:
        content = (folder / name).read_bytes()
        files[name] = (content, hashlib.sha256(content).hexdigest()[:12])
    return files


STATIC = _read_static()


def static_url(base: str, name: str) -> str:
    # The content hash in the URL lets browsers keep a file until the watcher changes it.
    return f"{base}{STATIC_PREFIX}{name}?v={STATIC[name][1]}"


def static_file(request: Request) -> Response:
    name = request.path.removeprefix(STATIC_PREFIX)
    found = STATIC.get(name)
    if found is None:
        return text(404, "no such file")
    headers = {"Cache-Control": "public, max-age=31536000, immutable", **SECURITY_HEADERS}
    return Response(200, found[0], STATIC_TYPES[name], headers)


# --- HTML --------------------------------------------------------------------------------


def duration(seconds: float) -> str:
    """A short, readable length of time: 45s, 5m 03s, 2h 05m, 3d 04h."""
    whole = max(0, int(seconds))
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours:02d}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _time(moment: float | None, now: float, *, suffix: str = " ago") -> str:
    """A `<time>` the script keeps ticking; the server's text is right as of `now`."""
    stamp = iso(moment)
    if moment is None or stamp is None:
        return '<span class="muted">never</span>'
    return (
        f'<time datetime="{stamp}" data-suffix="{_e(suffix)}" title="{stamp}">'
        f"{duration(now - moment)}{_e(suffix)}</time>"
    )


def _row(record: RunRecord, now: float) -> str:
    run = record.run
    klass = run_class(record)
    name = run.name if run and run.name else ""
    run_cell = (
        f'<span class="name">{_e(name)}</span>' if name else ""
    ) + f'<code class="id">{_e(record.run_id)}</code>'
    owner = run.user_email if run and run.user_email else ""
    model = run.base_model if run else ""
    status = record.status or ("no sampler" if run else "not read yet")
    if record.last_result is None:
        poll = '<span class="muted">not polled yet</span>'
    else:
        failures = record.consecutive_failures
        result = _e(record.last_result) + (f" &times;{failures}" if failures > 1 else "")
        good = "ok" if failures == 0 else "bad"
        poll = f'<span class="result {good}">{result}</span> {_time(record.last_poll, now)}'
    since = "" if record.since is None else _time(record.since, now, suffix="")
    shown = record.recent[::-1][:TRANSITIONS_SHOWN]
    history = (
        "<ol>"
        + "".join(
            f"<li>{_time(t.at, now)} <span>{_e(t.from_status)}</span> → "
            f"<span>{_e(t.to_status)}</span></li>"
            for t in shown
        )
        + "</ol>"
        if shown
        else '<span class="muted">none seen</span>'
    )
    return (
        f'<tr class="c-{klass}" data-run-id="{_e(record.run_id)}">'
        f'<td class="run">{run_cell}</td>'
        f'<td class="owner">{_e(owner) or "<span class=muted>unknown</span>"}</td>'
        f'<td class="model">{_e(model)}</td>'
        f'<td class="status"><span class="pill c-{klass}">{_e(status)}</span>'
        f'<span class="class-label">{_e(CLASS_LABELS[klass])}</span></td>'
        f'<td class="since">{since}</td>'
        f'<td class="poll">{poll}</td>'
        f'<td class="history">{history}</td></tr>'
    )


def _options(name: str, label: str, values: Iterable[str], chosen: str) -> str:
    options = [f'<option value=""{"" if chosen else " selected"}>all</option>']
    for value in sorted(set(values) | ({chosen} if chosen else set())):
        selected = " selected" if value == chosen else ""
        options.append(f'<option value="{_e(value)}"{selected}>{_e(value)}</option>')
    return f'<label>{label} <select name="{name}">{"".join(options)}</select></label>'


def _banners(problems: Sequence[Problem], now: float) -> str:
    return "".join(
        f'<p class="banner" data-kind="{_e(p.kind)}"><strong>{_e(PROBLEM_TITLES[p.kind])}</strong>'
        f" {_e(p.message)}"
        + (f" (for {_time(p.since, now, suffix='')})" if p.since is not None else "")
        + "</p>"
        for p in problems
    )


PROBLEM_TITLES = {
    "key_rejected": "API key rejected.",
    "api_unreachable": "Loops API unreachable.",
    "discovery_failing": "Discovery failing.",
    "data_stale": "Data is stale.",
}


def render_page(
    records: Sequence[RunRecord],
    *,
    query: Query,
    problems: Sequence[Problem],
    version: str,
    now: float,
    base: str,
) -> str:
    """The whole page as the server renders it: correct on its own, live with the script."""
    found = counts(records)
    matching = query.sorted((r for r in records if query.matches(r)), now)
    pages = max(1, math.ceil(len(matching) / PAGE_SIZE))
    page = min(query.page, pages)
    shown = matching[(page - 1) * PAGE_SIZE : page * PAGE_SIZE]
    trouble = found["failing"] + found["failed"]
    title = f"({trouble} in trouble) loops-watcher" if trouble else "loops-watcher"

    chips = "".join(
        f'<a class="chip c-{klass}{" chosen" if klass in query.status_class else ""}" '
        f'data-class="{klass}" '
        f'href="{_e(query.query_string(status_class=frozenset({klass}), page=1))}">'
        f'<span class="n">{found[klass]}</span> {_e(CLASS_LABELS[klass])}</a>'
        for klass in CLASS_ORDER
        if found[klass] or klass in query.status_class
    )
    chosen_class = next(iter(query.status_class)) if len(query.status_class) == 1 else ""
    class_options = "".join(
        f'<option value="{klass}"{" selected" if klass == chosen_class else ""}>'
        f"{_e(CLASS_LABELS[klass])}</option>"
        for klass in CLASS_ORDER
    )
    runs = [r.run for r in records if r.run is not None]
    heads = []
    for key, label in COLUMNS:
        if not key:
            heads.append(f"<th>{label}</th>")
            continue
        current = query.sort == key
        descending = not query.descending if current else False
        aria = (
            f' aria-sort="{"descending" if query.descending else "ascending"}"' if current else ""
        )
        href = query.query_string(sort=key, descending=descending, page=1)
        heads.append(f'<th data-sort="{key}"{aria}><a href="{_e(href)}">{label}</a></th>')
    first = (page - 1) * PAGE_SIZE + 1 if shown else 0
    summary = f"{first}&ndash;{first + len(shown) - 1 if shown else 0} of {len(matching)} matching"
    pager = []
    if page > 1:
        pager.append(f'<a rel="prev" href="{_e(query.query_string(page=page - 1))}">← previous</a>')
    pager.append(f"<span>page {page} of {pages}</span>")
    if page < pages:
        pager.append(f'<a rel="next" href="{_e(query.query_string(page=page + 1))}">next →</a>')
    rows = "".join(_row(record, now) for record in shown)
    empty = (
        ""
        if shown
        else f'<tr class="empty"><td colspan="{len(COLUMNS)}">'
        f"{'No run matches these filters.' if records else 'No runs are watched yet.'}</td></tr>"
    )
    b = _e(base)
    links = "".join(
        f'<a href="{b}{path}">{label}</a>'
        for path, label in (
            ("/metrics", "metrics"),
            ("/healthz", "healthz"),
            ("/readyz", "readyz"),
            (API_PREFIX, "JSON"),
        )
    )
    stamp = iso(now)
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title>
<link rel="icon" href="{_e(static_url(base, "favicon.svg"))}" type="image/svg+xml">
<link rel="stylesheet" href="{_e(static_url(base, "page.css"))}">
<script src="{_e(static_url(base, "page.js"))}" defer></script>
<noscript><meta http-equiv="refresh" content="30"></noscript>
</head>
<body data-api="{b}{API_PREFIX}" data-page-size="{PAGE_SIZE}">
<header>
<h1>loops-watcher <span class="version">{_e(version)}</span></h1>
<p id="freshness">as of <time datetime="{stamp}">{stamp}</time>
<span class="live-note">(reload to refresh)</span></p>
<nav>{links}</nav>
</header>
<div id="banners" role="alert">{_banners(problems, now)}</div>
<p id="chips" aria-label="runs by status class">{chips}</p>
<form id="filters" method="get" action="{b}/">
<label>Status <select name="status_class">
<option value="">all</option>{class_options}</select></label>
{_options("base_model", "Base model", (r.base_model for r in runs), query.base_model)}
{_options("owner", "Owner", (r.user_email for r in runs if r.user_email), query.owner)}
<label>Search <input type="search" name="q" value="{_e(query.text)}"
placeholder="name, ID, status&hellip;"></label>
<input type="hidden" name="sort" value="{_e(query.sort)}">
<input type="hidden" name="dir" value="{"desc" if query.descending else "asc"}">
<button type="submit" class="apply">Apply</button>
<span id="summary">{summary} · {len(records)} watched</span>
</form>
<table id="runs">
<thead><tr>{"".join(heads)}</tr></thead>
<tbody>{rows}{empty}</tbody>
</table>
<nav id="pager">{"".join(pager)}</nav>
</body>
</html>
"""
