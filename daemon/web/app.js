// Gantry's web dashboard: a page over the daemon's /v1 API, no build step and no framework.
// Every value that came from the API (job names, reasons, log lines) reaches the page as text
// (`textContent`), never as markup.
"use strict";

const TOKEN_KEY = "gantry.token";
const FINAL = new Set(["succeeded", "failed", "cancelled"]);
const STATES = ["queued", "scheduled", "running", "restarting", "succeeded", "failed", "cancelled"];

// What the page shows, for whoever inspects it (the browser tests read the charts' data here).
const gantry = (window.gantry = { charts: {}, whoami: null });

// The view on screen: a number that changes with each view, so that a poll still in flight when
// the user moved on writes nothing, and its timers, stopped when the view changes.
let viewId = 0;
let viewTasks = [];
function stopView() {
  viewId++;
  viewTasks.forEach((stop) => stop());
  viewTasks = [];
  gantry.charts = {};
  document.title = "Gantry";
}

// ---- DOM ----

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function show(...children) {
  const main = document.getElementById("main");
  main.replaceChildren(...children);
}

function stateBadge(state) {
  return h("span", { class: `state state-${state}` }, state);
}

function jobLink(id, text) {
  return h("a", { href: `/jobs/${id}` }, text ?? `#${id}`);
}

// ---- formatting ----

function fmtTime(ms) {
  return ms ? new Date(ms).toLocaleString() : "—";
}
function fmtDuration(s) {
  if (!isFinite(s) || s < 0) return "—";
  s = Math.round(s);
  const hh = Math.floor(s / 3600), mm = Math.floor((s % 3600) / 60), ss = s % 60;
  return hh ? `${hh}h ${mm}m` : mm ? `${mm}m ${ss}s` : `${ss}s`;
}
function fmtBytes(b) {
  if (b === null || b === undefined) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (b >= 1024 && i < units.length - 1) { b /= 1024; i++; }
  return `${b.toFixed(i ? 1 : 0)} ${units[i]}`;
}
function fmtNum(x, digits = 0) {
  return x === null || x === undefined || !isFinite(x) ? "—" : Number(x).toLocaleString(undefined, { maximumFractionDigits: digits });
}

// ---- the API, with the user's token ----

class Unauthorized extends Error {}

async function api(path, opts = {}) {
  const headers = Object.assign({}, opts.headers);
  const token = localStorage.getItem(TOKEN_KEY);
  if (token) headers["Authorization"] = `Bearer ${token}`;
  const resp = await fetch(path, Object.assign({}, opts, { headers }));
  if (resp.status === 401) {
    throw new Unauthorized((await resp.json().catch(() => ({}))).message || "a token is needed");
  }
  if (resp.status === 204) return null;
  const body = await resp.json().catch(() => null);
  if (!resp.ok) {
    const err = new Error(body && body.message ? body.message : `${resp.status} ${resp.statusText}`);
    err.status = resp.status;
    err.body = body;
    throw err;
  }
  return body;
}

// Asks for a token: the daemon runs with --tokens and the browser holds none (or a revoked one).
// It is kept in this browser's local storage, so the page asks once.
function askForToken(message) {
  stopView();
  // A stored token that was refused (revoked, or another daemon's) is forgotten.
  const refused = localStorage.getItem(TOKEN_KEY) !== null;
  localStorage.removeItem(TOKEN_KEY);
  gantry.whoami = null;
  const why = refused
    ? `The token was refused: ${message}. Paste a valid one.`
    : "Paste the secret that `gantry token new` printed for you. This browser keeps it until you sign out.";
  const input = h("input", { type: "password", name: "token", autocomplete: "off", placeholder: "the secret from `gantry token new`" });
  const form = h(
    "form",
    { class: "token-form", id: "token-form", onsubmit: (e) => { e.preventDefault(); localStorage.setItem(TOKEN_KEY, input.value.trim()); route(); } },
    h("h1", {}, "This daemon needs a token"),
    h("p", { class: "muted", id: "token-why" }, why),
    input,
    h("button", { class: "primary", type: "submit" }, "Sign in"),
  );
  show(form);
  input.focus();
}

function signOut() {
  localStorage.removeItem(TOKEN_KEY);
  gantry.whoami = null;
  route();
}

async function whoami() {
  if (!gantry.whoami) gantry.whoami = await api("/v1/whoami");
  const w = gantry.whoami;
  const who = document.getElementById("who");
  who.replaceChildren(
    `${w.node} · gantry ${w.version}`,
    w.tokens ? ` · ${w.user} (${w.role})` : "",
    w.tokens ? h("button", { id: "sign-out", onclick: signOut }, "Sign out") : "",
  );
  return w;
}

// Whether the signed-in user may cancel this job: an admin any, a user its own.
function mayChange(job) {
  const w = gantry.whoami;
  return w && (w.role === "admin" || (w.user && w.user === job.owner));
}

// ---- routing: the daemon serves this page at each of these paths ----

function route() {
  stopView();
  const path = location.pathname;
  document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("active", a.getAttribute("href") === path));
  let view;
  const m = path.match(/^\/jobs\/(\d+)$/);
  if (m) view = () => jobView(Number(m[1]));
  else if (path === "/queue") view = queueView;
  else if (path === "/devices") view = devicesView;
  else if (path === "/submit") view = submitView;
  else view = jobsView;
  whoami()
    .then(view)
    .catch((e) => (e instanceof Unauthorized ? askForToken(e.message) : show(h("div", { class: "notice error" }, e.message))));
}

function go(path) {
  history.pushState(null, "", path);
  route();
}

document.addEventListener("click", (e) => {
  const a = e.target.closest("a");
  if (!a || a.origin !== location.origin || e.ctrlKey || e.metaKey || e.shiftKey || a.target) return;
  e.preventDefault();
  go(a.pathname + a.search);
});
window.addEventListener("popstate", route);

// Runs `fn(current)` now and again `ms` after each run ends (runs never overlap, so a slow
// daemon is not sent a pile of requests), until the view changes or `fn` returns false.
// `current()` says whether the view is still on screen. An error is shown above the view
// instead of stopping it.
function poll(ms, fn, errorBox) {
  const mine = viewId;
  const current = () => mine === viewId;
  let timer = null;
  const run = async () => {
    let again = true;
    try {
      again = (await fn(current)) !== false;
      if (current()) errorBox.replaceChildren();
    } catch (e) {
      if (!current()) return;
      if (e instanceof Unauthorized) return askForToken(e.message);
      errorBox.replaceChildren(h("div", { class: "notice error" }, `cannot reach the daemon: ${e.message}`));
    }
    if (again && current()) timer = setTimeout(run, ms);
  };
  viewTasks.push(() => clearTimeout(timer));
  run();
}

// ---- jobs ----

// The newest steps of a job: its rate (rank 0's tokens/s at the newest step: every rank reports
// the whole job's rate) and an ETA from the median step time of the last ten steps.
async function progressOf(job) {
  if (job.step === null || job.step === undefined) return {};
  const r = await api(`/v1/jobs/${job.id}/metrics?after_step=${Math.max(0, job.step - 10)}`);
  const steps = r.steps;
  if (!steps.length) return {};
  const last = steps[steps.length - 1].step;
  const rank0 = steps.filter((s) => s.rank === 0);
  const tokensPerS = rank0.length ? rank0[rank0.length - 1].tokens_per_s : null;
  const ms = rank0.map((s) => s.step_ms).sort((a, b) => a - b);
  const median = ms[Math.floor(ms.length / 2)];
  const eta = FINAL.has(job.state) || median === undefined ? null : ((job.spec.train.steps - last) * median) / 1000;
  return { tokensPerS, eta };
}

function progressCell(job) {
  const total = job.spec.train.steps;
  const done = job.step || 0;
  const pct = Math.min(100, (100 * done) / total);
  return h("td", {}, h("span", { class: "bar" }, h("span", { style: `width:${pct.toFixed(1)}%` })), `${done}/${total}`);
}

async function jobsView() {
  const params = new URLSearchParams(location.search);
  const state = params.get("state") || "";
  const select = h(
    "select",
    { id: "state-filter", onchange: (e) => go(e.target.value ? `/?state=${e.target.value}` : "/") },
    h("option", { value: "" }, "all states"),
    STATES.map((s) => h("option", { value: s, selected: s === state }, s)),
  );
  const errors = h("div");
  const body = h("tbody");
  const table = h(
    "table",
    { id: "jobs" },
    h("thead", {}, h("tr", {}, ["job", "name", "state", "owner", "progress", "ETA", "tokens/s", "devices", "submitted"].map((c) =>
      h("th", { class: ["ETA", "tokens/s"].includes(c) ? "num" : null }, c)))),
    body,
  );
  show(h("h1", {}, "Jobs"), h("div", { class: "toolbar" }, h("label", {}, "State ", select)), errors, table);
  poll(3000, async () => {
    const page = await api(`/v1/jobs?limit=200${state ? `&state=${state}` : ""}`);
    const jobs = page.jobs.slice().sort((a, b) => b.id - a.id);
    const progress = await Promise.all(jobs.map((j) => (j.state === "running" ? progressOf(j).catch(() => ({})) : {})));
    body.replaceChildren(
      ...jobs.map((j, i) =>
        h(
          "tr",
          { "data-job": j.id },
          h("td", {}, jobLink(j.id)),
          h("td", {}, jobLink(j.id, j.name)),
          h("td", { title: j.reason }, stateBadge(j.state)),
          h("td", {}, j.owner || "—"),
          progressCell(j),
          h("td", { class: "num" }, fmtDuration(progress[i].eta)),
          h("td", { class: "num" }, fmtNum(progress[i].tokensPerS)),
          h("td", {}, j.placement.length ? j.placement.join(", ") : FINAL.has(j.state) ? "—" : `${j.devices} wanted`),
          h("td", {}, fmtTime(j.created_ms)),
        ),
      ),
    );
    if (!jobs.length) body.replaceChildren(h("tr", {}, h("td", { colspan: 9, class: "muted" }, state ? `no ${state} jobs` : "no jobs yet: submit one")));
  }, errors);
}

// ---- one job ----

// A chart of one step series, one line per rank, updated as steps arrive.
function makeChart(el, key, title, unit, format) {
  const chart = { key, ranks: [], steps: [], byRank: new Map(), plot: null, el };
  chart.add = (rows) => {
    for (const r of rows) {
      if (!chart.byRank.has(r.rank)) chart.byRank.set(r.rank, new Map());
      chart.byRank.get(r.rank).set(r.step, r[key]);
    }
    const ranks = [...chart.byRank.keys()].sort((a, b) => a - b);
    const steps = [...new Set(ranks.flatMap((r) => [...chart.byRank.get(r).keys()]))].sort((a, b) => a - b);
    const data = [steps, ...ranks.map((r) => steps.map((s) => (chart.byRank.get(r).has(s) ? chart.byRank.get(r).get(s) : null)))];
    chart.data = data;
    el.dataset.points = String(steps.length);
    el.dataset.ranks = String(ranks.length);
    if (!steps.length) return;
    el.querySelector(".empty")?.remove();
    if (!chart.plot || ranks.length !== chart.ranks.length) {
      chart.ranks = ranks;
      if (chart.plot) chart.plot.destroy();
      const colors = ["#2f6fde", "#cf222e", "#1f883d", "#9a6700", "#8250df", "#bf3989", "#0a7f8c", "#57606a"];
      chart.plot = new uPlot(
        {
          width: Math.max(300, el.clientWidth - 16),
          height: 200,
          scales: { x: { time: false } },
          axes: [{ label: "step" }, Object.assign({ label: unit, size: 70 }, format ? { values: (u, splits) => splits.map(format) } : {})],
          series: [{ label: "step" }, ...ranks.map((r, i) => ({ label: `rank ${r}`, stroke: colors[i % colors.length], width: 1.5, spanGaps: true }))],
          legend: { show: ranks.length > 1 },
        },
        data,
        el.querySelector(".plot"),
      );
    } else {
      chart.plot.setData(data);
    }
  };
  el.append(h("h3", {}, title), h("p", { class: "muted empty" }, "no steps recorded yet"), h("div", { class: "plot" }));
  gantry.charts[key] = chart;
  return chart;
}

async function jobView(id) {
  const errors = h("div");
  const title = h("h1", {}, `Job ${id}`);
  const facts = h("dl", { class: "facts" });
  const actions = h("div", { class: "toolbar" });
  const chartsEl = h("div", { class: "charts" });
  const events = h("ol", { class: "events", id: "events" });
  const checkpoints = h("tbody");
  const spec = h("pre", { id: "spec" });
  const rankSelect = h("select", { id: "log-rank" });
  const logsEl = h("pre", { class: "logs", id: "logs" });
  show(
    title, errors, facts, actions,
    h("h2", {}, "Training"), chartsEl,
    h("h2", {}, "Events"), events,
    h("h2", {}, "Logs"), h("div", { class: "toolbar" }, h("label", {}, "Rank ", rankSelect), h("span", { class: "muted", id: "log-state" })), logsEl,
    h("h2", {}, "Checkpoints"), h("table", { id: "checkpoints" }, h("thead", {}, h("tr", {}, h("th", { class: "num" }, "step"), h("th", { class: "num" }, "size"), h("th", {}, "written"), h("th", {}, "path"))), checkpoints),
    h("h2", {}, "Spec"), spec,
  );
  const series = [
    ["loss", "Loss", "loss"],
    ["lr", "Learning rate", "lr"],
    ["grad_norm", "Gradient norm", "norm"],
    ["tokens_per_s", "Tokens per second", "tokens/s"],
    ["mem_bytes", "Memory per rank", "", fmtBytes],
    ["step_ms", "Step time", "ms"],
  ].map(([key, label, unit, format]) => {
    const el = h("div", { class: "chart", id: `chart-${key}` });
    chartsEl.append(el);
    return makeChart(el, key, label, unit, format);
  });

  let job = null;
  // The newest step seen of each rank: ranks report on their own, so one rank's step N may be
  // stored after another's. Each poll reads from the step of the rank furthest behind.
  const lastStep = new Map();
  let logRanks = 0;
  let finalPolls = 0;
  const logs = logReader(id, rankSelect, logsEl);
  poll(2000, async (current) => {
    job = await api(`/v1/jobs/${id}`);
    if (!current()) return false;
    document.title = `${job.name} · Gantry`;
    title.replaceChildren(`${job.name} `, stateBadge(job.state));
    const done = job.step || 0;
    facts.replaceChildren(
      ...[
        ["job", `#${job.id}`],
        ["why", job.reason || "—"],
        ["owner", job.owner || "—"],
        ["progress", `${done} of ${job.spec.train.steps} steps`],
        ["devices", job.placement.length ? job.placement.join(", ") : `${job.devices} wanted`],
        ["restarts", `${job.restarts} of ${job.spec.restart.max_restarts}`],
        ["memory per rank", job.memory_estimate ? `${fmtBytes(job.memory_estimate.per_rank)} estimated` : "—"],
        ["run directory", job.run_dir],
        ["submitted", fmtTime(job.created_ms)],
      ].flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]),
    );
    actions.replaceChildren(
      !FINAL.has(job.state) && mayChange(job)
        ? h("button", { class: "danger", id: "cancel", onclick: () => cancel(job) }, "Cancel job")
        : "",
    );
    if (!spec.textContent) spec.textContent = JSON.stringify(job.spec, null, 2);
    if (job.devices !== logRanks) {
      logRanks = Math.max(1, job.devices);
      rankSelect.replaceChildren(...Array.from({ length: logRanks }, (_, r) => h("option", { value: r }, `rank ${r}`)));
    }
    // The steps recorded since the last poll, page by page until a page is empty (a page holds
    // whole steps only, so a full one may hold fewer rows than the limit).
    let after = lastStep.size ? Math.min(...lastStep.values()) : 0;
    for (;;) {
      const page = await api(`/v1/jobs/${id}/metrics?after_step=${after}&limit=10000`);
      if (!current()) return false;
      if (!page.steps.length) break;
      series.forEach((c) => c.add(page.steps));
      for (const r of page.steps) lastStep.set(r.rank, Math.max(lastStep.get(r.rank) || 0, r.step));
      after = page.steps[page.steps.length - 1].step;
    }
    const ev = await api(`/v1/jobs/${id}/events`);
    events.replaceChildren(
      ...ev.events.map((e) => h("li", {}, h("span", { class: "muted" }, fmtTime(e.at_ms)), " ", e.from ? `${e.from} → ` : "", stateBadge(e.to), " ", e.reason)),
    );
    const ck = await api(`/v1/jobs/${id}/checkpoints`);
    const rows = ck.checkpoints.slice().reverse().map((c) =>
      h("tr", {}, h("td", { class: "num" }, c.step), h("td", { class: "num" }, fmtBytes(c.bytes)), h("td", {}, fmtTime(c.written_ms)), h("td", {}, c.path)));
    if (ck.final_model) rows.unshift(h("tr", {}, h("td", { class: "num" }, "final"), h("td", {}, ""), h("td", {}, ""), h("td", {}, ck.final_model)));
    checkpoints.replaceChildren(...(rows.length ? rows : [h("tr", {}, h("td", { colspan: 4, class: "muted" }, "none yet"))]));
    await logs.read(current);
    // A job that has ended changes no more: two more rounds pick up what its ranks reported
    // last (a stopped worker's log is stored as it exits), then the page stops asking.
    finalPolls = FINAL.has(job.state) ? finalPolls + 1 : 0;
    if (finalPolls >= 3) {
      logs.status("the job is over: every line is here");
      return false;
    }
  }, errors);
}

async function cancel(job) {
  if (!confirm(`Cancel job ${job.id} (${job.name})?`)) return;
  try {
    await api(`/v1/jobs/${job.id}/cancel`, { method: "POST" });
    route();
  } catch (e) {
    alert(e.message);
  }
}

// The log of one rank, read a page at a time after the last offset shown (polled with the rest of
// the job page: a stream held open per tab would use up the browser's six connections to the
// daemon). The page keeps the newest MAX_LOG_LINES lines.
const MAX_LOG_LINES = 5000;
function logReader(id, rankSelect, pre) {
  let after = null;
  let lines = [];
  const status = (text) => {
    const el = document.getElementById("log-state");
    if (el) el.textContent = text;
  };
  // Reads run one after another: the poll's and one a change of rank starts would otherwise
  // append the same lines twice.
  let queue = Promise.resolve();
  const reader = {
    status,
    read(current) {
      // (An earlier read's failure is the earlier caller's to report.)
      queue = queue.catch(() => {}).then(() => readPages(current));
      return queue;
    },
  };
  async function readPages(current) {
    const rank = rankSelect.value || 0;
    for (;;) {
      const page = await api(`/v1/jobs/${id}/logs?rank=${rank}&limit=2000${after === null ? "" : `&after=${after}`}`);
      if (!current() || String(rank) !== String(rankSelect.value || 0)) return;
      if (!page.lines.length) break;
      const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
      lines = lines.concat(page.lines.map((l) => l.line + "\n"));
      if (lines.length > MAX_LOG_LINES) lines = lines.slice(lines.length - MAX_LOG_LINES);
      pre.textContent = lines.join("");
      if (atBottom) pre.scrollTop = pre.scrollHeight;
      after = page.lines[page.lines.length - 1].offset;
    }
    status(lines.length >= MAX_LOG_LINES ? `following (the newest ${MAX_LOG_LINES} lines)` : "following");
  }
  rankSelect.addEventListener("change", () => {
    after = null;
    lines = [];
    pre.textContent = "";
    const mine = viewId;
    reader.read(() => mine === viewId).catch(() => {});
  });
  return reader;
}

// ---- queue and devices ----

async function queueView() {
  const errors = h("div");
  const body = h("tbody");
  show(
    h("h1", {}, "Queue"),
    h("p", { class: "muted" }, "Jobs waiting for devices, first come first served, with what each waits for."),
    errors,
    h("table", { id: "queue" }, h("thead", {}, h("tr", {}, ["position", "job", "name", "state", "owner", "devices", "waits for", "since"].map((c) => h("th", {}, c)))), body),
  );
  poll(3000, async () => {
    const [queued, restarting] = await Promise.all([api("/v1/jobs?state=queued&limit=1000"), api("/v1/jobs?state=restarting&limit=1000")]);
    const jobs = [...queued.jobs, ...restarting.jobs].sort((a, b) => a.id - b.id);
    body.replaceChildren(
      ...jobs.map((j, i) =>
        h("tr", { "data-job": j.id }, h("td", {}, i + 1), h("td", {}, jobLink(j.id)), h("td", {}, jobLink(j.id, j.name)), h("td", {}, stateBadge(j.state)),
          h("td", {}, j.owner || "—"), h("td", {}, j.devices), h("td", { class: "reason" }, j.reason), h("td", {}, fmtTime(j.updated_ms)))),
    );
    if (!jobs.length) body.replaceChildren(h("tr", {}, h("td", { colspan: 8, class: "muted" }, "nothing waits")));
  }, errors);
}

async function devicesView() {
  const errors = h("div");
  const body = h("tbody");
  const node = h("p", { class: "muted" });
  show(h("h1", {}, "Devices"), node, errors,
    h("table", { id: "devices" }, h("thead", {}, h("tr", {}, ["device", "kind", "held by", "owner", "state"].map((c) => h("th", {}, c)))), body));
  poll(3000, async () => {
    const devices = await api("/v1/devices");
    const holders = [...new Set(devices.devices.map((d) => d.job_id).filter((j) => j !== null))];
    const byId = new Map((await Promise.all(holders.map((j) => api(`/v1/jobs/${j}`).catch(() => null)))).filter(Boolean).map((j) => [j.id, j]));
    const busy = devices.devices.filter((d) => d.job_id !== null).length;
    node.textContent = `Node ${gantry.whoami.node}: ${busy} of ${devices.devices.length} device slots busy.`;
    body.replaceChildren(
      ...devices.devices.map((d) => {
        const j = d.job_id !== null ? byId.get(d.job_id) : null;
        return h("tr", { "data-device": d.id }, h("td", {}, d.id), h("td", {}, d.kind),
          h("td", {}, d.job_id !== null ? jobLink(d.job_id, j ? `#${d.job_id} ${j.name}` : `#${d.job_id}`) : h("span", { class: "muted" }, "free")),
          h("td", {}, j ? j.owner || "—" : ""), h("td", {}, j ? stateBadge(j.state) : ""));
      }),
    );
  }, errors);
}

// ---- submit ----

// The line of `text` that sets a dotted field (`train.lr`): in TOML the key in the field's table,
// in JSON the first line with the field's last key; 0 if none is found.
function lineOf(text, field) {
  const json = text.trimStart().startsWith("{");
  const last = field.split(".").pop();
  const lines = text.split("\n");
  let table = "";
  for (let i = 0; i < lines.length; i++) {
    const t = lines[i].trim();
    const header = t.match(/^\[([^\]]+)\]$/);
    if (header && !json) { table = header[1].trim(); continue; }
    const key = t.match(/^"?([A-Za-z0-9_-]+)"?\s*[=:]/);
    if (!key) continue;
    if (json ? key[1] === last : (table ? `${table}.${key[1]}` : key[1]) === field) return i + 1;
  }
  return 0;
}

function submitView() {
  const text = h("textarea", { id: "spec-text", spellcheck: "false", placeholder: 'name = "tiny"\n[model]\npath = "/data/models/gpt2"\n...' });
  const format = h("select", { id: "spec-format" }, h("option", { value: "toml" }, "TOML"), h("option", { value: "json" }, "JSON"));
  const error = h("div", { id: "spec-error", role: "alert" });
  const submit = async (e) => {
    e.preventDefault();
    error.replaceChildren();
    text.classList.remove("invalid");
    const body = text.value;
    const fmt = format.value === "toml" && body.trimStart().startsWith("{") ? "json" : format.value;
    try {
      const job = await api("/v1/jobs", { method: "POST", headers: { "Content-Type": fmt === "toml" ? "application/toml" : "application/json" }, body });
      go(`/jobs/${job.id}`);
    } catch (err) {
      if (err instanceof Unauthorized) return askForToken(err.message);
      text.classList.add("invalid");
      const field = err.body && err.body.field;
      // A field's key is found in the text; a syntax error says its line itself.
      const line = field ? lineOf(body, field) : Number((err.message.match(/at line (\d+)/) || [])[1] || 0);
      error.dataset.field = field || "";
      error.replaceChildren(
        h("div", { class: "field-error" }, field ? h("code", {}, field) : "", field ? ": " : "", err.message, field && line ? ` (line ${line})` : ""),
      );
      if (line) {
        // Select the line at fault so the user sees where to look.
        const starts = body.split("\n").slice(0, line - 1).reduce((n, l) => n + l.length + 1, 0);
        text.focus();
        text.setSelectionRange(starts, starts + body.split("\n")[line - 1].length);
      }
    }
  };
  show(
    h("h1", {}, "Submit a job"),
    h("p", { class: "muted" }, "Paste a job spec, as for gantry submit (see the README's spec table). Relative paths are taken from the daemon's working directory."),
    h("form", { id: "submit-form", onsubmit: submit }, h("div", { class: "toolbar" }, h("label", {}, "Format ", format)), text, error,
      h("button", { class: "primary", type: "submit", id: "submit" }, "Submit")),
  );
}

route();
