/* The auditors' console page: reads the console's local /api (same origin, session cookie) and
   draws the verification state, the events, an artifact's custody timeline and the charts.

   Everything shown was verified by the console process before it reached the page; the page
   only presents it. Every string in the log may be hostile (artifact names, principal names,
   reasons, summaries): it is inserted with textContent or as a text node, never as markup, and
   characters that are invisible or reorder text (controls, bidi overrides, zero-width) are shown
   as visible ⟨U+XXXX⟩ marks so an auditor sees what is really there.

   What this file deliberately does not do: verify anything itself (the console process does,
   with the auditor's pinned keys), keep any secret (the session is an HttpOnly cookie), or
   fetch from anywhere but this origin. */

(() => {
  "use strict";

  const STATE_POLL_MS = 10000;
  const KINDS = ["upload", "grant", "link", "redemption", "receipt", "revocation", "finding", "other"];
  // C0/C1 controls, zero-width and bidi formatting characters, line/paragraph separators, BOM.
  const HIDDEN_CHARS = /[\u0000-\u001f\u007f-\u009f\u00ad\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]/u;
  const PALETTE = ["#1f6feb", "#d4380d", "#2da44e", "#8250df", "#bf8700", "#0a7b83", "#cf222e", "#6e7781"];

  const $ = (id) => document.getElementById(id);

  /* ---------- safe text ---------- */

  function codePoint(ch) {
    return "U+" + ch.codePointAt(0).toString(16).toUpperCase().padStart(4, "0");
  }

  /** Append `text` to `el` as text nodes, with hidden characters as visible marks. */
  function appendText(el, text) {
    const s = String(text ?? "");
    let run = "";
    for (const ch of s) {
      if (HIDDEN_CHARS.test(ch)) {
        if (run) el.append(run);
        run = "";
        const mark = document.createElement("span");
        mark.className = "ctl";
        mark.title = codePoint(ch);
        mark.textContent = "⟨" + codePoint(ch) + "⟩";
        el.append(mark);
      } else {
        run += ch;
      }
    }
    if (run) el.append(run);
    return el;
  }

  /** `text` with hidden characters spelt as ⟨U+XXXX⟩: for canvas text (chart labels), which
      cannot hold marked-up spans. Cut to `max` characters so one name cannot swamp a legend. */
  function visibleText(text, max = 40) {
    let out = "";
    for (const ch of String(text ?? "")) out += HIDDEN_CHARS.test(ch) ? "⟨" + codePoint(ch) + "⟩" : ch;
    return out.length > max ? out.slice(0, max - 1) + "…" : out;
  }

  /** A new element holding `text` (safely), with an optional class. */
  function node(tag, text, className) {
    const el = document.createElement(tag);
    if (className) el.className = className;
    if (text !== undefined && text !== null) appendText(el, text);
    return el;
  }

  function utc(ms) {
    if (typeof ms !== "number" || !Number.isFinite(ms)) return "—";
    return new Date(ms).toISOString().replace("T", " ").replace(/\.\d{3}Z$/, "Z");
  }

  function abbreviate(text, n = 12) {
    const s = String(text ?? "");
    return s.length > n ? s.slice(0, n) + "…" : s;
  }

  function formatBytes(n) {
    if (typeof n !== "number") return "";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let v = n;
    let u = 0;
    while (v >= 1024 && u < units.length - 1) {
      v /= 1024;
      u += 1;
    }
    return (u === 0 ? String(v) : v.toFixed(1)) + " " + units[u];
  }

  /** Mark `section` busy; `finished(section)` clears it and counts the load in data-loads, so a
      reader (a person's screen reader, a test) can tell a fresh answer has been drawn. */
  function started(section) {
    section.setAttribute("aria-busy", "true");
  }

  function finished(section) {
    section.setAttribute("aria-busy", "false");
    section.dataset.loads = String(Number(section.dataset.loads || 0) + 1);
  }

  /* ---------- the API ---------- */

  class ApiError extends Error {
    constructor(status, problem) {
      super(problem.detail || problem.title || "HTTP " + status);
      this.status = status;
      this.problem = problem;
    }
  }

  async function api(path) {
    const resp = await fetch(path, { credentials: "same-origin", headers: { Accept: "application/json" } });
    if (resp.ok) return resp.json();
    let problem = {};
    try {
      problem = await resp.json();
    } catch (_) {
      problem = {};
    }
    const err = new ApiError(resp.status, problem);
    // A verification failure: the banner must say so now (the state itself is never a 409).
    if (resp.status === 409 && !path.startsWith("/api/state")) refreshState();
    throw err;
  }

  function showError(err) {
    const box = $("error");
    box.replaceChildren();
    if (err instanceof ApiError && err.status === 401) {
      appendText(box, "This session is not signed in: open the address the console printed (its key works once).");
      stopPolling();
    } else if (err instanceof ApiError) {
      const p = err.problem;
      box.append(node("strong", p.title || "HTTP " + err.status));
      if (p.class) box.append(" ", node("span", "[" + p.class + "]", "badge"));
      if (p.detail) box.append(" ", node("span", p.detail));
      if (typeof p.idx === "number") box.append(" ", node("span", "(entry " + p.idx + ")"));
    } else {
      appendText(box, "The console did not answer: " + (err && err.message ? err.message : String(err)));
    }
    box.hidden = false;
  }

  function clearError() {
    $("error").hidden = true;
    $("error").replaceChildren();
  }

  /* ---------- verification state ---------- */

  let pollTimer = null;

  function fact(dl, term, value, title) {
    dl.append(node("dt", term));
    const dd = node("dd", value);
    if (title) dd.title = title;
    dl.append(dd);
    return dd;
  }

  function renderState(state) {
    const banner = $("state");
    const facts = $("state-facts");
    const summary = $("state-summary");
    facts.replaceChildren();
    summary.replaceChildren();
    const cp = state.checkpoint || {};
    if (state.auditor) {
      const who = $("who");
      who.replaceChildren();
      appendText(who, "Auditor " + state.auditor.name + " (" + state.auditor.org + ") · " + (state.server || ""));
    }
    if (state.ok) {
      banner.className = "banner banner-ok";
      summary.append(node("strong", "✔ Verified"), " ");
      appendText(summary, "The log is consistent with the checkpoint saved before and signed as pinned.");
    } else {
      const f = state.failure || {};
      banner.className = "banner banner-fail";
      summary.append(node("strong", "✖ Verification failed"), " ", node("span", f.class || "unknown", "badge failure-class"));
      if (f.detail) summary.append(" ", node("span", f.detail, "failure-detail"));
      if (typeof f.idx === "number") fact(facts, "Entry", String(f.idx));
      if (typeof f.at_ms === "number") fact(facts, "Failed at", utc(f.at_ms));
    }
    if (cp.origin !== undefined) fact(facts, "Origin", cp.origin);
    if (cp.size !== undefined) fact(facts, "Checkpoint size", String(cp.size)).id = "state-size";
    if (cp.root !== undefined) fact(facts, "Root", abbreviate(cp.root, 16), cp.root).id = "state-root";
    const witnesses = Array.isArray(cp.witnesses) ? cp.witnesses : [];
    fact(facts, "Cosigned by", witnesses.length ? witnesses.join(", ") : "no witness");
    if (state.verified_size !== undefined && state.verified_size !== null) {
      fact(facts, "Verified size", String(state.verified_size)).id = "state-verified-size";
    }
    if (state.previous_size !== undefined && state.previous_size !== null) {
      fact(facts, "Previous size", String(state.previous_size));
    }
    if (state.verified_at_ms) fact(facts, "Verified at", utc(state.verified_at_ms));
  }

  async function refreshState() {
    started($("state"));
    try {
      renderState(await api("/api/state"));
    } catch (err) {
      showError(err);
    } finally {
      finished($("state"));
    }
  }

  function startPolling() {
    stopPolling();
    pollTimer = setInterval(refreshState, STATE_POLL_MS);
  }

  function stopPolling() {
    if (pollTimer !== null) clearInterval(pollTimer);
    pollTimer = null;
  }

  /* ---------- events ---------- */

  const paging = { cursors: [null], filters: new URLSearchParams() };

  /** A datetime-local value read as UTC ("2026-12-05T10:30" or with seconds) → ms, or null. */
  function utcMs(value) {
    const m = /^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,3}))?)?$/.exec(value);
    if (!m) return null;
    const [, y, mo, d, h, mi, s, frac] = m;
    const ms = frac ? Number(frac.padEnd(3, "0")) : 0;
    return Date.UTC(Number(y), Number(mo) - 1, Number(d), Number(h), Number(mi), Number(s || 0), ms);
  }

  /** The filters in the form, as the API's query parameters (without limit and cursor). */
  function readFilters() {
    const form = $("filters");
    const params = new URLSearchParams();
    for (const name of ["actor", "org", "action", "resource", "outcome"]) {
      const value = form.elements[name].value.trim();
      if (value) params.set(name, value);
    }
    for (const name of ["since", "until"]) {
      const ms = utcMs(form.elements[name].value);
      if (ms !== null) params.set(name, String(ms));
    }
    return params;
  }

  function pageSize() {
    return $("filters").elements.limit.value;
  }

  function updateExports() {
    for (const format of ["jsonl", "csv"]) {
      const params = new URLSearchParams(paging.filters);
      params.set("format", format);
      $("export-" + format).href = "/api/export?" + params.toString();
    }
  }

  function artifactOf(event) {
    const r = event.resource || {};
    if (r.type === "artifact" && r.id) return String(r.id);
    const d = event.details || {};
    if (typeof d.artifact === "string" && d.artifact) return d.artifact;
    return null;
  }

  function artifactLink(id, text) {
    const a = node("a", text, "artifact-link");
    a.href = "#artifact=" + encodeURIComponent(id);
    a.dataset.artifact = id;
    return a;
  }

  function outcomeCell(outcome) {
    const o = outcome || {};
    const td = node("td", null, "outcome outcome-" + (["allowed", "denied", "error"].includes(o.result) ? o.result : "other"));
    appendText(td, o.result || "");
    if (o.reason) td.append(" ", node("span", o.reason, "reason"));
    return td;
  }

  function resourceCell(event) {
    const td = node("td", null, "resource");
    const r = event.resource || {};
    const text = r.id !== undefined && r.id !== null ? r.type + ":" + r.id : r.type || "";
    const artifact = artifactOf(event);
    if (r.type === "artifact" && artifact) {
      td.append(artifactLink(artifact, text));
    } else {
      appendText(td, text);
      if (artifact) td.append(" ", artifactLink(artifact, "artifact"));
    }
    return td;
  }

  function proofDetails(item, checkpoint) {
    const box = node("div", null, "proof");
    box.append(node("h3", "Leaf " + item.idx));
    box.append(node("pre", item.leaf, "leaf"));
    const head = node("p", null, "proof-head");
    if (item.verified) {
      head.append(node("span", "✔ verified", "verified"));
    } else {
      head.append(node("span", "✖ not verified", "unverified"));
    }
    appendText(head, " inclusion proof of " + item.proof.length + " hashes to the checkpoint of size " + checkpoint.size + ", root ");
    const root = node("code", abbreviate(checkpoint.root, 16));
    root.title = checkpoint.root;
    head.append(root);
    box.append(head);
    const list = node("ol", null, "hashes");
    for (const h of item.proof) list.append(node("li", h));
    box.append(list);
    const dl = node("a", "Download proof", "download-proof");
    dl.href = "/api/proof/" + encodeURIComponent(String(item.idx));
    dl.setAttribute("download", "event-" + item.idx + ".tlog-proof");
    box.append(dl);
    return box;
  }

  function eventRows(item, checkpoint) {
    const e = item.event || {};
    const actor = e.actor || {};
    const tr = document.createElement("tr");
    tr.className = "event";
    tr.dataset.idx = String(item.idx);
    tr.append(
      node("td", String(item.idx), "num"),
      node("td", utc(e.time_ms), "time"),
      node("td", actor.name || actor.type || "", "actor"),
      node("td", actor.org || "", "org"),
      node("td", e.action || "", "action"),
      resourceCell(e),
      outcomeCell(e.outcome),
    );
    const toggle = node("button", "Proof", "expand");
    toggle.type = "button";
    toggle.setAttribute("aria-expanded", "false");
    const cell = node("td", null, "proof-toggle");
    cell.append(toggle);
    tr.append(cell);

    const detail = document.createElement("tr");
    detail.className = "detail";
    detail.hidden = true;
    const td = document.createElement("td");
    td.colSpan = 8;
    detail.append(td);
    toggle.addEventListener("click", () => {
      const open = detail.hidden;
      if (open && !td.firstChild) td.append(proofDetails(item, checkpoint));
      detail.hidden = !open;
      toggle.setAttribute("aria-expanded", String(open));
      toggle.textContent = open ? "Hide" : "Proof";
    });
    return [tr, detail];
  }

  let eventsLoad = 0;

  async function loadEvents() {
    const load = ++eventsLoad; // only the newest request may draw (filters can change mid-flight)
    const page = paging.cursors.length - 1;
    const params = new URLSearchParams(paging.filters);
    params.set("limit", pageSize());
    const cursor = paging.cursors[page];
    if (cursor) params.set("cursor", cursor);
    const body = $("events-body");
    started($("events"));
    try {
      const data = await api("/api/events?" + params.toString());
      if (load !== eventsLoad) return;
      clearError();
      body.replaceChildren();
      for (const item of data.items) body.append(...eventRows(item, data.checkpoint));
      if (!data.items.length) {
        const tr = document.createElement("tr");
        const td = node("td", "No event matches.", "empty");
        td.colSpan = 8;
        tr.append(td);
        body.append(tr);
      }
      $("prev").disabled = page === 0;
      $("next").disabled = !data.next_cursor;
      $("next").dataset.cursor = data.next_cursor || "";
      $("page-info").textContent = "Page " + (page + 1) + " · " + data.items.length + " events · checkpoint size " + data.checkpoint.size;
    } catch (err) {
      if (load !== eventsLoad) return;
      const tr = document.createElement("tr");
      const td = node("td", "Not shown: " + (err instanceof ApiError ? err.problem.title || "HTTP " + err.status : "no answer"), "empty");
      td.colSpan = 8;
      tr.append(td);
      body.replaceChildren(tr);
      $("next").disabled = true;
      $("page-info").textContent = "";
      showError(err);
    } finally {
      if (load === eventsLoad) finished($("events"));
    }
  }

  function applyFilters() {
    paging.filters = readFilters();
    paging.cursors = [null];
    updateExports();
    loadEvents();
    loadCharts();
  }

  /* ---------- custody timeline ---------- */

  function hashArtifact() {
    const m = /^#artifact=(.+)$/.exec(location.hash);
    if (!m) return null;
    try {
      return decodeURIComponent(m[1]);
    } catch (_) {
      return null;
    }
  }

  async function showTimeline() {
    const id = hashArtifact();
    const section = $("timeline");
    if (id === null) {
      section.hidden = true;
      return;
    }
    section.hidden = false;
    started(section);
    const facts = $("timeline-artifact");
    const list = $("timeline-list");
    facts.replaceChildren();
    list.replaceChildren();
    fact(facts, "Artifact", id);
    try {
      const data = await api("/api/artifacts/" + encodeURIComponent(id) + "/timeline");
      clearError();
      facts.replaceChildren();
      const a = data.artifact || {};
      fact(facts, "Name", a.name ?? "").id = "timeline-name";
      fact(facts, "Organisation", a.org ?? "");
      fact(facts, "Artifact", a.id ?? id);
      for (const entry of data.events) {
        const kind = KINDS.includes(entry.kind) ? entry.kind : "other";
        const li = node("li", null, "entry kind-" + kind);
        li.dataset.kind = kind;
        li.dataset.idx = String(entry.idx);
        const head = node("p", null, "entry-head");
        head.append(node("span", kind, "kind"), " ", node("time", utc(entry.time_ms)), " ");
        const actor = entry.actor || {};
        head.append(node("span", (actor.name || "") + (actor.org ? " (" + actor.org + ")" : ""), "actor"));
        head.append(" ", node("code", entry.action || "", "action"));
        const result = (entry.outcome || {}).result;
        if (result && result !== "allowed") head.append(" ", node("span", result, "badge outcome-" + result));
        li.append(head, node("p", entry.summary || "", "summary"));
        list.append(li);
      }
      section.scrollIntoView({ block: "start" });
    } catch (err) {
      showError(err);
    } finally {
      finished(section);
    }
  }

  /* ---------- charts ---------- */

  function chartFor(id, config) {
    const canvas = $(id);
    const old = window.Chart.getChart(canvas);
    if (old) old.destroy();
    return new window.Chart(canvas, config);
  }

  /** "12-05 14:00" for hour buckets (UTC); the year is in the tooltip's full time. */
  function bucketLabels(buckets) {
    return buckets.map((t) => utc(t).slice(5, 16));
  }

  function barConfig(labels, values, label, { horizontal = false } = {}) {
    return {
      type: "bar",
      data: { labels, datasets: [{ label, data: values, backgroundColor: labels.map((_, i) => PALETTE[i % PALETTE.length]) }] },
      options: {
        indexAxis: horizontal ? "y" : "x",
        plugins: { legend: { display: false } },
        scales: { [horizontal ? "x" : "y"]: { beginAtZero: true, ticks: { precision: 0 } } },
      },
    };
  }

  function renderCharts(data) {
    const dl = data.downloads || { buckets: [], testers: [] };
    const labels = bucketLabels(dl.buckets);
    chartFor("chart-downloads", {
      type: "line",
      data: {
        labels,
        datasets: dl.testers.map((t, i) => ({
          label: visibleText(t.name),
          tester: t.name,
          data: t.downloads,
          borderColor: PALETTE[i % PALETTE.length],
          backgroundColor: PALETTE[i % PALETTE.length],
          tension: 0,
        })),
      },
      options: { scales: { y: { beginAtZero: true, ticks: { precision: 0 } } } },
    });
    chartFor("chart-bytes", {
      type: "bar",
      data: {
        labels,
        datasets: dl.testers.map((t, i) => ({ label: visibleText(t.name), tester: t.name, data: t.bytes, backgroundColor: PALETTE[i % PALETTE.length] })),
      },
      options: {
        scales: { x: { stacked: true }, y: { stacked: true, beginAtZero: true, ticks: { callback: (v) => formatBytes(v) } } },
        plugins: { tooltip: { callbacks: { label: (c) => c.dataset.label + ": " + formatBytes(c.parsed.y) } } },
      },
    });
    const refusals = data.refusals || [];
    chartFor(
      "chart-refusals",
      barConfig(refusals.map((r) => visibleText(r.reason)), refusals.map((r) => r.count), "Refusals", { horizontal: true }),
    );
    const findings = data.findings || { by_severity: {}, by_status: {} };
    const severityOrder = ["critical", "high", "medium", "low", "info"];
    const severities = Object.keys(findings.by_severity).sort(
      (a, b) => (severityOrder.indexOf(a) + 1 || 99) - (severityOrder.indexOf(b) + 1 || 99) || a.localeCompare(b),
    );
    chartFor("chart-severity", barConfig(severities.map((k) => visibleText(k)), severities.map((k) => findings.by_severity[k]), "Findings"));
    const statuses = Object.keys(findings.by_status);
    chartFor("chart-status", {
      type: "doughnut",
      data: {
        labels: statuses.map((k) => visibleText(k)),
        datasets: [{ label: "Findings", data: statuses.map((k) => findings.by_status[k]), backgroundColor: statuses.map((_, i) => PALETTE[i % PALETTE.length]) }],
      },
      options: { plugins: { legend: { position: "right" } } },
    });
    const hours = data.bucket_ms / 3600000;
    $("charts-info").textContent = "Buckets of " + (hours >= 1 ? hours + " h" : data.bucket_ms / 60000 + " min") + ", UTC; from verified rows only.";
  }

  async function loadCharts() {
    if (!window.Chart) {
      showError(new Error("the charting library did not load"));
      return;
    }
    const params = new URLSearchParams();
    for (const name of ["since", "until"]) {
      if (paging.filters.has(name)) params.set(name, paging.filters.get(name));
    }
    const section = $("charts");
    started(section);
    try {
      renderCharts(await api("/api/charts" + (params.toString() ? "?" + params.toString() : "")));
    } catch (err) {
      // Never leave figures standing that the console no longer vouches for.
      for (const canvas of section.querySelectorAll("canvas")) window.Chart.getChart(canvas)?.destroy();
      const info = $("charts-info");
      info.replaceChildren(node("strong", "Not drawn: ", "unverified"));
      appendText(info, err instanceof ApiError ? err.problem.title || "HTTP " + err.status : String(err));
      showError(err);
    } finally {
      finished(section);
    }
  }

  /* ---------- wiring ---------- */

  function start() {
    if (window.Chart) {
      // Deterministic drawing (and no animation frames racing screenshots); the page's fonts.
      window.Chart.defaults.animation = false;
      window.Chart.defaults.font.family = getComputedStyle(document.body).fontFamily;
      window.Chart.defaults.maintainAspectRatio = false;
    }
    const form = $("filters");
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      applyFilters();
    });
    form.addEventListener("reset", () => setTimeout(applyFilters, 0));
    $("next").addEventListener("click", () => {
      const cursor = $("next").dataset.cursor;
      if (!cursor) return;
      paging.cursors.push(cursor);
      loadEvents();
    });
    $("prev").addEventListener("click", () => {
      if (paging.cursors.length > 1) paging.cursors.pop();
      loadEvents();
    });
    $("timeline-close").addEventListener("click", (ev) => {
      ev.preventDefault();
      history.pushState(null, "", location.pathname + location.search);
      showTimeline();
    });
    window.addEventListener("hashchange", showTimeline);
    refreshState();
    startPolling();
    applyFilters();
    showTimeline();
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
