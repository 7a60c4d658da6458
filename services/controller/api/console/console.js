// The Shoal console: a client of the admin REST API (/v1), nothing more. Every read and action is an API
// call with the token the user signed in with, so the API's roles decide what the console may do; the
// page only greys out what the token's role cannot do. DOM nodes are built with textContent, never
// innerHTML, so no value from the cluster is ever parsed as markup.

const TOKEN = "shoal-console-token";
const REFRESH_MS = 2000;
const SVG = "http://www.w3.org/2000/svg";
let role = null; // "viewer" | "operator" | "admin" once signed in
let timer = null;

// -- DOM helpers ----------------------------------------------------------------------------------

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (value !== false && value !== null && value !== undefined) el.setAttribute(key, value === true ? "" : value);
  }
  el.append(...children.flat().filter((c) => c !== null && c !== undefined).map((c) => (c instanceof Node ? c : String(c))));
  return el;
}

function s(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) el.setAttribute(key, value);
  el.append(...children.flat().map((c) => (c instanceof Node ? c : document.createTextNode(String(c)))));
  return el;
}

function table(columns, rows, attrs = {}) {
  return h("table", attrs,
    h("thead", {}, h("tr", {}, columns.map((c) => h("th", { class: c.num ? "num" : null }, c.title)))),
    h("tbody", {}, rows.length ? rows : h("tr", {}, h("td", { colspan: columns.length, class: "muted" }, "none"))));
}

function bar(fraction) {
  const inner = h("span");
  inner.style.width = `${Math.round(Math.max(0, Math.min(1, fraction)) * 100)}%`;
  return h("span", { class: "bar", title: `${(fraction * 100).toFixed(0)}%` }, inner);
}

const enc = encodeURIComponent; // ids in paths: a worker's id is any string the registry holds
const when = (t) => (t ? new Date(t * 1000).toLocaleTimeString() : "");
const ago = (t) => `${Math.max(0, Math.round(Date.now() / 1000 - t))} s`;
const fixed = (x, digits = 2) => (x === null || x === undefined ? "" : Number(x).toFixed(digits));

function say(text, error = false) {
  const status = document.getElementById("status");
  status.textContent = text;
  status.className = error ? "error" : "";
}

// -- the API --------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(path, options = {}) {
  const response = await fetch(path, {
    ...options,
    headers: { authorization: `Bearer ${sessionStorage.getItem(TOKEN)}`, "content-type": "application/json" },
  });
  const body = response.status === 204 ? null : await response.json().catch(() => null);
  if (!response.ok) throw new ApiError(response.status, body?.error?.message || response.statusText);
  return body;
}

const canAct = () => role === "operator" || role === "admin";

function confirmed(text) {
  const dialog = document.getElementById("confirm");
  document.getElementById("confirm-text").textContent = text;
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
    dialog.showModal();
  });
}

// A button that runs an API call after the user confirms it, then refreshes the page.
function action(label, question, call) {
  return h("button", {
    type: "button",
    disabled: !canAct(),
    title: canAct() ? null : "needs the operator role",
    "data-action": label.toLowerCase(),
    onclick: async () => {
      if (!(await confirmed(question))) return;
      try {
        await call();
        say(`${label}: done`);
      } catch (error) {
        say(`${label}: ${error.message}`, true);
      }
      render();
    },
  }, label);
}

// -- pages ----------------------------------------------------------------------------------------

const REASON_COLOURS = { up: "#1a7f37", down: "#b26b00", other: "#667085" };

function reasonColour(reason) {
  if (reason.startsWith("scale-up") || reason === "scale-from-zero") return REASON_COLOURS.up;
  if (reason.startsWith("scale-down")) return REASON_COLOURS.down;
  return REASON_COLOURS.other;
}

// The scaling decisions on a time axis, one row per pool: a dot per change, its reason beside it.
function timeline(decisions) {
  const pools = [...new Set(decisions.map((d) => d.pool))].sort();
  const width = 1000, left = 110, row = 34;
  const height = 30 + row * Math.max(1, pools.length);
  const now = Date.now() / 1000;
  const start = Math.min(now - 60, ...decisions.map((d) => d.at));
  const x = (t) => left + ((t - start) / (now - start)) * (width - left - 150);
  const svg = s("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": "scaling decisions over time", id: "timeline" });
  svg.append(s("text", { x: left, y: height - 6 }, when(start)), s("text", { x: width - 190, y: height - 6 }, when(now)));
  pools.forEach((pool, i) => {
    const y = 20 + i * row;
    svg.append(s("text", { x: 4, y: y + 4 }, pool), s("line", { x1: left, x2: width - 150, y1: y, y2: y, stroke: "#d9dde5" }));
    decisions.filter((d) => d.pool === pool).forEach((d) => {
      svg.append(s("circle", { cx: x(d.at), cy: y, r: 5, fill: reasonColour(d.reason) },
        s("title", {}, `${when(d.at)} ${d.pool}: ${d.desired} replicas, ${d.reason}. ${d.explanation}`)));
    });
    const last = decisions.find((d) => d.pool === pool); // newest first
    if (last) svg.append(s("text", { x: x(last.at) + 9, y: y + 4 }, `${last.desired} (${last.reason})`));
  });
  return svg;
}

async function overview(main) {
  const [cluster, pools, scaling, decisions] = await Promise.all([
    api("/v1/cluster"), api("/v1/pools"), api("/v1/scaling"), api("/v1/scaling/decisions?limit=200"),
  ]);
  const status = Object.fromEntries(scaling.pools.map((p) => [p.pool, p]));
  main.append(
    h("h1", {}, "Cluster"),
    h("div", { class: "cards" },
      h("div", { class: "card" }, h("b", {}, cluster.models.length), "models"),
      h("div", { class: "card" }, h("b", {}, pools.length), "pools"),
      h("div", { class: "card" }, h("b", { id: "worker-count" }, cluster.workers), "workers"),
      h("div", { class: "card" }, h("b", {}, cluster.jobs_running), "jobs open"),
      h("div", { class: "card" }, h("b", {}, scaling.paused ? "paused" : "on"), "autoscaling")),
    h("h2", {}, "Pools"),
    table(
      [{ title: "pool" }, { title: "model" }, { title: "role" }, { title: "desired", num: true }, { title: "ready", num: true },
        { title: "starting", num: true }, { title: "draining", num: true }, { title: "min–max" }, { title: "policy" },
        { title: "last decision" }, { title: "scale" }],
      pools.map((p) => {
        const st = status[p.name] || {};
        const input = h("input", { type: "number", min: 0, max: p.max_replicas, value: p.replicas_override ?? st.desired ?? p.min_replicas, "aria-label": `replicas of ${p.name}`, disabled: !canAct() });
        return h("tr", { "data-pool": p.name },
          h("td", {}, p.name), h("td", {}, p.model), h("td", {}, p.role),
          h("td", { class: "num", "data-field": "desired" }, st.desired ?? ""), h("td", { class: "num", "data-field": "ready" }, st.ready ?? ""),
          h("td", { class: "num" }, st.starting ?? ""), h("td", { class: "num" }, st.draining ?? ""),
          h("td", {}, `${p.min_replicas}–${p.max_replicas}`),
          h("td", {}, p.replicas_override === null ? p.scaling.policy : `fixed at ${p.replicas_override} (manual)`),
          h("td", {}, st.reason ? h("span", { title: st.explanation }, st.reason) : ""),
          h("td", {}, input, " ",
            action("Scale", `Scale pool ${p.name}?`, () => api(`/v1/pools/${enc(p.name)}/scale`, { method: "POST", body: JSON.stringify({ replicas: Number(input.value) }) })),
            " ",
            p.replicas_override === null ? null : action("Auto", `Hand pool ${p.name} back to its ${p.scaling.policy} policy?`,
              () => api(`/v1/pools/${enc(p.name)}/scale`, { method: "POST", body: JSON.stringify({ replicas: null }) }))));
      })),
    h("h2", {}, "Scaling decisions"),
    decisions.length ? timeline(decisions) : h("p", { class: "muted" }, "none yet"),
    table(
      [{ title: "time" }, { title: "pool" }, { title: "desired", num: true }, { title: "ready", num: true }, { title: "reason" }, { title: "why" }],
      decisions.slice(0, 15).map((d) => h("tr", { "data-decision": d.pool },
        h("td", {}, when(d.at)), h("td", {}, d.pool), h("td", { class: "num" }, d.desired), h("td", { class: "num" }, d.ready),
        h("td", {}, d.reason), h("td", {}, d.explanation))),
      { id: "decisions" }));
}

async function workers(main) {
  const list = await api("/v1/workers");
  main.append(
    h("h1", {}, "Workers"),
    table(
      [{ title: "worker" }, { title: "pool" }, { title: "role" }, { title: "model" }, { title: "running", num: true },
        { title: "queued", num: true }, { title: "KV cache" }, { title: "decode tok/s", num: true }, { title: "TTFT p90 s", num: true },
        { title: "TBT p90 s", num: true }, { title: "state" }, { title: "actions" }],
      list.map((w) => h("tr", { "data-worker": w.worker_id },
        h("td", {}, w.worker_id), h("td", {}, w.pool), h("td", {}, w.role), h("td", {}, w.model),
        h("td", { class: "num" }, w.running_requests), h("td", { class: "num" }, w.waiting_requests),
        h("td", {}, bar(w.kv_usage), ` ${(w.kv_usage * 100).toFixed(0)}%`),
        h("td", { class: "num" }, fixed(w.decode_tokens_per_s, 0)), h("td", { class: "num" }, fixed(w.ttft_p90_s, 3)),
        h("td", { class: "num" }, fixed(w.tbt_p90_s, 3)),
        h("td", {}, w.draining ? h("span", { class: "tag" }, "draining") : w.cordoned ? h("span", { class: "tag" }, "cordoned") : "serving"),
        h("td", {},
          w.cordoned
            ? action("Uncordon", `Send requests to ${w.worker_id} again?`, () => api(`/v1/workers/${enc(w.worker_id)}/uncordon`, { method: "POST" }))
            : action("Drain", `Drain ${w.worker_id}? It finishes what it runs and takes nothing new.`, () => api(`/v1/workers/${enc(w.worker_id)}/drain`, { method: "POST" })),
          " ",
          action("Remove", `Remove ${w.worker_id}? It is drained, then stopped, and its pool shrinks by one.`, () => api(`/v1/workers/${enc(w.worker_id)}`, { method: "DELETE" })))))));
}

// One expert-parallel instance: routed tokens per (layer, expert) as a heatmap, and balance per layer.
function heatmap(workerId, stats) {
  const peak = Math.max(1, ...stats.expert_tokens.flat());
  const experts = stats.expert_tokens[0]?.length || 0;
  const rows = stats.expert_tokens.map((layer, i) => h("tr", {},
    h("th", {}, `layer ${i}`),
    layer.map((tokens, e) => {
      const cell = h("td", { title: `layer ${i}, expert ${e}: ${tokens} tokens` }, tokens);
      const heat = tokens / peak;
      cell.style.background = `rgba(36, 86, 201, ${0.08 + 0.9 * heat})`;
      cell.style.color = heat > 0.5 ? "#fff" : "#1d2330";
      return cell;
    }),
    h("td", { class: "num", "data-field": "balance" }, fixed(stats.balance[i]))));
  return h("section", { "data-instance": workerId },
    h("h2", {}, `${workerId}: ${stats.num_ranks} ranks, ${stats.slots_per_rank} slots each, map v${stats.version}`),
    h("table", { class: "heat" },
      h("thead", {}, h("tr", {}, h("th", {}, ""), [...Array(experts).keys()].map((e) => h("th", {}, `e${e}`)), h("th", {}, "balance"))),
      h("tbody", {}, rows)),
    h("p", {}, action("Rebalance", `Rebalance the experts of ${workerId}? Experts move between ranks while it serves.`,
      () => api(`/v1/workers/${enc(workerId)}/experts/rebalance`, { method: "POST", body: "{}" }))));
}

async function experts(main) {
  main.append(h("h1", {}, "Experts"), h("p", { class: "muted" }, "Routed tokens per layer and expert over the workers' stats window (darker: busier); balance is max / mean tokens per rank (1 is perfect)."));
  const list = await api("/v1/workers");
  const instances = await Promise.all(list.map(async (w) => [w.worker_id, await api(`/v1/workers/${enc(w.worker_id)}/experts`).catch(() => null)]));
  const parallel = instances.filter(([, stats]) => stats?.expert_parallel);
  if (!parallel.length) main.append(h("p", {}, "No expert-parallel instance is serving."));
  for (const [workerId, stats] of parallel) main.append(heatmap(workerId, stats));
}

const STATE_COLOURS = { pending: "#e7eaf0", running: "#dbe6ff", succeeded: "#d7f2dd", failed: "#fbdcd9", cancelled: "#fbdcd9" };

// A graph's steps in columns by depth (a step sits right of every step it waits for), edges between.
function dag(record) {
  const steps = record.spec.steps;
  const needs = record.prerequisites;
  const depth = {};
  const level = (id) => (depth[id] ??= needs[id].length ? 1 + Math.max(...needs[id].map(level)) : 0);
  steps.forEach((step) => level(step.id));
  const columns = {};
  steps.forEach((step) => (columns[depth[step.id]] ??= []).push(step));
  const boxW = 170, boxH = 52, gapX = 60, gapY = 22;
  const at = {};
  Object.entries(columns).forEach(([d, column]) => column.forEach((step, i) => (at[step.id] = { x: 10 + d * (boxW + gapX), y: 10 + i * (boxH + gapY) })));
  const width = 20 + Object.keys(columns).length * (boxW + gapX);
  const height = 20 + Math.max(...Object.values(columns).map((c) => c.length)) * (boxH + gapY);
  const svg = s("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": `graph ${record.name}`, id: "dag" });
  svg.append(s("defs", {}, s("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 10, refY: 5, markerWidth: 6, markerHeight: 6, orient: "auto" }, s("path", { d: "M0,0 L10,5 L0,10 z", fill: "#667085" }))));
  for (const step of steps) {
    for (const before of needs[step.id]) {
      const a = at[before], b = at[step.id];
      svg.append(s("line", { x1: a.x + boxW, y1: a.y + boxH / 2, x2: b.x, y2: b.y + boxH / 2, stroke: "#667085", "marker-end": "url(#arrow)" }));
    }
  }
  for (const step of steps) {
    const run = record.steps[step.id] || {};
    const { x, y } = at[step.id];
    const where = run.pool ? `on ${run.pool}` : step.kind;
    svg.append(s("g", { "data-step": step.id, "data-state": run.state || "pending" },
      s("rect", { x, y, width: boxW, height: boxH, rx: 6, fill: STATE_COLOURS[run.state] || "#e7eaf0", stroke: "#667085" }),
      s("text", { x: x + 8, y: y + 18 }, step.id),
      s("text", { x: x + 8, y: y + 34 }, `${run.state || "pending"} · ${where}`),
      s("text", { x: x + 8, y: y + 47 }, run.finished_at && run.started_at ? `${(run.finished_at - run.started_at).toFixed(2)} s` : run.estimated_s ? `est. ${run.estimated_s.toFixed(2)} s` : ""),
      s("title", {}, run.error || run.output || "")));
  }
  return svg;
}

async function graphs(main) {
  const list = await api("/v1/graphs");
  const chosen = decodeURIComponent(location.hash.split("/")[2] || "") || list[0]?.id;
  main.append(
    h("h1", {}, "Agent graphs"),
    table(
      [{ title: "graph" }, { title: "name" }, { title: "state" }, { title: "steps", num: true }, { title: "plan cost", num: true }, { title: "submitted" }, { title: "" }],
      list.map((g) => h("tr", { "data-graph": g.id },
        h("td", {}, h("a", { href: `#/graphs/${enc(g.id)}` }, g.id)), h("td", {}, g.name),
        h("td", {}, h("span", { class: `tag ${g.state}` }, g.state)), h("td", { class: "num" }, Object.keys(g.steps).length),
        h("td", { class: "num" }, fixed(g.plan_cost, 4)), h("td", {}, when(g.created_at)),
        h("td", {}, ["pending", "running"].includes(g.state) ? action("Cancel", `Cancel graph ${g.id}?`, () => api(`/v1/graphs/${enc(g.id)}/cancel`, { method: "POST" })) : "")))));
  if (chosen) {
    const record = await api(`/v1/graphs/${enc(chosen)}`);
    main.append(h("h2", {}, `${record.name} (${record.id}): ${record.state}, planned ${fixed(record.plan_latency_s)} s by ${record.plan_solver}`), dag(record));
  }
}

async function jobs(main) {
  const list = await api("/v1/jobs");
  main.append(
    h("h1", {}, "Jobs"),
    table(
      [{ title: "job" }, { title: "kind" }, { title: "state" }, { title: "phase" }, { title: "progress" }, { title: "message" }, { title: "age" }, { title: "" }],
      list.map((j) => h("tr", { "data-job": j.id },
        h("td", {}, j.id), h("td", {}, j.kind), h("td", {}, h("span", { class: `tag ${j.state}` }, j.state)), h("td", {}, j.phase),
        h("td", {}, bar(j.progress), ` ${(j.progress * 100).toFixed(0)}%`), h("td", {}, j.message), h("td", {}, ago(j.created_at)),
        h("td", {}, ["pending", "running"].includes(j.state) ? action("Cancel", `Cancel job ${j.id}?`, () => api(`/v1/jobs/${enc(j.id)}/cancel`, { method: "POST" })) : "")))));
}

const PAGES = { overview, workers, experts, graphs, jobs };

// -- shell ----------------------------------------------------------------------------------------

async function render() {
  clearTimeout(timer);
  const name = location.hash.split("/")[1] || "overview";
  const page = PAGES[name] || overview;
  document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("active", a.dataset.page === name));
  // Leave the page alone while a confirmation is open: a refresh would replace the button being confirmed.
  if (!document.getElementById("confirm").open) {
    const main = h("main", { id: "page", "data-page": name });
    try {
      await page(main);
      document.getElementById("page").replaceWith(main);
    } catch (error) {
      if (error.status === 401) return signOut("That token was not accepted.");
      say(error.message, true);
    }
  }
  timer = setTimeout(render, REFRESH_MS);
}

async function signIn() {
  try {
    role = (await api("/v1/whoami")).role;
  } catch (error) {
    return signOut(error.status === 401 ? "That token was not accepted." : error.message);
  }
  document.getElementById("signin").hidden = true;
  document.getElementById("signout").hidden = false;
  document.getElementById("whoami").textContent = `signed in as ${role}`;
  render();
}

function signOut(message = "") {
  clearTimeout(timer);
  role = null;
  sessionStorage.removeItem(TOKEN);
  document.getElementById("page").replaceChildren();
  document.getElementById("whoami").textContent = "";
  document.getElementById("signout").hidden = true;
  document.getElementById("signin").hidden = false;
  document.getElementById("signin-error").textContent = message;
}

document.getElementById("signin").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(TOKEN, document.getElementById("token").value.trim());
  document.getElementById("token").value = "";
  signIn();
});
document.getElementById("signout").addEventListener("click", () => signOut());
window.addEventListener("hashchange", () => role && render());
if (sessionStorage.getItem(TOKEN)) signIn();
else signOut();
