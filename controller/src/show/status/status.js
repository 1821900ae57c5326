// The status page: fetches /api/status every 2 s and draws it. Everything that came from the
// network is written with textContent, never parsed as HTML.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const W = 800, H = 260, LEFT = 56, RIGHT = 12, TOP = 12, BOTTOM = 28;
// [name, index in a history row, colour]
const SERIES = [["site", 1, "#1f77b4"], ["asic", 2, "#ff7f0e"], ["gpu", 3, "#2ca02c"], ["limit", 4, "#d62728"]];

const $ = (id) => document.getElementById(id);
const kw = (v) => (v === null || v === undefined ? "–" : v.toFixed(1));
const when = (t) => (t ? new Date(t).toLocaleTimeString() : "until released");

function svg(name, attrs) {
  const el = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  return el;
}

function tiles(s) {
  $("site").textContent = s.site;
  $("site-kw").textContent = kw(s.site_kw);
  $("asic-kw").textContent = kw(s.asic_kw);
  $("gpu-kw").textContent = kw(s.gpu_kw);
  $("limit-kw").textContent = kw(s.limit_kw);
  $("shed-kw").textContent = kw(s.shed_kw);
  $("available-kw").textContent = kw(s.load_shed_delta_available_kw);
  $("asics-on").textContent = s.asics_on;
  $("asics-off").textContent = s.asics_off;
  $("shortfall-kw").textContent = kw(s.shortfall_kw);
}

function directives(list) {
  const body = $("directives");
  body.replaceChildren();
  for (const d of list) {
    const row = document.createElement("tr");
    row.dataset.id = d.id;
    const kind = d.action.kind + (d.emergency ? " (emergency)" : "");
    const cells = [d.id, kind, d.action.kw === undefined ? "" : kw(d.action.kw), when(d.start), when(d.end), d.priority];
    for (const c of cells) {
      const td = document.createElement("td");
      td.textContent = c;
      row.append(td);
    }
    body.append(row);
  }
  $("no-directives").hidden = list.length > 0;
}

function faults(list) {
  const ul = $("faults");
  ul.replaceChildren();
  for (const f of list) {
    const li = document.createElement("li");
    li.dataset.device = f.device;
    li.textContent = f.device + ": " + f.reason;
    ul.append(li);
  }
  $("no-faults").hidden = list.length > 0;
}

function chart(history) {
  const el = $("chart");
  el.replaceChildren();
  el.dataset.points = history.length;
  if (history.length === 0) return;
  const t1 = history[history.length - 1][0];
  const t0 = Math.min(history[0][0], t1 - 60 * 1000);
  let top = 1;
  for (const row of history) for (const [, i] of SERIES) if (row[i] !== null) top = Math.max(top, row[i]);
  top *= 1.1;
  const x = (t) => LEFT + ((t - t0) / (t1 - t0)) * (W - LEFT - RIGHT);
  const y = (v) => TOP + (1 - v / top) * (H - TOP - BOTTOM);
  for (const f of [0, 0.5, 1]) {
    el.append(svg("line", { x1: LEFT, x2: W - RIGHT, y1: y(top * f), y2: y(top * f), stroke: "#eee" }));
    const label = svg("text", { x: LEFT - 6, y: y(top * f) + 4, "text-anchor": "end", "font-size": 11, fill: "#666" });
    label.textContent = (top * f).toFixed(0) + " kW";
    el.append(label);
  }
  for (const [t, anchor] of [[t0, "start"], [t1, "end"]]) {
    const label = svg("text", { x: x(t), y: H - 8, "text-anchor": anchor, "font-size": 11, fill: "#666" });
    label.textContent = new Date(t).toLocaleTimeString();
    el.append(label);
  }
  for (const [name, i, colour] of SERIES) {
    // A missing reading breaks the line rather than drawing it at zero.
    let d = "", pen = "M", n = 0;
    for (const row of history) {
      if (row[i] === null) { pen = "M"; continue; }
      d += pen + x(row[0]).toFixed(1) + " " + y(row[i]).toFixed(1) + " ";
      pen = "L";
      n += 1;
    }
    el.append(svg("path", { d: d.trim(), fill: "none", stroke: colour, "stroke-width": 2, "data-series": name, "data-points": n }));
  }
}

async function refresh() {
  let view;
  try {
    const r = await fetch("/api/status", { cache: "no-store" });
    if (!r.ok) throw new Error("HTTP " + r.status);
    view = await r.json();
  } catch (e) {
    $("state").textContent = "controller unreachable";
    $("state").className = "state bad";
    return;
  }
  if (view.status) {
    tiles(view.status);
    faults(view.status.faulted);
  }
  directives(view.directives);
  chart(view.history);
  const faulted = view.status ? view.status.faulted.length : 0;
  $("state").textContent = faulted ? faulted + " device(s) faulted" : "online";
  $("state").className = "state " + (faulted ? "bad" : "ok");
  $("updated").textContent = new Date().toLocaleTimeString();
  document.body.dataset.ready = "1";
}

refresh();
setInterval(refresh, 2000);
