// The live page: reads /ui/stream (server-sent events, through fetch so the API token can travel
// in the Authorization header), keeps the series and draws the charts and the user panel.
"use strict";

const ui = window.tgaUi = {rows: [], markers: [], status: null, user: "", view: null,
                           connected: false, unauthorized: false, received: 0};
const MAX_ROWS = 900;
const $ = id => document.getElementById(id);

const charts = {
  events: new LineChart($("chart-events"), [
    {key: "events_in_per_s", label: "in (consumed)", color: "#1f77b4"},
    {key: "vectors_out_per_s", label: "out (user vectors)", color: "#ff7f0e"}]),
  samples: new LineChart($("chart-samples"), [
    {key: "samples_produced_per_s", label: "produced", color: "#2ca02c"},
    {key: "samples_trained_per_s", label: "trained", color: "#9467bd"}]),
  freshness: new LineChart($("chart-freshness"), [
    {key: "freshness_p50", label: "p50", color: "#17becf"},
    {key: "freshness_p99", label: "p99", color: "#d62728"}], {digits: 2}),
  lag: new LineChart($("chart-lag"), [
    {key: "worker_lag", label: "worker", color: "#8c564b"},
    {key: "trainer_lag", label: "trainer", color: "#e377c2"}], {digits: 0}),
  quality: new LineChart($("chart-quality"), [
    {key: "auc", label: "AUC", color: "#1f77b4"},
    {key: "hr@10", label: "HR@10", color: "#2ca02c"}], {yMin: 0, yMax: 1, digits: 3}),
  calibration: new LineChart($("chart-calibration"), [
    {key: "logloss", label: "logloss", color: "#ff7f0e"},
    {key: "ece", label: "ECE", color: "#9467bd"}], {digits: 3}),
  version: new LineChart($("chart-version"), [
    {key: "model_version", label: "model", color: "#1d232b"},
    {key: "serving_version", label: "serving", color: "#2ca02c"}], {yMin: null, digits: 0}),
  backlog: new LineChart($("chart-backlog"), [
    {key: "samples_backlog", label: "samples", color: "#9467bd"}], {digits: 0}),
};

function token() {
  return sessionStorage.getItem("tgastream-token") || "";
}

{  // a token given as /ui#token=... (a fragment never reaches the server) is kept for this tab only
  const m = location.hash.match(/token=([^&]*)/);
  if (m) {
    sessionStorage.setItem("tgastream-token", decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
}

let drawPending = false;
function redraw() {
  if (drawPending) return;
  drawPending = true;
  requestAnimationFrame(() => {
    drawPending = false;
    // the time axis starts when events first flowed (not at the API's start, minutes before a replay)
    const first = ui.rows.findIndex(r => r.events_in_per_s != null || r.samples_trained_per_s != null);
    const shown = first > 0 ? ui.rows.slice(Math.max(0, first - 2)) : ui.rows;
    for (const c of Object.values(charts)) c.draw(shown, ui.markers);
    const has = keys => ui.rows.some(r => keys.some(k => r[k] != null));
    $("quality-na").classList.toggle("hidden", has(["auc", "hr@10"]));
    $("calibration-na").classList.toggle("hidden", has(["logloss", "ece"]));
    const last = ui.rows[ui.rows.length - 1];
    if (last) {
      $("model-version").textContent = last.model_version == null ? "–" : last.model_version;
      $("serving-version").textContent = last.serving_version == null ? "–" : last.serving_version;
    }
  });
}

function addRows(rows, markers) {
  ui.rows.push(...rows);
  if (ui.rows.length > MAX_ROWS) ui.rows.splice(0, ui.rows.length - MAX_ROWS);
  if (markers) ui.markers = markers;
  redraw();
}

const pad = n => String(n).padStart(2, "0");
function clock(t) {
  if (!t) return "–";
  const d = new Date(t * 1000);
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}
const SHOWN_EVENTS = 20;

function sourceText(s) {
  if (s.state === "up") return "up";
  if (s.state === "down") return `down since ${clock(s.since)}`;
  return s.state;
}

function setStatus(st) {
  ui.status = st;
  const badge = $("stream-state");
  badge.textContent = st.stream.text;
  badge.className = "badge " + st.stream.state;
  for (const name of ["worker", "trainer", "events"]) {
    const el = $(name + "-state"), s = st.sources[name];
    el.textContent = sourceText(s);
    el.className = "value " + (s.state === "down" ? "down" : "");
    el.title = s.error || "";
  }
  const guard = st.model_state || {state: "live"};
  const names = {live: "live", pinned: "held (pinned)", rolled_back: "rolled back"};
  $("guard-state").textContent = (names[guard.state] || guard.state) + (guard.version != null ? ` v${guard.version}` : "");
  $("guard-state").className = "value " + guard.state;
  const notes = [];
  if (st.sources.trainer.state === "down") notes.push("The trainer is not answering: its panels keep their last values.");
  if (st.sources.worker.state === "down") notes.push("The stream worker is not answering: its panels keep their last values.");
  if (st.sources.events.state === "down") notes.push("The events topic cannot be read: " + (st.sources.events.error || "no broker") + ".");
  showMessage(notes.join(" "));
  const list = $("active-list"), data = $("active-users");
  const shown = st.active_users.join("\n");
  if (list.dataset.users === shown) return;  // unchanged: keep the buttons (and a click on one)
  list.dataset.users = shown;
  list.replaceChildren(); data.replaceChildren();
  for (const u of st.active_users) {
    const b = document.createElement("button");
    b.textContent = u; b.type = "button"; b.className = "pick-user";
    b.onclick = () => selectUser(u);
    list.append(b);
    const o = document.createElement("option"); o.value = u; data.append(o);
  }
}

function showMessage(text) {
  $("message").textContent = text;
  $("message").classList.toggle("hidden", !text);
}

function renderUser(view) {
  const before = ui.view && ui.view.user === view.user ? ui.view.events_seen : null;
  ui.view = view;
  $("user-panel").classList.remove("hidden");
  $("user-seen").textContent = `(${view.events_seen} seen)`;
  const fresh = before == null ? 0 : Math.max(0, view.events_seen - before);
  const body = $("user-events");
  body.replaceChildren();
  view.events.slice(0, SHOWN_EVENTS).forEach((e, i) => {
    const tr = document.createElement("tr");
    if (i < fresh) tr.className = "new";
    for (const v of [clock(e.arrived), e.behavior, e.item, e.category, new Date(e.ts * 1000).toISOString().slice(5, 19).replace("T", " ")]) {
      const td = document.createElement("td"); td.textContent = v; tr.append(td);
    }
    tr.dataset.item = e.item;
    body.append(tr);
  });
  $("rec-version").textContent = view.model_version == null ? "–" : view.model_version;
  const recs = $("user-recs");
  recs.replaceChildren();
  for (const r of view.recommendations) {
    const li = document.createElement("li");
    const name = document.createElement("span"), score = document.createElement("span");
    name.textContent = r.item; score.textContent = r.score.toFixed(3); score.className = "score";
    li.append(name, score);
    if (r.touched) li.className = "touched";
    recs.append(li);
  }
  $("user-note").textContent = view.known ? (view.recommendations.length ? "highlighted: items the user just touched"
    : "no item vectors yet") : "no vector for this user yet";
}

let controller = null, retry = null;

async function connect() {
  if (controller) controller.abort();
  clearTimeout(retry);
  controller = new AbortController();
  const headers = {};
  const tok = token();
  if (tok) headers.Authorization = "Bearer " + tok;
  const url = "/ui/stream" + (ui.user ? "?user=" + encodeURIComponent(ui.user) : "");
  let resp;
  try {
    resp = await fetch(url, {headers, signal: controller.signal, cache: "no-store"});
  } catch (err) {
    if (err.name !== "AbortError") serverGone();
    return;
  }
  if (resp.status === 401) {
    ui.unauthorized = true; ui.connected = false;
    showMessage("The API refused the token (missing or wrong): no data. Enter the API token.");
    $("token-form").classList.remove("hidden");
    $("stream-state").textContent = "no access";
    $("stream-state").className = "badge ended";
    return;
  }
  if (!resp.ok) { serverGone(`HTTP ${resp.status}`); return; }
  ui.unauthorized = false; ui.connected = true;
  $("token-form").classList.add("hidden");
  const reader = resp.body.getReader(), decoder = new TextDecoder();
  let buf = "";
  try {
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buf += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        handle(buf.slice(0, cut));
        buf = buf.slice(cut + 2);
      }
    }
  } catch (err) {
    if (err.name === "AbortError") return;
  }
  serverGone();
}

function handle(block) {
  let kind = "message", data = "";
  for (const line of block.split("\n")) {
    if (line.startsWith("event: ")) kind = line.slice(7);
    else if (line.startsWith("data: ")) data += line.slice(6);
  }
  if (!data) return;
  const msg = JSON.parse(data);
  ui.received++;
  if (kind === "hello") { ui.rows = []; addRows(msg.history, msg.markers); setStatus(msg.status); }
  else if (kind === "rows") addRows(msg.rows, msg.markers);
  else if (kind === "status") setStatus(msg);
  else if (kind === "user" && msg.user === ui.user) renderUser(msg);
}

function serverGone(why) {
  ui.connected = false;
  $("stream-state").textContent = "stream ended: the server stopped (last state shown)";
  $("stream-state").className = "badge ended";
  showMessage(`Lost the connection to the API${why ? " (" + why + ")" : ""}: the demo may have finished. ` +
              "Showing the last state; reconnecting every 5 s.");
  retry = setTimeout(connect, 5000);
}

function selectUser(u) {
  ui.user = u.trim();
  ui.view = null;
  $("user-id").value = ui.user;
  history.replaceState(null, "", location.pathname + "?user=" + encodeURIComponent(ui.user));
  connect();
}

$("user-form").addEventListener("submit", ev => { ev.preventDefault(); selectUser($("user-id").value); });
$("token-form").addEventListener("submit", ev => {
  ev.preventDefault();
  sessionStorage.setItem("tgastream-token", $("token").value);
  connect();
});
window.addEventListener("resize", redraw);
ui.user = new URLSearchParams(location.search).get("user") || "";
$("user-id").value = ui.user;
connect();
