// The live status page: fetches the JSON API every few seconds and redraws the table in place.
// The server already rendered a correct page; this script only keeps it current, and applies
// filters, sorting and paging in the browser. Every value is set as text, never as markup.
"use strict";

(() => {
  const CLASS_ORDER = [
    "failing", "failed", "unknown", "unread", "transitional",
    "ready", "idle", "shut_down", "no_sampler",
  ];
  const CLASS_LABELS = {
    failing: "failing", failed: "failed", unknown: "unknown status", unread: "not read yet",
    transitional: "changing", ready: "ready", idle: "scaled to zero", shut_down: "shut down",
    no_sampler: "no sampler",
  };
  const PROBLEM_TITLES = {
    key_rejected: "API key rejected.", api_unreachable: "Loops API unreachable.",
    discovery_failing: "Discovery failing.", data_stale: "Data is stale.",
  };
  const REFRESH_MS = 2000;
  const TRANSITIONS_SHOWN = 3;
  const HIGHLIGHT_MS = 10000;

  const body = document.body;
  const api = body.dataset.api;
  const pageSize = Number(body.dataset.pageSize) || 100;
  const table = document.getElementById("runs");
  const form = document.getElementById("filters");

  let doc = null; // the last document the API returned
  let offset = 0; // the watcher's clock minus ours, in ms
  let lastGood = 0; // our time of the last good fetch
  let failure = ""; // why the last fetch failed, if it did
  let failingSince = 0;
  let seen = new Map(); // run_id -> status in the previous document
  const changedAt = new Map(); // run_id -> our time its status was seen to change
  const haystacks = new WeakMap();
  const state = readState(location.search);

  function readState(search) {
    const params = new URLSearchParams(search);
    return {
      status_class: (params.get("status_class") || "").split(",").filter(Boolean),
      base_model: params.get("base_model") || "",
      owner: params.get("owner") || "",
      q: (params.get("q") || "").trim(),
      sort: params.get("sort") || "status",
      dir: params.get("dir") === "desc" ? "desc" : "asc",
      page: Math.max(1, Number(params.get("page")) || 1),
    };
  }

  function writeState() {
    const params = new URLSearchParams();
    if (state.status_class.length) params.set("status_class", state.status_class.join(","));
    for (const name of ["base_model", "owner", "q"]) {
      if (state[name]) params.set(name, state[name]);
    }
    if (state.sort !== "status") params.set("sort", state.sort);
    if (state.dir === "desc") params.set("dir", "desc");
    if (state.page > 1) params.set("page", String(state.page));
    const text = params.toString();
    history.replaceState(null, "", text ? `?${text}` : location.pathname);
  }

  // --- time --------------------------------------------------------------------------

  const now = () => Date.now() + offset;

  function duration(seconds) {
    const whole = Math.max(0, Math.floor(seconds));
    const days = Math.floor(whole / 86400);
    const hours = Math.floor((whole % 86400) / 3600);
    const minutes = Math.floor((whole % 3600) / 60);
    const secs = whole % 60;
    const two = (n) => String(n).padStart(2, "0");
    if (days) return `${days}d ${two(hours)}h`;
    if (hours) return `${hours}h ${two(minutes)}m`;
    if (minutes) return `${minutes}m ${two(secs)}s`;
    return `${secs}s`;
  }

  function clock(ms) {
    return new Date(ms).toLocaleTimeString([], { hour12: false });
  }

  function tick() {
    const current = now();
    for (const node of document.querySelectorAll("time[data-suffix]")) {
      const at = Date.parse(node.getAttribute("datetime"));
      if (!Number.isNaN(at)) node.textContent = duration((current - at) / 1000) + node.dataset.suffix;
    }
    showFreshness();
  }

  // --- building blocks -----------------------------------------------------------------

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") node.className = value;
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child !== null && child !== undefined) node.append(child);
    }
    return node;
  }

  function ago(at, suffix = " ago") {
    if (!at) return el("span", { class: "muted" }, "never");
    const seconds = (now() - Date.parse(at)) / 1000;
    return el("time", { datetime: at, title: at, "data-suffix": suffix }, duration(seconds) + suffix);
  }

  function haystack(run) {
    let text = haystacks.get(run);
    if (text === undefined) {
      text = [
        run.run_id, run.status, CLASS_LABELS[run.status_class], run.name, run.base_model,
        run.owner, run.session_id, run.sampler && run.sampler.id,
      ].filter(Boolean).join("\n").toLowerCase();
      haystacks.set(run, text);
    }
    return text;
  }

  // --- filter, sort, page ------------------------------------------------------------

  function matches(run) {
    if (state.status_class.length && !state.status_class.includes(run.status_class)) return false;
    if (state.base_model && run.base_model !== state.base_model) return false;
    if (state.owner && (run.owner || "") !== state.owner) return false;
    return !state.q || haystack(run).includes(state.q.toLowerCase());
  }

  const SORTS = {
    run: (r) => (r.name || "").toLowerCase() || r.run_id,
    owner: (r) => r.owner || null,
    base_model: (r) => r.base_model,
    status: (r) => [CLASS_ORDER.indexOf(r.status_class), r.status || ""],
    since: (r) => (r.status_since ? -Date.parse(r.status_since) : null),
    last_poll: (r) => (r.last_poll && r.last_poll.at ? -Date.parse(r.last_poll.at) : null),
  };

  function compare(a, b) {
    if (Array.isArray(a)) {
      for (let i = 0; i < a.length; i += 1) {
        const order = compare(a[i], b[i]);
        if (order) return order;
      }
      return 0;
    }
    if (a < b) return -1;
    return a > b ? 1 : 0;
  }

  function arrange(runs) {
    const key = SORTS[state.sort] || SORTS.status;
    const sign = state.dir === "desc" ? -1 : 1;
    const known = [];
    const missing = [];
    for (const run of runs) {
      const value = key(run);
      if (value === null || value === undefined) missing.push(run);
      else known.push([value, run]);
    }
    known.sort((a, b) => sign * (compare(a[0], b[0]) || compare(a[1].run_id, b[1].run_id)));
    return known.map((pair) => pair[1]).concat(missing);
  }

  // --- drawing -----------------------------------------------------------------------

  function row(run) {
    const klass = run.status_class;
    const runCell = el("td", { class: "run" },
      run.name ? el("span", { class: "name" }, run.name) : null,
      el("code", { class: "id" }, run.run_id));
    const status = run.status || (klass === "unread" ? "not read yet" : "no sampler");
    let poll;
    if (!run.last_poll) {
      poll = el("td", { class: "poll" }, el("span", { class: "muted" }, "not polled yet"));
    } else {
      const failures = run.last_poll.consecutive_failures;
      const label = run.last_poll.result + (failures > 1 ? ` ×${failures}` : "");
      poll = el("td", { class: "poll" },
        el("span", { class: `result ${failures ? "bad" : "ok"}` }, label), " ", ago(run.last_poll.at));
    }
    const shown = run.transitions.slice(0, TRANSITIONS_SHOWN);
    const history = shown.length
      ? el("ol", {}, ...shown.map((t) => el("li", {}, ago(t.at), " ",
        el("span", {}, t.from_status), " → ", el("span", {}, t.to_status))))
      : el("span", { class: "muted" }, "none seen");
    const fresh = Date.now() - (changedAt.get(run.run_id) || 0) < HIGHLIGHT_MS;
    return el("tr", { class: `c-${klass}${fresh ? " changed" : ""}`, "data-run-id": run.run_id },
      runCell,
      el("td", { class: "owner" }, run.owner || el("span", { class: "muted" }, "unknown")),
      el("td", { class: "model" }, run.base_model || ""),
      el("td", { class: "status" },
        el("span", { class: `pill c-${klass}` }, status),
        el("span", { class: "class-label" }, CLASS_LABELS[klass] || klass)),
      el("td", { class: "since" }, run.status_since ? ago(run.status_since, "") : ""),
      poll,
      el("td", { class: "history" }, history));
  }

  function drawChips() {
    const chips = document.getElementById("chips");
    const nodes = CLASS_ORDER
      .filter((klass) => doc.counts[klass] || state.status_class.includes(klass))
      .map((klass) => el("a", {
        class: `chip c-${klass}${state.status_class.includes(klass) ? " chosen" : ""}`,
        href: `?status_class=${klass}`,
        "data-class": klass,
      }, el("span", { class: "n" }, String(doc.counts[klass])), ` ${CLASS_LABELS[klass]}`));
    chips.replaceChildren(...nodes);
  }

  function drawOptions(name, values) {
    const select = form.elements[name];
    const chosen = state[name];
    const all = [...new Set(values.filter(Boolean).concat(chosen ? [chosen] : []))].sort();
    const current = [...select.options].slice(1).map((o) => o.value);
    if (current.join("\n") === all.join("\n") && select.value === chosen) return;
    select.replaceChildren(el("option", { value: "" }, "all"),
      ...all.map((value) => el("option", { value }, value)));
    select.value = chosen;
  }

  function drawControls() {
    form.elements.status_class.value =
      state.status_class.length === 1 ? state.status_class[0] : "";
    drawOptions("base_model", doc.runs.map((r) => r.base_model));
    drawOptions("owner", doc.runs.map((r) => r.owner));
    for (const th of table.tHead.rows[0].cells) {
      if (!th.dataset.sort) continue;
      if (th.dataset.sort === state.sort) {
        th.setAttribute("aria-sort", state.dir === "desc" ? "descending" : "ascending");
      } else {
        th.removeAttribute("aria-sort");
      }
    }
  }

  function drawBanners() {
    const banners = doc ? doc.watcher.problems.map((problem) => el("p",
      { class: "banner", "data-kind": problem.kind },
      el("strong", {}, PROBLEM_TITLES[problem.kind] || problem.kind), ` ${problem.message}`,
      problem.since ? el("span", {}, " (for ", ago(problem.since, ""), ")") : null)) : [];
    if (failure) {
      banners.unshift(el("p", { class: "banner", "data-kind": "page_disconnected" },
        el("strong", {}, "Lost contact with the watcher."),
        ` ${failure}; retrying. The table shows what it said at ${lastGood ? clock(lastGood) : "page load"}.`));
    }
    document.getElementById("banners").replaceChildren(...banners);
  }

  function drawTable() {
    const matching = arrange(doc.runs.filter(matches));
    const pages = Math.max(1, Math.ceil(matching.length / pageSize));
    state.page = Math.min(state.page, pages);
    const start = (state.page - 1) * pageSize;
    const shown = matching.slice(start, start + pageSize);
    const rows = shown.map(row);
    if (!rows.length) {
      rows.push(el("tr", { class: "empty" }, el("td", { colspan: table.tHead.rows[0].cells.length },
        doc.runs.length ? "No run matches these filters." : "No runs are watched yet.")));
    }
    table.tBodies[0].replaceChildren(...rows);
    const first = shown.length ? start + 1 : 0;
    document.getElementById("summary").textContent =
      `${first}–${start + shown.length} of ${matching.length} matching · ${doc.runs.length} watched`;
    const pager = document.getElementById("pager");
    pager.replaceChildren(
      el("button", { type: "button", "data-page": state.page - 1, disabled: state.page <= 1 }, "← previous"),
      el("span", {}, `page ${state.page} of ${pages}`),
      el("button", { type: "button", "data-page": state.page + 1, disabled: state.page >= pages }, "next →"));
    const trouble = doc.counts.failing + doc.counts.failed;
    document.title = trouble ? `(${trouble} in trouble) loops-watcher` : "loops-watcher";
  }

  function showFreshness() {
    const freshness = document.getElementById("freshness");
    const text = failure
      ? `disconnected · last update ${lastGood ? clock(lastGood) : "at page load"}`
      : lastGood ? `live · updated ${duration((Date.now() - lastGood) / 1000)} ago` : "connecting…";
    if (freshness.textContent !== text) freshness.textContent = text;
    freshness.className = failure ? "stale" : "live";
  }

  function draw() {
    drawBanners();
    if (doc) {
      drawChips();
      drawControls();
      drawTable();
    }
    tick();
  }

  // --- data --------------------------------------------------------------------------

  function accept(next) {
    const moment = Date.now();
    const statuses = new Map();
    for (const run of next.runs) {
      const before = seen.get(run.run_id);
      if (before !== undefined && before !== run.status) changedAt.set(run.run_id, moment);
      statuses.set(run.run_id, run.status);
    }
    seen = statuses; // runs no longer watched are forgotten, so a page left open does not grow
    for (const [runId, at] of changedAt) {
      if (moment - at >= HIGHLIGHT_MS) changedAt.delete(runId);
    }
    doc = next;
  }

  async function refresh() {
    const started = performance.now();
    try {
      const response = await fetch(api, { cache: "no-store", headers: { Accept: "application/json" } });
      if (!response.ok) throw new Error(`the watcher answered HTTP ${response.status}`);
      const next = await response.json();
      offset = Date.parse(next.generated_at) - Date.now();
      accept(next);
      lastGood = Date.now();
      if (failure) failure = "";
    } catch (error) {
      if (!failure) failingSince = Date.now();
      failure = error instanceof TypeError ? "the request failed" : String(error.message || error);
      failure += ` (since ${clock(failingSince)})`;
    }
    draw();
    // At 10,000 runs a round trip takes a while: never spend more than a fifth of the time on it.
    setTimeout(refresh, Math.max(REFRESH_MS, 5 * (performance.now() - started)));
  }

  // --- controls ----------------------------------------------------------------------

  function changed() {
    writeState();
    if (doc) draw();
  }

  form.addEventListener("submit", (event) => event.preventDefault());
  function controlsChanged() {
    const klass = form.elements.status_class.value;
    state.status_class = klass ? [klass] : [];
    state.base_model = form.elements.base_model.value;
    state.owner = form.elements.owner.value;
    state.q = form.elements.q.value.trim();
    state.page = 1;
    changed();
  }
  // Selects announce a choice with "change" (some drivers send nothing else); typing, "input".
  form.addEventListener("input", controlsChanged);
  form.addEventListener("change", controlsChanged);
  table.tHead.addEventListener("click", (event) => {
    const th = event.target.closest("th[data-sort]");
    if (!th) return;
    event.preventDefault();
    if (state.sort === th.dataset.sort) state.dir = state.dir === "asc" ? "desc" : "asc";
    else [state.sort, state.dir] = [th.dataset.sort, "asc"];
    state.page = 1;
    changed();
  });
  document.getElementById("chips").addEventListener("click", (event) => {
    const chip = event.target.closest("a[data-class]");
    if (!chip) return;
    event.preventDefault();
    const klass = chip.dataset.class;
    const only = state.status_class.length === 1 && state.status_class[0] === klass;
    state.status_class = only ? [] : [klass];
    state.page = 1;
    changed();
  });
  document.getElementById("pager").addEventListener("click", (event) => {
    const button = event.target.closest("button[data-page]");
    if (!button) return;
    state.page = Number(button.dataset.page);
    changed();
    table.scrollIntoView({ block: "start" });
  });

  document.documentElement.classList.add("js");
  setInterval(tick, 1000);
  refresh();
})();
