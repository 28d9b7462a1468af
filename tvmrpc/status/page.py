"""The tracker's status page: one self-contained HTML document (no external assets).

The page polls ``api/v1/status`` every :data:`POLL_MS` milliseconds and
redraws its tables and an inline SVG utilisation chart in place.

Invariants:
- No URL outside this host is referenced (labs are often offline).
- Every value from the wire is inserted with ``textContent`` or as an SVG
  attribute, never parsed as HTML, so hostile keys cannot inject markup.
- Board rows carry ``data-key`` and ``data-address``; their state cell has
  class ``state`` (tests and scrapers may rely on these).
"""

from __future__ import annotations

POLL_MS = 2000

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>tvmrpc tracker</title>
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.4em;margin:0 0 .2em} h2{font-size:1.1em;margin:1.4em 0 .4em}
table{border-collapse:collapse;background:#fff;margin-bottom:.6em}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left;white-space:nowrap}
th{background:#f0f0f0} caption{text-align:left;font-weight:600;padding:.3em 0}
.state{font-weight:600} .free{color:#1a7f37} .busy{color:#b35900} .withdrawn{color:#777}
.draining,.maintenance{color:#6a1b9a} .quarantined{color:#c62828}
.crashed,.timeout,.client_gone{color:#c62828;font-weight:600} .ok{color:#1a7f37}
#meta{color:#666} .empty{color:#888;font-style:italic} svg{background:#fff;border:1px solid #ddd}
.legend span{display:inline-block;margin-right:1em}
</style></head>
<body>
<h1>tvmrpc tracker</h1>
<div id="meta">loading&hellip;</div>
<h2>Boards</h2><div id="boards"></div>
<h2>Queues</h2><div id="queues"></div>
<h2>Utilisation per key (busy share of its boards), up to the last hour</h2><div id="chart"></div>
<h2>Last sessions</h2><div id="sessions"></div>
<script>
"use strict";
const POLL = __POLL__;
function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}
function secs(s) {
  if (s === null || s === undefined) return "";
  if (s < 1) return (s * 1000).toFixed(1) + " ms";
  if (s < 120) return s.toFixed(2) + " s";
  return (s / 60).toFixed(1) + " min";
}
function clock(t) { return new Date(t * 1000).toLocaleTimeString(); }
function bytes(n) {
  if (n === null || n === undefined) return "";
  if (n < 1024) return n + " B";
  if (n < 1048576) return (n / 1024).toFixed(1) + " KiB";
  return (n / 1048576).toFixed(1) + " MiB";
}
function table(heads, rows, caption) {
  const t = el("table");
  if (caption) t.appendChild(el("caption", caption));
  const h = el("tr");
  heads.forEach(x => h.appendChild(el("th", x)));
  t.appendChild(h);
  rows.forEach(r => t.appendChild(r));
  return t;
}
function row(cells) {
  const r = el("tr");
  cells.forEach(c => r.appendChild(c instanceof Node ? c : el("td", c)));
  return r;
}
function drawBoards(doc) {
  const box = document.getElementById("boards");
  box.replaceChildren();
  const byKey = {};
  doc.boards.forEach(b => (byKey[b.key] = byKey[b.key] || []).push(b));
  const keys = Object.keys(byKey).sort();
  if (!keys.length) box.appendChild(el("div", "no boards registered", "empty"));
  keys.forEach(key => {
    const rows = byKey[key].map(b => {
      const h = b.holder;
      const r = row([b.address, el("td", b.state, "state " + b.state),
                     h ? h.address + (h.user ? " (" + h.user + ")" : "") : "",
                     secs(doc.now - (h ? h.since : b.since)),
                     h ? secs(h.queue_wait) : ""]);
      r.dataset.key = b.key;
      r.dataset.address = b.address;
      return r;
    });
    box.appendChild(table(["board", "state", "holder", "for", "holder waited"], rows, key));
  });
}
function drawQueues(doc) {
  const box = document.getElementById("queues");
  box.replaceChildren();
  const keys = Object.keys(doc.queues).sort();
  if (!keys.length) box.appendChild(el("div", "no keys yet", "empty"));
  const rows = keys.map(key => {
    const q = doc.queues[key];
    const waits = q.waiting.map(w => w.client + " p" + w.priority + " " + secs(w.age)).join(", ");
    const out = q.draining + q.maintenance + q.quarantined;
    const wait = q.expected_wait_seconds === null || q.expected_wait_seconds === undefined
      ? "unknown" : secs(q.expected_wait_seconds);
    const r = row([key, q.free, q.busy, q.withdrawn, out, q.waiting.length, wait, waits]);
    r.dataset.queue = key;
    return r;
  });
  if (rows.length)
    box.appendChild(table(
      ["key", "free", "busy", "withdrawn", "out of service", "waiting", "expected wait",
       "waits"], rows));
}
function drawSessions(doc) {
  const box = document.getElementById("sessions");
  box.replaceChildren();
  if (!doc.sessions.length) { box.appendChild(el("div", "no session yet", "empty")); return; }
  const rows = doc.sessions.map(s => row([
    s.key, s.board, s.client, clock(s.start), secs(s.hold), secs(s.queue_wait),
    el("td", s.outcome || "", s.outcome || ""), bytes(s.bytes_in), bytes(s.bytes_out),
    s.ended_by]));
  box.appendChild(table(["key", "board", "client", "start", "held", "waited", "outcome",
                         "bytes in", "bytes out", "ended"], rows));
}
const COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"];
function drawChart(doc) {
  const NS = "http://www.w3.org/2000/svg", W = 720, H = 160, P = 30;
  const box = document.getElementById("chart");
  box.replaceChildren();
  const samples = doc.utilisation.samples;
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("width", W); svg.setAttribute("height", H);
  svg.setAttribute("viewBox", "0 0 " + W + " " + H);
  const line = (x1, y1, x2, y2, c) => {
    const l = document.createElementNS(NS, "line");
    const attrs = {x1: x1, y1: y1, x2: x2, y2: y2, stroke: c};
    Object.keys(attrs).forEach(a => l.setAttribute(a, attrs[a]));
    svg.appendChild(l);
  };
  const label = (x, y, text) => {
    const t = document.createElementNS(NS, "text");
    t.setAttribute("x", x); t.setAttribute("y", y); t.setAttribute("font-size", "11");
    t.textContent = text; svg.appendChild(t);
  };
  line(P, H - P, W - 5, H - P, "#999"); line(P, 5, P, H - P, "#999");
  label(2, 12, "100%"); label(8, H - P, "0%");
  // The x axis spans the history there is: at least 2 minutes, at most an hour.
  const first = samples.length ? samples[0].t : doc.now;
  const span = Math.min(3600, Math.max(120, doc.now - first));
  label(P, H - 8, "-" + Math.round(span / 60) + " min"); label(W - 40, H - 8, "now");
  const x = t => P + (W - 5 - P) * (1 - (doc.now - t) / span);
  const y = f => H - P - (H - P - 5) * f;
  const keys = [...new Set(samples.flatMap(s => Object.keys(s.keys)))].sort();
  const legend = el("div", null, "legend");
  keys.forEach((key, i) => {
    const pts = samples.filter(s => s.keys[key] && doc.now - s.t <= span)
      .map(s => {
        return x(s.t).toFixed(1) + "," + y(s.keys[key][0]).toFixed(1);
      });
    if (pts.length === 1) {  // one sample: draw a short stub so it shows
      const [px, py] = pts[0].split(",");
      pts.unshift((parseFloat(px) - 3).toFixed(1) + "," + py);
    }
    const pl = document.createElementNS(NS, "polyline");
    pl.setAttribute("points", pts.join(" ")); pl.setAttribute("fill", "none");
    pl.setAttribute("stroke", COLORS[i % COLORS.length]); pl.setAttribute("stroke-width", "2");
    svg.appendChild(pl);
    const sw = el("span", "\\u25a0 " + key); sw.style.color = COLORS[i % COLORS.length];
    legend.appendChild(sw);
  });
  box.appendChild(svg); box.appendChild(legend);
}
async function poll() {
  try {
    const response = await fetch("api/v1/status", {cache: "no-store"});
    const doc = await response.json();
    drawBoards(doc); drawQueues(doc); drawChart(doc); drawSessions(doc);
    document.getElementById("meta").textContent =
      "updated " + clock(doc.now) + " \\u2014 " + doc.boards.length + " boards, " +
      doc.sessions.length + " recent sessions";
  } catch (err) {
    document.getElementById("meta").textContent = "tracker unreachable: " + err;
  }
  setTimeout(poll, POLL);
}
poll();
</script>
</body></html>
""".replace("__POLL__", str(POLL_MS))


def page_bytes() -> bytes:
    """The page as served at ``/``."""
    return PAGE.encode("utf-8")
