// Alloy web form: a client of the public API (/v1/...) only. No framework, no build step.
// app.js: API client, YAML preview, routing, start-up; form.js: the compose form; jobs.js: jobs, job, batch;
// charts.js + report_charts.js: SVG charts from job reports.
// The API token lives in sessionStorage (this tab only); the Hub token lives in a password input and is sent
// per request as X-HF-Token, never stored.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => [...root.querySelectorAll(sel)];
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const STATUSES = ["queued", "running", "succeeded", "failed", "cancelled"];
const TOKEN_KEY = "alloy.apiToken";

const state = {
  methods: [],
  method: null,
  extra: {}, // recipe keys the form does not edit (overrides, allow_pickle, ...), kept from an import
  evaluatorExtra: {}, // evaluator keys the form does not edit (classes, prompt_template, ...), kept likewise
  jobStream: null, // AbortController of the live job view
  jobsCursor: null,
  jobsStatus: "",
};

// ---------------------------------------------------------------------------------------------- API client
async function api(method, path, { json, yaml, hubToken = false, idempotencyKey } = {}) {
  const headers = { Accept: "application/json, application/problem+json" };
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = `Bearer ${token}`;
  const hf = $("#hf-token").value.trim();
  if (hubToken && hf) headers["X-HF-Token"] = hf;
  if (idempotencyKey) headers["Idempotency-Key"] = idempotencyKey;
  let body;
  if (json !== undefined) { headers["Content-Type"] = "application/json"; body = JSON.stringify(json); }
  if (yaml !== undefined) { headers["Content-Type"] = "application/yaml"; body = yaml; }
  let res;
  try {
    res = await fetch(path, { method, headers, body });
  } catch (err) {
    return { ok: false, status: 0, data: { title: "Network error", detail: String(err.message || err) } };
  }
  const text = await res.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = { title: res.statusText, detail: text.slice(0, 500) }; }
  return { ok: res.ok, status: res.status, data };
}

function banner(message, kind = "error") {
  const b = $("#banner");
  if (!message) { b.hidden = true; b.textContent = ""; return; }
  b.hidden = false;
  b.className = `banner ${kind}`;
  b.textContent = message;
}

function problemText(p) {
  if (!p) return "Request failed.";
  return [p.title, p.detail].filter(Boolean).join(": ") || "Request failed.";
}

function handleAuth(res) {
  if (res.status === 401 || res.status === 403) {
    banner(`${problemText(res.data)} — enter an API token under “Tokens”.`);
    $("#tokens").open = true;
    $("#api-token").focus();
    return true;
  }
  return false;
}

// ---------------------------------------------------------------------------------------------- YAML
const YAML_PLAIN = /^[A-Za-z_./][\w./:@+-]*$/;
const YAML_RESERVED = /^(true|false|null|yes|no|on|off|~)$/i;

function yamlScalar(v) {
  if (v === null || v === undefined) return "null";
  if (typeof v === "number" || typeof v === "boolean") return String(v);
  const s = String(v);
  return YAML_PLAIN.test(s) && !YAML_RESERVED.test(s) ? s : JSON.stringify(s);
}

function isScalar(v) { return v === null || typeof v !== "object"; }

function toYaml(value, indent = "") {
  if (Array.isArray(value)) {
    if (!value.length) return "[]";
    if (value.every(isScalar)) return `[${value.map(yamlScalar).join(", ")}]`;
    return "\n" + value.map((item) => {
      const body = isScalar(item) ? yamlScalar(item) : toYaml(item, indent + "  ").replace(/^\n\s*/, "");
      return `${indent}- ${body}`;
    }).join("\n");
  }
  if (value && typeof value === "object") {
    const entries = Object.entries(value).filter(([, v]) => v !== undefined);
    if (!entries.length) return "{}";
    return "\n" + entries.map(([k, v]) => {
      const rendered = isScalar(v) || (Array.isArray(v) && (v.every(isScalar)))
        ? " " + (Array.isArray(v) ? toYaml(v) : yamlScalar(v))
        : toYaml(v, indent + "  ");
      return `${indent}${yamlScalar(k)}:${rendered}`;
    }).join("\n");
  }
  return yamlScalar(value);
}

// ---------------------------------------------------------------------------------------------- routing
function route() {
  if (state.jobStream) { state.jobStream.abort(); state.jobStream = null; }
  clearTimeout(state.jobsTimer);
  const hash = location.hash.replace(/^#/, "") || "/";
  const parts = hash.split("/").filter(Boolean);
  let view = "compose";
  if (parts[0] === "jobs" && parts[1]) view = "job";
  else if (parts[0] === "jobs") view = "jobs";
  else if (parts[0] === "batches" && parts[1]) view = "batch";
  else if (parts[0] === "compare" && parts[1] && parts[2]) view = "compare";
  for (const v of ["compose", "jobs", "job", "batch", "compare"]) $(`#view-${v}`).hidden = v !== view;
  $$("nav [data-nav]").forEach((a) => {
    if (a.dataset.nav === (["job", "batch", "compare"].includes(view) ? "jobs" : view)) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  });
  banner(state.flash?.[0] || "", state.flash?.[1]);
  state.flash = null;
  if (view === "jobs") loadJobs({ reset: true });
  if (view === "job") openJob(decodeURIComponent(parts[1]));
  if (view === "batch") openBatch(decodeURIComponent(parts[1]));
  if (view === "compare") openCompare(decodeURIComponent(parts[1]), decodeURIComponent(parts[2]));
  if (route.started) $(`#view-${view} h2`).focus?.();
  route.started = true;
}

// ---------------------------------------------------------------------------------------------- start
async function loadMethods() {
  const res = await api("GET", "/v1/methods");
  if (!res.ok) { if (!handleAuth(res)) banner(`Could not load the methods: ${problemText(res.data)}`); return; }
  state.methods = Array.isArray(res.data) ? res.data : res.data?.items || res.data?.methods || [];
  const select = $("#method");
  select.replaceChildren(...state.methods.map((m) => new Option(`${m.pretty_name || m.name} (${m.name})`, m.name)));
  if (!restoreDraft()) {
    selectMethod(state.methods.some((m) => m.name === "ties") ? "ties" : state.methods[0]?.name);
    if (!$("#models-list").children.length) { addModel(); addModel(); }
  }
  if (state.pendingEdit) { fillForm(state.pendingEdit); state.pendingEdit = null; }
  updatePreview();
}

function init() {
  const tokenInput = $("#api-token");
  tokenInput.value = sessionStorage.getItem(TOKEN_KEY) || "";
  tokenInput.addEventListener("change", () => {
    const v = tokenInput.value.trim();
    if (v) sessionStorage.setItem(TOKEN_KEY, v); else sessionStorage.removeItem(TOKEN_KEY);
    if (!v) return;
    $("#tokens").open = false;
    banner("");
    if (!state.methods.length) loadMethods();
    if ($("#view-compose").hidden) route(); // reload the current view with the new token
  });
  if (!tokenInput.value) $("#tokens").open = true;
  $("#tokens-form").addEventListener("submit", (e) => { e.preventDefault(); tokenInput.dispatchEvent(new Event("change")); });
  buildSourceRows();
  const form = $("#recipe-form");
  form.addEventListener("input", updatePreview);
  form.addEventListener("change", updatePreview);
  form.addEventListener("submit", submitRecipe);
  form.addEventListener("keydown", blockImplicitSubmit);
  form.addEventListener("input", clearFieldError);
  form.addEventListener("change", clearFieldError);
  $("#reset-form").addEventListener("click", resetForm);
  $("#sweep-submit").addEventListener("click", submitSweep);
  $("#gallery-load").addEventListener("click", loadExample);
  loadGallery();
  $("#method").addEventListener("change", (e) => { selectMethod(e.target.value, { keepParams: false }); updatePreview(); });
  $("#add-model").addEventListener("click", () => { const row = addModel(); updatePreview(); $(".src-id", row).focus(); });
  $("#lines-enabled").addEventListener("change", (e) => { $("#lines-fields").hidden = !e.target.checked; });
  $$("input[name=dest]").forEach((r) => r.addEventListener("change", syncDest));
  $("#validate").addEventListener("click", validateRecipe);
  $("#analyze").addEventListener("click", analyze);
  $("#import-button").addEventListener("click", importRecipe);
  $("#evaluator-file").addEventListener("change", uploadHeldout);
  $("#copy-yaml").addEventListener("click", () => navigator.clipboard?.writeText($("#yaml-preview").textContent).catch(() => {}));
  $("#job-cancel").addEventListener("click", askCancel);
  $("#job-cancel-yes").addEventListener("click", cancelJob);
  $("#job-cancel-no").addEventListener("click", () => { $("#job-cancel-confirm").hidden = true; $("#job-cancel").hidden = false; $("#job-cancel").focus(); });
  $("#job-cancel-confirm").addEventListener("keydown", (e) => { if (e.key === "Escape") $("#job-cancel-no").click(); });
  $("#job-edit").addEventListener("click", editJob);
  $("#job-retry-publish").addEventListener("click", retryPublish);
  $("#job-analyze").addEventListener("click", (e) => analyze(e, state.jobRecipe));
  $("#jobs-more").addEventListener("click", () => loadJobs());
  $$(".compare-button").forEach((button) => button.addEventListener("click", () => {
    const [a, b] = state.compare || [];
    if (a && b) location.hash = `#/compare/${encodeURIComponent(a)}/${encodeURIComponent(b)}`;
  }));
  $$("main h2").forEach((h) => h.setAttribute("tabindex", "-1"));
  // the skip link moves focus without touching the hash (the hash is the router's)
  $(".skip").addEventListener("click", (e) => { e.preventDefault(); $("#main").focus(); });
  window.addEventListener("hashchange", route);
  syncDest();
  route();
  // every /v1 route needs a token: without one, ask for it instead of making requests that must fail
  if (tokenInput.value) loadMethods();
  else {
    banner("Enter your API token under “Tokens” (alloy token create): it is kept for this tab only, so a new tab asks again.", "info");
    tokenInput.focus();
  }
}

document.addEventListener("DOMContentLoaded", init);
