// tokenbudget web UI: budgets, prices, groups, dashboard, a principal's page and the audit log.
// Plain JavaScript, no build step; every value from the API is rendered as text, never as HTML.
"use strict";

const TOKEN_KEY = "tokenbudget.token";
const PALETTE = ["#4f46e5", "#0ea5e9", "#10b981", "#f59e0b", "#ef4444", "#8b5cf6",
  "#14b8a6", "#f97316", "#64748b", "#ec4899", "#84cc16", "#06b6d4"];
const RANGES = { "24h": [1, "hour"], "7d": [7, "hour"], "30d": [30, "day"], "90d": [90, "week"] };

let me = null;
let prefs = { range: "7d", metric: "tokens" };

// ---- helpers -------------------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else if (k === "value") el.value = v;
    else if (k === "checked") el.checked = !!v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

const SVG_NS = "http://www.w3.org/2000/svg";
function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  for (const c of children) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return el;
}

class ApiError extends Error {
  constructor(problem) {
    super(problem.detail || problem.title || "request failed");
    this.problem = problem;
  }
}

async function api(method, path, body) {
  const headers = { authorization: "Bearer " + sessionStorage.getItem(TOKEN_KEY) };
  if (body !== undefined) headers["content-type"] = "application/json";
  const resp = await fetch("/api/v1" + path, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (resp.status === 204) return null;
  const data = await resp.json().catch(() => ({ detail: resp.statusText }));
  if (resp.status === 401) {
    sessionStorage.removeItem(TOKEN_KEY);
    location.hash = "#/login";
    throw new ApiError(data);
  }
  if (!resp.ok) throw new ApiError(data);
  return data;
}

const q = (params) => {
  const u = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== null && v !== "") u.set(k, v);
  const t = u.toString();
  return t ? "?" + t : "";
};

function toast(text, error) {
  const t = document.getElementById("toast");
  t.textContent = text;
  t.className = "toast" + (error ? " error" : "");
  t.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { t.hidden = true; }, 3500);
}

function confirmDialog(text) {
  const d = document.getElementById("confirm");
  document.getElementById("confirm-text").textContent = text;
  return new Promise((resolve) => {
    d.addEventListener("close", () => resolve(d.returnValue === "ok"), { once: true });
    d.showModal();
  });
}

function fmtInt(n) { return Number(n).toLocaleString("en-US"); }
function fmtAmount(unit, v) {
  if (unit === "usd") return "$" + Number(v).toLocaleString("en-US", { minimumFractionDigits: 2, maximumFractionDigits: 4 });
  return fmtInt(v);
}
function fmtUsd(v) {
  const n = Number(v);
  return "$" + (n !== 0 && Math.abs(n) < 1 ? n.toFixed(4) : n.toLocaleString("en-US", { minimumFractionDigits: 2, maximumFractionDigits: 2 }));
}
function fmtShort(v) {
  const a = Math.abs(v);
  if (a >= 1e9) return (v / 1e9).toFixed(1) + "B";
  if (a >= 1e6) return (v / 1e6).toFixed(1) + "M";
  if (a >= 1e3) return (v / 1e3).toFixed(1) + "k";
  return String(Math.round(v * 100) / 100);
}
function fmtTime(t) {
  if (!t) return "—";
  return new Date(t).toLocaleString("en-GB", { dateStyle: "medium", timeStyle: "short" });
}
function windowText(b) {
  if (b.window === "total") return "lifetime";
  const unit = b.every > 1 ? `${b.every} ${b.window}s` : b.window;
  return (b.kind === "rolling" ? "rolling " : "per ") + unit;
}

function usageBar(u, label) {
  const pct = Math.min(100, Math.round(u.fraction * 1000) / 10);
  const fill = h("div", { class: "bar-fill " + u.state, "data-fraction": String(u.fraction) });
  fill.style.width = pct + "%";
  return h("div", { class: "usage-cell", "data-state": u.state },
    h("div", { class: "bar", title: `${pct}%` }, fill),
    h("div", { class: "small muted" },
      label || `${fmtAmount(u.unit, u.used)} of ${fmtAmount(u.unit, u.limit)} · ${pct}%`));
}

function panel(title, ...children) {
  return h("section", { class: "panel" }, title ? h("h2", {}, title) : null, ...children);
}

function table(headers, rows, empty) {
  if (!rows.length) return h("div", { class: "empty" }, empty || "Nothing here yet.");
  return h("table", {},
    h("thead", {}, h("tr", {}, headers.map((x) => h("th", { class: x.endsWith("#") ? "num" : "" }, x.replace(/#$/, ""))))),
    h("tbody", {}, rows));
}

function principalLink(key) {
  return h("a", { href: "#/principal/" + encodeURIComponent(key) }, key);
}

function mount(...children) {
  const main = document.getElementById("main");
  main.replaceChildren(...children);
}

// ---- login ---------------------------------------------------------------------------------

function viewLogin() {
  document.getElementById("nav").hidden = true;
  document.getElementById("principal-search").hidden = true;
  document.getElementById("whoami").hidden = true;
  const input = h("input", { id: "login-token", type: "password", placeholder: "tb_…", autocomplete: "off" });
  const err = h("div", { class: "error", id: "login-error" });
  const form = h("form", {
    class: "panel login", id: "login-form",
    onsubmit: async (e) => {
      e.preventDefault();
      sessionStorage.setItem(TOKEN_KEY, input.value.trim());
      try {
        me = await api("GET", "/me");
        location.hash = "#/dashboard";
      } catch (ex) {
        err.textContent = "That token was not accepted.";
      }
    },
  },
  h("h1", {}, "Sign in"),
  h("div", { class: "muted" }, "Paste an admin API token (tokenbudget token new)."),
  input,
  h("button", { id: "login-submit", type: "submit" }, "Sign in"),
  err);
  mount(form);
  input.focus();
}

// ---- dashboard -----------------------------------------------------------------------------

function rangeParams() {
  const [days, bucket] = RANGES[prefs.range];
  const until = new Date();
  const since = new Date(until.getTime() - days * 86400e3);
  return { since: since.toISOString().replace(/\.\d+Z$/, "Z"), until: until.toISOString().replace(/\.\d+Z$/, "Z"), bucket };
}

function stackedChart(ts, metric) {
  const byTime = new Map();
  const models = [];
  for (const p of ts.points) {
    if (!models.includes(p.model)) models.push(p.model);
    if (!byTime.has(p.start)) byTime.set(p.start, new Map());
    byTime.get(p.start).set(p.model, p.value);
  }
  if (!byTime.size) return h("div", { class: "empty", id: "chart-empty" }, "No usage in this period.");
  const totalOf = (m) => [...byTime.values()].reduce((a, x) => a + (x.get(m) || 0), 0);
  models.sort((a, b) => totalOf(b) - totalOf(a));
  const color = (m) => PALETTE[models.indexOf(m) % PALETTE.length];
  // Every bucket of the period, empty ones included, so the time axis is true.
  const step = { hour: 3600e3, day: 86400e3, week: 7 * 86400e3 }[ts.bucket];
  const shift = ts.bucket === "week" ? 4 * 86400e3 : 0;
  const iso = (ms) => new Date(ms).toISOString().replace(/\.\d+Z$/, "Z");
  const t0 = Math.floor((Date.parse(ts.since) - shift) / step) * step + shift;
  for (let t = t0; t < Date.parse(ts.until); t += step) if (!byTime.has(iso(t))) byTime.set(iso(t), new Map());
  const times = [...byTime.keys()].sort();
  const W = 1000, H = 300, L = 56, B = 28, T = 10, R = 10;
  const max = Math.max(...times.map((t) => [...byTime.get(t).values()].reduce((a, b) => a + b, 0))) || 1;
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none", role: "img", "aria-label": "usage over time by model" });
  for (let i = 0; i <= 4; i++) {
    const y = T + (H - T - B) * (1 - i / 4);
    svg.append(s("line", { x1: L, x2: W - R, y1: y, y2: y, class: "grid-line" }));
    svg.append(s("text", { x: L - 6, y: y + 4, "text-anchor": "end", class: "axis" },
      metric === "usd" ? fmtUsd((max * i) / 4) : fmtShort((max * i) / 4)));
  }
  const slot = (W - L - R) / times.length;
  const bw = Math.max(1, slot * 0.78);
  times.forEach((t, i) => {
    let y = H - B;
    const x = L + i * slot + (slot - bw) / 2;
    for (const m of models) {
      const v = byTime.get(t).get(m) || 0;
      if (!v) continue;
      const hgt = ((H - T - B) * v) / max;
      y -= hgt;
      svg.append(s("rect", { x, y, width: bw, height: Math.max(hgt, 0.5), fill: color(m), class: "bar-seg", "data-model": m, "data-value": v },
        s("title", {}, `${fmtTime(t)} · ${m}: ${metric === "usd" ? "$" + v.toFixed(4) : fmtInt(v)}`)));
    }
    const every = Math.ceil(times.length / 8);
    if (i % every === 0) {
      const d = new Date(t);
      const label = ts.bucket === "hour" ? d.toLocaleString("en-GB", { day: "2-digit", month: "short", hour: "2-digit" }) : d.toLocaleDateString("en-GB", { day: "2-digit", month: "short" });
      svg.append(s("text", { x: x + bw / 2, y: H - 8, "text-anchor": "middle", class: "axis" }, label));
    }
  });
  const legend = h("div", { class: "legend" }, models.map((m) => {
    const sw = h("i", {});
    sw.style.background = color(m);
    return h("span", {}, sw, m);
  }));
  return h("div", { class: "chart", id: "usage-chart", "data-models": models.join(",") }, svg, legend);
}

async function viewDashboard() {
  const r = rangeParams();
  const seg = (key, options) => h("div", { class: "seg" }, options.map((o) => h("button", {
    type: "button", class: prefs[key] === o ? "on" : "", ["data-" + key]: o,
    onclick: () => { prefs[key] = o; viewDashboard(); },
  }, o === "usd" ? "USD" : o)));
  const [ts, top, models, near, denies] = await Promise.all([
    api("GET", "/usage/timeseries" + q({ since: r.since, until: r.until, bucket: r.bucket, metric: prefs.metric })),
    api("GET", "/usage/top" + q({ since: r.since, until: r.until, by: "principal", limit: 10 })),
    api("GET", "/usage/top" + q({ since: r.since, until: r.until, by: "model", limit: 10 })),
    api("GET", "/status" + q({ state: "near", limit: 20 })),
    api("GET", "/denies" + q({ since: r.since, until: r.until, limit: 10 })),
  ]);
  const totals = ts.points.reduce((a, p) => ({ req: a.req + p.requests, tok: a.tok + p.tokens, usd: a.usd + Number(p.cost_usd) }), { req: 0, tok: 0, usd: 0 });
  const kpi = (label, v, id) => h("div", { class: "kpi" }, h("div", { class: "muted small" }, label), h("div", { class: "v", id }, v));
  mount(
    h("div", { class: "toolbar" }, h("h1", { class: "grow" }, "Usage"), seg("range", Object.keys(RANGES)), seg("metric", ["tokens", "usd"])),
    h("div", { class: "kpis" },
      kpi("Requests", fmtInt(totals.req), "kpi-requests"),
      kpi("Tokens", fmtInt(totals.tok), "kpi-tokens"),
      kpi("Cost", fmtUsd(totals.usd), "kpi-cost"),
      kpi("Denied", fmtInt(denies.items.length) + (denies.next_offset ? "+" : ""), "kpi-denies")),
    panel(`Usage over time by model (${prefs.metric === "usd" ? "USD" : "tokens"}, per ${ts.bucket})`, stackedChart(ts, prefs.metric)),
    h("div", { class: "grid" },
      panel("Top consumers", table(["Principal", "Requests#", "Tokens#", "Cost#"], top.items.map((t) => h("tr", {},
        h("td", {}, principalLink(t.key)), h("td", { class: "num" }, fmtInt(t.requests)),
        h("td", { class: "num" }, fmtInt(t.tokens)), h("td", { class: "num" }, fmtUsd(t.cost_usd)))))),
      panel("Most used models", table(["Model", "Requests#", "Tokens#", "Cost#"], models.items.map((t) => h("tr", {},
        h("td", {}, t.key), h("td", { class: "num" }, fmtInt(t.requests)),
        h("td", { class: "num" }, fmtInt(t.tokens)), h("td", { class: "num" }, fmtUsd(t.cost_usd))))))),
    h("div", { class: "grid" },
      panel("Near or over the limit", h("div", { id: "near-list" }, table(["Budget", "Member", "Usage"], near.items.map((x) => h("tr", { "data-budget": x.budget },
        h("td", {}, x.budget), h("td", {}, x.member ? principalLink(x.member) : "shared"),
        h("td", {}, usageBar(x))))), "No budget is near its limit.")),
      panel("Recent denies", h("div", { id: "deny-list" }, table(["When", "Principal", "Budget", "Reason"], denies.items.map((d) => h("tr", {},
        h("td", {}, fmtTime(d.at)), h("td", {}, principalLink(d.principal)), h("td", {}, d.budget),
        h("td", {}, d.reason.replace(/_/g, " "))))), "No request was denied in this period."))),
  );
}

// ---- budgets -------------------------------------------------------------------------------

async function viewBudgets(search) {
  const list = await api("GET", "/budgets" + q({ q: search, limit: 1000 }));
  const input = h("input", { id: "budget-search", class: "grow", placeholder: "Search budgets, subjects, models…", value: search || "" });
  input.addEventListener("input", () => {
    clearTimeout(viewBudgets.timer);
    viewBudgets.timer = setTimeout(() => viewBudgets(input.value).then(() => {
      const again = document.getElementById("budget-search");
      again.focus();
      again.setSelectionRange(again.value.length, again.value.length);
    }), 200);
  });
  const canWrite = me && me.role === "admin";
  const rows = list.items.map((b) => h("tr", { "data-budget": b.name },
    h("td", {}, h("strong", {}, b.name), b.enabled ? null : h("span", { class: "pill off" }, "disabled")),
    h("td", {}, b.subject.startsWith("user:") || b.subject.startsWith("service_principal:") ? principalLink(b.subject) : b.subject,
      b.scope === "per_member" ? h("div", { class: "small muted" }, "each member") : null),
    h("td", {}, b.models.length ? b.models.map((m) => h("span", { class: "pill" }, m)) : h("span", { class: "muted" }, "All models")),
    h("td", { class: "num" }, b.limit_usd ? "$" + b.limit_usd : fmtInt(b.limit_tokens) + " tok"),
    h("td", {}, windowText(b)),
    h("td", {}, usageBar(b.usage, b.scope === "per_member" ? `busiest member: ${fmtAmount(b.usage.unit, b.usage.used)} of ${fmtAmount(b.usage.unit, b.usage.limit)}` : null)),
    h("td", {}, h("span", { class: "pill " + (b.action === "shadow" ? "shadow" : "") }, b.action), b.override ? h("span", { class: "pill override" }, "override") : null),
    h("td", {}, canWrite ? [
      h("a", { href: "#/budgets/edit/" + encodeURIComponent(b.name), class: "edit" }, "Edit"), " ",
      h("button", { class: "link delete", type: "button", onclick: () => deleteBudget(b.name) }, "Delete"),
    ] : null)));
  mount(
    h("div", { class: "toolbar" }, h("h1", {}, "Budgets"), input,
      canWrite ? h("a", { href: "#/budgets/new" }, h("button", { type: "button", id: "new-budget" }, "New budget")) : null),
    panel(null, h("div", { id: "budget-table" }, table(["Name", "Subject", "Models", "Limit#", "Window", "Usage", "Action", ""], rows, "No budgets yet."))),
  );
}

async function deleteBudget(name) {
  if (!(await confirmDialog(`Delete budget “${name}”? Its recorded usage stays.`))) return;
  try {
    await api("DELETE", "/budgets/" + encodeURIComponent(name));
    toast(`Deleted ${name}`);
    viewBudgets();
  } catch (e) { toast(e.message, true); }
}

let pricesCache = null;
async function prices() {
  if (!pricesCache) pricesCache = (await api("GET", "/prices?limit=1000")).items;
  return pricesCache;
}

async function viewBudgetForm(name) {
  const existing = name ? await api("GET", "/budgets/" + encodeURIComponent(name)) : null;
  const priceList = await prices();
  const b = existing || { name: "", subject: "group:", scope: "shared", models: [], limit_tokens: null, limit_usd: "10.00", window: "day", every: 1, kind: "calendar", action: "enforce", override: false, enabled: true };
  let models = [...b.models];
  const [kind0, ...rest] = b.subject.split(":");
  const errors = {};
  const err = (f) => (errors[f] = h("div", { class: "error", "data-error-for": f }));

  const name_ = h("input", { id: "f-name", value: b.name, required: true, size: 40 });
  const kind = h("select", { id: "f-subject-kind" }, ["user", "service_principal", "group", "everyone"].map((k) => h("option", { value: k }, k.replace("_", " "))));
  kind.value = kind0;
  const subjectName = h("input", { id: "f-subject-name", value: rest.join(":"), list: "f-subject-options", autocomplete: "off", placeholder: "search…" });
  const subjectOptions = h("datalist", { id: "f-subject-options" });
  const scope = h("select", { id: "f-scope" }, h("option", { value: "shared" }, "one shared pool"), h("option", { value: "per_member" }, "each member separately"));
  scope.value = b.scope || "shared";
  const scopeRow = h("div", { class: "row" }, scope);
  const syncSubject = () => {
    subjectName.hidden = kind.value === "everyone";
    scopeRow.hidden = !(kind.value === "group" || kind.value === "everyone");
    if (scopeRow.hidden) scope.value = "shared";
  };
  kind.addEventListener("change", () => { syncSubject(); searchSubjects(); });
  const searchSubjects = async () => {
    const text = subjectName.value;
    let items = [];
    if (kind.value === "group") items = (await api("GET", "/groups" + q({ q: text, limit: 20 }))).items.map((g) => g.name);
    else if (kind.value !== "everyone") {
      items = (await api("GET", "/principals" + q({ q: text, limit: 20 }))).items
        .filter((p) => p.startsWith(kind.value + ":")).map((p) => p.slice(kind.value.length + 1));
    }
    subjectOptions.replaceChildren(...items.map((i) => h("option", { value: i })));
  };
  subjectName.addEventListener("input", searchSubjects);
  syncSubject();

  const allModels = h("input", { type: "checkbox", id: "f-all-models", checked: models.length === 0 });
  const modelInput = h("input", { id: "f-model", list: "f-model-options", placeholder: "add a model…", autocomplete: "off" });
  const modelOptions = h("datalist", { id: "f-model-options" });
  const chips = h("div", { class: "chips", id: "f-model-chips" });
  const renderChips = () => {
    chips.replaceChildren(...models.map((m) => h("span", { class: "chip" }, m,
      h("button", { type: "button", title: "remove", onclick: () => { models = models.filter((x) => x !== m); renderChips(); hint(); } }, "×"))));
    modelInput.disabled = allModels.checked;
    chips.hidden = allModels.checked;
  };
  const addModel = () => {
    const m = modelInput.value.trim();
    if (m && !models.includes(m)) models.push(m);
    modelInput.value = "";
    renderChips();
    hint();
  };
  modelInput.addEventListener("keydown", (e) => { if (e.key === "Enter") { e.preventDefault(); addModel(); } });
  modelInput.addEventListener("change", addModel);
  modelInput.addEventListener("input", async () => {
    const items = (await api("GET", "/models" + q({ q: modelInput.value, limit: 20 }))).items;
    modelOptions.replaceChildren(...items.map((i) => h("option", { value: i })));
  });
  allModels.addEventListener("change", () => { if (allModels.checked) models = []; renderChips(); hint(); });

  const unit = h("select", { id: "f-unit" }, h("option", { value: "usd" }, "US dollars"), h("option", { value: "tokens" }, "tokens"));
  unit.value = b.limit_tokens !== null && b.limit_tokens !== undefined ? "tokens" : "usd";
  const limit = h("input", { id: "f-limit", value: unit.value === "usd" ? b.limit_usd : String(b.limit_tokens), size: 14, inputmode: "decimal" });
  const hintBox = h("div", { class: "hint", id: "f-hint" });
  const hint = () => {
    const model = models[0] || "gpt-4o";
    const p = priceList.find((x) => x.model === model);
    const v = Number(limit.value);
    if (!p || !(v > 0)) { hintBox.hidden = true; return; }
    hintBox.hidden = false;
    const inP = Number(p.input), outP = Number(p.output);
    if (unit.value === "usd") {
      hintBox.textContent = `≈ ${fmtShort((v / inP) * 1e6)} input or ${fmtShort((v / outP) * 1e6)} output tokens of ${model} (at $${p.input} / $${p.output} per 1M)`;
    } else {
      hintBox.textContent = `≈ $${((v / 1e6) * inP).toFixed(2)} if all input, $${((v / 1e6) * outP).toFixed(2)} if all output, on ${model}`;
    }
  };
  unit.addEventListener("change", hint);
  limit.addEventListener("input", hint);

  const windowUnit = h("select", { id: "f-window" }, ["hour", "day", "week", "month", "total"].map((w) => h("option", { value: w }, w === "total" ? "lifetime (never resets)" : w)));
  windowUnit.value = b.window;
  const every = h("input", { id: "f-every", type: "number", min: 1, value: String(b.every || 1), size: 4 });
  const wkind = h("select", { id: "f-kind" }, h("option", { value: "calendar" }, "calendar (resets on the boundary)"), h("option", { value: "rolling" }, "rolling (sliding window)"));
  wkind.value = b.kind || "calendar";
  const syncWindow = () => { every.hidden = wkind.hidden = windowUnit.value === "total"; };
  windowUnit.addEventListener("change", syncWindow);
  syncWindow();

  const override = h("input", { type: "checkbox", id: "f-override", checked: b.override });
  const shadow = h("input", { type: "checkbox", id: "f-shadow", checked: b.action === "shadow" });
  const enabled = h("input", { type: "checkbox", id: "f-enabled", checked: b.enabled });

  const form = h("form", { class: "budget panel", id: "budget-form" },
    h("label", { class: "l", for: "f-name" }, "Name"), h("div", {}, name_, err("name")),
    h("label", { class: "l" }, "Applies to"), h("div", {}, h("div", { class: "row" }, kind, subjectName, subjectOptions), err("subject"),
      h("div", { class: "help" }, "A user, a service principal, a group (from the identity provider or managed here), or everyone.")),
    h("label", { class: "l" }, "Counted as"), h("div", {}, scopeRow, err("scope")),
    h("label", { class: "l" }, "Models"), h("div", {}, h("label", {}, allModels, " All models"), h("div", { class: "row" }, modelInput, modelOptions), chips, err("models"),
      h("div", { class: "help" }, "Listed models share one limit.")),
    h("label", { class: "l" }, "Limit"), h("div", {}, h("div", { class: "row" }, limit, unit), hintBox, err("limit"), err("limit_usd"), err("limit_tokens")),
    h("label", { class: "l" }, "Window"), h("div", {}, h("div", { class: "row" }, "every", every, windowUnit, wkind), err("window"), err("every"), err("kind")),
    h("label", { class: "l" }, "Options"), h("div", {},
      h("div", {}, h("label", {}, override, " Override: for this user or service principal, only override budgets apply"), err("override")),
      h("div", {}, h("label", {}, shadow, " Shadow: record would-deny decisions, deny nothing")),
      h("div", {}, h("label", {}, enabled, " Enabled"))),
    h("div", { class: "actions" },
      h("button", { type: "submit", id: "f-save" }, existing ? "Save changes" : "Create budget"),
      h("a", { href: "#/budgets" }, h("button", { type: "button", class: "secondary" }, "Cancel"))));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    for (const el of Object.values(errors)) el.textContent = "";
    const spec = {
      name: name_.value.trim(),
      subject: kind.value === "everyone" ? "everyone" : `${kind.value}:${subjectName.value.trim()}`,
      scope: scope.value,
      models: allModels.checked ? [] : models,
      window: windowUnit.value,
      every: Number(every.value) || 1,
      kind: wkind.value,
      action: shadow.checked ? "shadow" : "enforce",
      override: override.checked,
      enabled: enabled.checked,
    };
    if (unit.value === "usd") spec.limit_usd = limit.value.trim();
    else {
      const n = Number(limit.value);
      if (!Number.isInteger(n) || n < 0) { errors.limit.textContent = "a whole number of tokens"; return; }
      spec.limit_tokens = n;
    }
    try {
      if (existing) await api("PUT", "/budgets/" + encodeURIComponent(existing.name), spec);
      else await api("POST", "/budgets", spec);
      toast(existing ? "Saved" : `Created ${spec.name}`);
      location.hash = "#/budgets";
    } catch (ex) {
      const fields = (ex.problem && ex.problem.errors) || [];
      if (!fields.length) toast(ex.message, true);
      for (const f of fields) (errors[f.field] || errors.name).textContent = f.message;
    }
  });
  renderChips();
  hint();
  mount(h("h1", {}, existing ? `Edit ${existing.name}` : "New budget"), form);
  name_.focus();
}

// ---- prices --------------------------------------------------------------------------------

async function viewPrices(search) {
  pricesCache = null;
  const list = await api("GET", "/prices" + q({ q: search, limit: 1000 }));
  const canWrite = me && me.role === "admin";
  const fields = ["input", "output", "cache_read", "cache_write", "cache_write_1h"];
  const row = (p) => {
    const inputs = Object.fromEntries(fields.map((f) => [f, h("input", { class: "price-input", value: p[f], disabled: !canWrite, "data-field": f })]));
    const save = async () => {
      const body = { model: p.model };
      for (const f of fields) body[f] = inputs[f].value.trim();
      try {
        await api("POST", "/prices", body);
        toast(`New price for ${p.model} in force`);
        viewPrices(search);
      } catch (e) { toast(e.message, true); }
    };
    return h("tr", { "data-model": p.model },
      h("td", {}, p.model), fields.map((f) => h("td", { class: "num" }, inputs[f])),
      h("td", { class: "small muted" }, p.effective_from ? fmtTime(p.effective_from) : "always"),
      h("td", {}, canWrite ? h("button", { type: "button", class: "link", onclick: save }, "Save") : null,
        h("a", { href: "#/prices/history/" + encodeURIComponent(p.model) }, "History")));
  };
  const input = h("input", { placeholder: "Search models…", value: search || "", id: "price-search" });
  input.addEventListener("change", () => viewPrices(input.value));
  const add = canWrite ? h("button", {
    type: "button", id: "add-price",
    onclick: () => {
      const tbody = document.querySelector("#price-table tbody");
      const model = h("input", { placeholder: "model name" });
      const blank = { model: "", input: "", output: "", cache_read: "", cache_write: "", cache_write_1h: "" };
      const r = row(blank);
      r.firstChild.replaceChildren(model);
      r.lastChild.replaceChildren(h("button", {
        type: "button", class: "link",
        onclick: async () => {
          const body = { model: model.value.trim() };
          for (const inp of r.querySelectorAll("input[data-field]")) if (inp.value.trim()) body[inp.dataset.field] = inp.value.trim();
          try { await api("POST", "/prices", body); toast("Price added"); viewPrices(); } catch (e) { toast(e.message, true); }
        },
      }, "Add"));
      tbody.prepend(r);
    },
  }, "Add price") : null;
  mount(
    h("div", { class: "toolbar" }, h("h1", { class: "grow" }, "Prices"), input, add),
    panel(null, h("div", { class: "small muted" }, "US dollars per one million tokens. Saving makes a new version effective now; past usage keeps the price it was charged at."),
      h("div", { id: "price-table" }, table(["Model", "Input#", "Output#", "Cache read#", "Cache write#", "Cache write 1h#", "Since", ""], list.items.map(row)))),
  );
}

async function viewPriceHistory(model) {
  const list = await api("GET", "/prices" + q({ model, history: true, limit: 1000 }));
  mount(h("div", { class: "toolbar" }, h("h1", { class: "grow" }, `Price history of ${model}`), h("a", { href: "#/prices" }, "All prices")),
    panel(null, table(["Effective from", "Input#", "Output#", "Cache read#", "Cache write#", "Cache write 1h#"],
      list.items.slice().reverse().map((p) => h("tr", {}, h("td", {}, p.effective_from ? fmtTime(p.effective_from) : "the beginning"),
        ["input", "output", "cache_read", "cache_write", "cache_write_1h"].map((f) => h("td", { class: "num" }, "$" + p[f])))))));
}

// ---- groups --------------------------------------------------------------------------------

async function viewGroups() {
  const list = await api("GET", "/groups?limit=1000");
  const canWrite = me && me.role === "admin";
  const group = h("input", { placeholder: "group", id: "g-group" });
  const who = h("input", { placeholder: "user:alice or sp:ID", id: "g-principal", list: "principal-options" });
  const add = h("form", {
    class: "toolbar",
    onsubmit: async (e) => {
      e.preventDefault();
      try {
        await api("PUT", `/groups/${encodeURIComponent(group.value.trim())}/members/${encodeURIComponent(who.value.trim())}`);
        toast("Member added");
        viewGroups();
      } catch (ex) { toast(ex.message, true); }
    },
  }, group, who, h("button", { type: "submit", id: "g-add" }, "Add member"));
  const remove = async (g, p) => {
    if (!(await confirmDialog(`Remove ${p} from ${g}?`))) return;
    try { await api("DELETE", `/groups/${encodeURIComponent(g)}/members/${encodeURIComponent(p)}`); viewGroups(); } catch (e) { toast(e.message, true); }
  };
  mount(h("h1", {}, "Groups"),
    canWrite ? panel("Add a member", add, h("div", { class: "small muted" }, "Groups from the identity provider's claims need no entry here; add members for groups you manage in tokenbudget.")) : null,
    panel(null, table(["Group", "Members", "Budgets"], list.items.map((g) => h("tr", {},
      h("td", {}, h("strong", {}, g.name)),
      h("td", {}, g.members.map((m) => h("span", { class: "pill" + (m.source === "config" ? " off" : ""), "data-member": m.principal }, m.principal,
        canWrite && m.source === "store" ? h("button", { type: "button", class: "link", title: "remove", onclick: () => remove(g.name, m.principal) }, "×") : null))),
      h("td", {}, g.budgets.join(", ") || "—"))), "No groups yet.")));
}

// ---- a principal ---------------------------------------------------------------------------

async function viewPrincipal(key) {
  const until = new Date();
  const since = new Date(until.getTime() - 7 * 86400e3);
  const range = { since: since.toISOString().replace(/\.\d+Z$/, "Z"), until: until.toISOString().replace(/\.\d+Z$/, "Z") };
  const [status, ts, models, denies] = await Promise.all([
    api("GET", "/status" + q({ state: "all", principal: key, limit: 1000 })),
    api("GET", "/usage/timeseries" + q({ ...range, bucket: "hour", principal: key })),
    api("GET", "/usage/top" + q({ ...range, by: "model", principal: key })),
    api("GET", "/denies" + q({ principal: key, limit: 10 })),
  ]);
  mount(h("h1", {}, key),
    panel("Budgets that apply", h("div", { id: "principal-budgets" }, table(["Budget", "Window", "Used#", "Remaining#", "Limit#", "Usage", "Resets"], status.items.map((x) => h("tr", { "data-budget": x.budget },
      h("td", {}, x.budget, x.action === "shadow" ? h("span", { class: "pill shadow" }, "shadow") : null),
      h("td", {}, x.window), h("td", { class: "num" }, fmtAmount(x.unit, x.used)),
      h("td", { class: "num" }, fmtAmount(x.unit, x.remaining)), h("td", { class: "num" }, fmtAmount(x.unit, x.limit)),
      h("td", {}, usageBar(x)), h("td", {}, x.resets_at ? fmtTime(x.resets_at) : "never"))), "No budget applies to this principal."))),
    panel("Usage in the last 7 days", stackedChart(ts, "tokens")),
    h("div", { class: "grid" },
      panel("Models", table(["Model", "Requests#", "Tokens#", "Cost#"], models.items.map((t) => h("tr", {}, h("td", {}, t.key),
        h("td", { class: "num" }, fmtInt(t.requests)), h("td", { class: "num" }, fmtInt(t.tokens)), h("td", { class: "num" }, fmtUsd(t.cost_usd)))))),
      panel("Recent denies", table(["When", "Budget", "Reason"], denies.items.map((d) => h("tr", {}, h("td", {}, fmtTime(d.at)), h("td", {}, d.budget), h("td", {}, d.reason.replace(/_/g, " ")))), "None."))));
}

// ---- audit log -----------------------------------------------------------------------------

async function viewAudit(offset) {
  const page = await api("GET", "/audit" + q({ limit: 50, offset }));
  const doc = (v) => (v ? h("pre", { class: "doc" }, JSON.stringify(v, null, 1)) : h("span", { class: "muted" }, "—"));
  mount(h("h1", {}, "Audit log"),
    panel(null, table(["When", "Who", "What", "Target", "Before", "After"], page.items.map((e) => h("tr", {},
      h("td", {}, fmtTime(e.at)), h("td", {}, e.actor), h("td", {}, e.action), h("td", {}, e.target), h("td", {}, doc(e.before)), h("td", {}, doc(e.after))))),
    h("div", { class: "toolbar" },
      offset ? h("a", { href: `#/audit/${Math.max(0, offset - 50)}` }, "← Newer") : null,
      page.next_offset ? h("a", { href: `#/audit/${page.next_offset}` }, "Older →") : null)));
}

// ---- routing -------------------------------------------------------------------------------

async function route() {
  const hash = location.hash || "#/dashboard";
  if (!sessionStorage.getItem(TOKEN_KEY) || hash === "#/login") return viewLogin();
  if (!me) {
    try { me = await api("GET", "/me"); } catch (e) { return; }
  }
  document.getElementById("nav").hidden = false;
  document.getElementById("principal-search").hidden = false;
  const who = document.getElementById("whoami");
  who.hidden = false;
  who.replaceChildren(h("span", { id: "whoami-name" }, `${me.name} (${me.role})`),
    h("button", { type: "button", class: "secondary", onclick: () => { sessionStorage.removeItem(TOKEN_KEY); me = null; location.hash = "#/login"; } }, "Sign out"));
  const [, page, ...args] = hash.split("/");
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.nav === page);
  const arg = args.length ? decodeURIComponent(args[args.length - 1]) : undefined;
  try {
    if (page === "budgets" && args[0] === "new") await viewBudgetForm();
    else if (page === "budgets" && args[0] === "edit") await viewBudgetForm(arg);
    else if (page === "budgets") await viewBudgets();
    else if (page === "prices" && args[0] === "history") await viewPriceHistory(arg);
    else if (page === "prices") await viewPrices();
    else if (page === "groups") await viewGroups();
    else if (page === "principal") await viewPrincipal(arg);
    else if (page === "audit") await viewAudit(Number(arg) || 0);
    else await viewDashboard();
    document.body.dataset.page = page || "dashboard";
  } catch (e) {
    if (!(e instanceof ApiError)) throw e;
    mount(panel("Could not load this page", h("p", {}, e.message)));
  }
}

window.addEventListener("hashchange", route);
window.addEventListener("DOMContentLoaded", () => {
  const search = document.getElementById("principal-search");
  const input = document.getElementById("principal-search-input");
  input.addEventListener("input", async () => {
    if (!me) return;
    const items = (await api("GET", "/principals" + q({ q: input.value, limit: 20 }))).items;
    document.getElementById("principal-options").replaceChildren(...items.map((i) => h("option", { value: i })));
  });
  search.addEventListener("submit", (e) => {
    e.preventDefault();
    if (input.value.trim()) location.hash = "#/principal/" + encodeURIComponent(input.value.trim());
  });
  route();
});
