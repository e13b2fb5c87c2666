// Alloy web form: a client of the public API (/v1/...) only. No framework, no build step.
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

// ---------------------------------------------------------------------------------------------- schema -> fields
function resolveSchema(prop, defs) {
  let p = prop || {};
  let nullable = false;
  for (let guard = 0; guard < 5; guard++) {
    if (p.$ref) { p = { ...defs[p.$ref.split("/").pop()], ...omit(p, ["$ref"]) }; continue; }
    if (p.allOf && p.allOf.length === 1) { p = { ...p.allOf[0], ...omit(p, ["allOf"]) }; continue; }
    if (p.anyOf) {
      const rest = p.anyOf.filter((s) => s.type !== "null");
      nullable = nullable || rest.length < p.anyOf.length;
      p = { ...(rest[0] || {}), ...omit(p, ["anyOf"]) };
      continue;
    }
    break;
  }
  return { ...p, nullable };
}

function omit(obj, keys) { return Object.fromEntries(Object.entries(obj).filter(([k]) => !keys.includes(k))); }

function rangeText(p) {
  const lo = p.exclusiveMinimum ?? p.minimum, hi = p.exclusiveMaximum ?? p.maximum;
  if (lo === undefined && hi === undefined) return "";
  const l = lo === undefined ? "(−∞" : `${p.exclusiveMinimum !== undefined ? "(" : "["}${lo}`;
  const h = hi === undefined ? "∞)" : `${hi}${p.exclusiveMaximum !== undefined ? ")" : "]"}`;
  return `${l}, ${h}`;
}

function fieldId(loc) { return "f-" + loc.replace(/[^\w-]/g, "-"); }

function renderParams() {
  const box = $("#params-fields");
  box.replaceChildren();
  const info = state.method;
  const schema = info?.params_schema || {};
  const defs = schema.$defs || schema.definitions || {};
  const props = schema.properties || {};
  const names = Object.keys(props);
  $("#params-fieldset").hidden = !names.length;
  for (const name of names) {
    const p = resolveSchema(props[name], defs);
    const loc = `params.${name}`;
    const id = fieldId(loc);
    const def = info.defaults?.[name] ?? p.default;
    const wrap = document.createElement("div");
    wrap.className = "field";
    const label = document.createElement("label");
    label.htmlFor = id;
    label.textContent = p.title && p.title.toLowerCase() !== name.replace(/_/g, " ") ? `${name} — ${p.title}` : name;
    let input;
    if (p.type === "boolean") {
      input = document.createElement("input");
      input.type = "checkbox";
      input.checked = Boolean(def);
      wrap.classList.add("check-field");
    } else if (p.enum) {
      input = document.createElement("select");
      for (const v of p.enum) input.append(new Option(String(v), String(v)));
      if (p.nullable) input.prepend(new Option("(automatic)", ""));
      input.value = def ?? "";
    } else {
      input = document.createElement("input");
      input.type = "text";
      if (p.type === "number" || p.type === "integer") input.inputMode = "decimal";
      input.value = def ?? "";
      input.placeholder = def === null || def === undefined ? "automatic" : String(def);
    }
    input.id = id;
    input.dataset.loc = loc;
    input.dataset.param = name;
    input.dataset.kind = p.type === "boolean" ? "bool" : p.enum ? "enum" : p.type === "number" || p.type === "integer" ? "number" : "text";
    input.dataset.default = JSON.stringify(def ?? null);
    const help = document.createElement("p");
    help.className = "help";
    help.id = `${id}-help`;
    const range = rangeText(p);
    help.textContent = [p.description, range && `Range ${range}.`, def !== undefined && def !== null ? `Default ${def}.` : ""]
      .filter(Boolean).join(" ");
    if (input.dataset.kind === "number") help.textContent += " A list like “0.1, 0.5” is a gradient over the layers.";
    input.setAttribute("aria-describedby", help.id);
    if (p.type === "boolean") wrap.append(input, label, help); else wrap.append(label, input, help);
    box.append(wrap);
  }
  $('#params-fields [data-param="sparsify"]')?.addEventListener("change", syncParamVisibility);
  syncParamVisibility();
}

// Stage params that only matter for one sparsifier; hidden (and left at their default) for the others.
const PARAM_NEEDS_SPARSIFY = { top_removed: "breadcrumbs", alpha: "compeft", rescale: "dare" };

function syncParamVisibility() {
  const sparsify = $('#params-fields [data-param="sparsify"]');
  for (const [param, needs] of Object.entries(PARAM_NEEDS_SPARSIFY)) {
    const input = $(`#params-fields [data-param="${param}"]`);
    if (input && sparsify) input.closest(".field").hidden = sparsify.value !== needs && input.value === JSON.parse(input.dataset.default)?.toString();
  }
}

function readParams() {
  const out = {};
  for (const input of $$("#params-fields [data-param]")) {
    const def = JSON.parse(input.dataset.default);
    let v;
    if (input.dataset.kind === "bool") v = input.checked;
    else if (input.dataset.kind === "number") v = parseNumberish(input.value);
    else v = input.value === "" ? null : input.value;
    if (v === undefined || (v === null && def === null)) continue;
    if (JSON.stringify(v) !== JSON.stringify(def)) out[input.dataset.param] = v;
  }
  return out;
}

/** "0.2" -> 0.2, "0.1, 0.5" -> [0.1, 0.5] (a gradient), "" -> undefined; anything else stays text so the API
 *  reports it next to the field and the form keeps what was typed. */
function parseNumberish(text) {
  const t = text.trim();
  if (!t) return undefined;
  const parts = t.replace(/^\[|\]$/g, "").split(/[,\s]+/).filter(Boolean);
  const nums = parts.map(Number);
  if (nums.some((n) => !Number.isFinite(n)) || !parts.length) return t;
  return parts.length > 1 || t.startsWith("[") ? nums : nums[0];
}

// ---------------------------------------------------------------------------------------------- sources
function splitSource(src) {
  if (src && typeof src === "object") {
    return { kind: "hub", id: [src.repo, src.subfolder].filter(Boolean).join("/"), rev: src.revision || "main" };
  }
  const s = String(src ?? "");
  const m = s.match(/^hf:\/\/([^@]+)(?:@(.+))?$/);
  if (m) return { kind: "hub", id: m[1], rev: m[2] || "main" };
  return { kind: "local", id: s, rev: "main" };
}

function joinSource(kind, id, rev) {
  id = id.trim();
  if (!id) return null;
  if (kind === "hub") return `hf://${id.replace(/^hf:\/\//, "")}@${rev.trim() || "main"}`;
  return id;
}

/** A source row (kind, id, revision) plus optional weight/density, bound to recipe locations. */
function makeRow({ loc, label, withWeights, removable }) {
  const node = $("#model-row").content.firstElementChild.cloneNode(true);
  node.dataset.loc = loc;
  const controls = {
    kind: $(".src-kind", node), id: $(".src-id", node), rev: $(".src-rev", node),
    weight: $(".src-weight", node), density: $(".src-density", node),
  };
  const sourceLoc = withWeights ? `${loc}.source` : loc;
  const locs = { kind: sourceLoc, id: sourceLoc, rev: sourceLoc, weight: `${loc}.weight`, density: `${loc}.density` };
  const names = { kind: "source kind", id: "path or Hub id", rev: "revision", weight: "weight", density: "density" };
  for (const [key, input] of Object.entries(controls)) {
    const id = fieldId(`${loc}-${key}`);
    input.id = id;
    input.dataset.loc = locs[key];
    const lab = input.closest(".field").querySelector("label");
    lab.htmlFor = id;
    lab.textContent = key === "id" ? label : lab.textContent;
    input.setAttribute("aria-label", `${label} ${names[key]}`);
  }
  // only the id field carries the loc a source error points at
  controls.kind.dataset.loc = ""; controls.rev.dataset.loc = "";
  if (!withWeights) { controls.weight.closest(".field").remove(); controls.density.closest(".field").remove(); }
  const rm = $(".remove", node);
  if (removable) {
    rm.addEventListener("click", () => {
      const next = node.nextElementSibling || node.previousElementSibling;
      node.remove();
      renumberModels();
      updatePreview();
      (next ? $(".src-id", next) : $("#add-model")).focus();
    });
  } else rm.remove();
  const syncRev = () => { controls.rev.closest(".field").hidden = controls.kind.value !== "hub"; };
  controls.kind.addEventListener("change", syncRev);
  syncRev();
  node.fill = (src, weight, density) => {
    const s = splitSource(src);
    controls.kind.value = s.kind; controls.id.value = s.id; controls.rev.value = s.rev;
    if (withWeights) {
      controls.weight.value = weight ?? 1;
      controls.density.value = density ?? "";
    }
    syncRev();
  };
  node.read = () => {
    const source = joinSource(controls.kind.value, controls.id.value, controls.rev.value);
    if (!withWeights) return source;
    const entry = { source: source ?? "" };
    const w = parseNumberish(controls.weight.value);
    if (w !== undefined) entry.weight = w;
    const d = parseNumberish(controls.density.value);
    if (d !== undefined) entry.density = d;
    return entry;
  };
  return node;
}

function addModel(src = "", weight = 1, density = null) {
  const list = $("#models-list");
  const row = makeRow({ loc: `models.${list.children.length}`, label: `Model ${list.children.length + 1}`, withWeights: true, removable: true });
  row.fill(src, weight, density);
  list.append(row);
  return row;
}

function renumberModels() {
  // Rebuild so ids, labels and error locations follow the new order.
  const entries = $$("#models-list > .model-row").map((r) => r.read());
  $("#models-list").replaceChildren();
  for (const e of entries) addModel(e.source, e.weight, e.density);
}

let baseRow, transferRows;
function buildSourceRows() {
  baseRow = makeRow({ loc: "base", label: "Base model", withWeights: false, removable: false });
  $("#base-row").replaceChildren(baseRow);
  transferRows = {};
  const box = $("#transfer-rows");
  box.replaceChildren();
  for (const [key, label] of [["source_base", "Source base"], ["source_finetuned", "Source fine-tune"], ["target_base", "Target base"]]) {
    transferRows[key] = makeRow({ loc: key, label, withWeights: false, removable: false });
    box.append(transferRows[key]);
  }
}

// ---------------------------------------------------------------------------------------------- form <-> recipe
function selectMethod(name, { keepParams } = {}) {
  const info = state.methods.find((m) => m.name === name) || state.methods[0];
  if (!info) return;
  const previous = keepParams ? readParams() : {};
  state.method = info;
  $("#method").value = info.name;
  const summary = $("#method-summary");
  summary.replaceChildren(document.createTextNode(`${info.summary || ""} `));
  if (info.reference_url) {
    const a = document.createElement("a");
    a.href = info.reference_url; a.target = "_blank"; a.rel = "noopener noreferrer";
    a.textContent = "Paper";
    summary.append(a);
  }
  const transfer = info.kind === "transfer";
  $("#transfer-rows").hidden = !transfer;
  $("#base-row").hidden = transfer;
  $("#models-list").hidden = transfer;
  $("#add-model").hidden = transfer;
  const baseLabel = $("label[for='" + fieldId("base-id") + "']");
  if (baseLabel) baseLabel.textContent = info.needs_base ? "Base model" : "Base model (optional)";
  $("#scope").options[0].textContent = `method default (${info.default_scope || "per_tensor"})`;
  renderParams();
  setParams(previous);
}

function setParams(params) {
  for (const [k, v] of Object.entries(params || {})) {
    const input = $(`#params-fields [data-param="${CSS.escape(k)}"]`);
    if (!input) continue;
    if (input.dataset.kind === "bool") input.checked = Boolean(v);
    else input.value = Array.isArray(v) ? v.join(", ") : v ?? "";
  }
  syncParamVisibility();
}

function readRecipe() {
  const info = state.method;
  const r = { method: info?.name };
  if (info?.kind === "transfer") {
    for (const [k, row] of Object.entries(transferRows)) { const s = row.read(); if (s) r[k] = s; }
  } else {
    const base = baseRow.read();
    if (base) r.base = base;
    r.models = $$("#models-list > .model-row").map((row) => row.read());
  }
  const params = readParams();
  if (Object.keys(params).length) r.params = params;
  if ($("#lines-enabled").checked) {
    const lines = {};
    const a = parseNumberish($("#lines-alpha").value);
    if (a !== undefined) lines.alpha = a;
    const b = parseNumberish($("#lines-beta").value);
    if (b !== undefined) lines.beta = b;
    lines.head_scale = $("#lines-head").value;
    r.lines = lines;
  }
  if ($("#scope").value) r.scope = $("#scope").value;
  if ($("#dtype").value) r.dtype = $("#dtype").value;
  const seed = parseNumberish($("#seed").value);
  if (seed !== undefined && seed !== 0) r.seed = seed;
  if ($("#vocab-policy").value !== "error") r.vocab_policy = $("#vocab-policy").value;
  const lines = (sel) => $(sel).value.split("\n").map((s) => s.trim()).filter(Boolean);
  const filters = {};
  if (lines("#filters-include").length) filters.include = lines("#filters-include");
  if (lines("#filters-exclude").length) filters.exclude = lines("#filters-exclude");
  if (Object.keys(filters).length) r.filters = filters;
  const output = {};
  if (destKind() === "hub") {
    output.hub = { repo: $("#hub-repo").value.trim(), private: $("#hub-private").checked };
    if ($("#hub-branch").value.trim() && $("#hub-branch").value.trim() !== "main") output.hub.branch = $("#hub-branch").value.trim();
    if ($("#hub-pr").checked) output.hub.create_pr = true;
    if ($("#hub-message").value.trim()) output.hub.commit_message = $("#hub-message").value.trim();
  } else if ($("#output-path").value.trim()) {
    output.path = $("#output-path").value.trim();
  }
  const shard = $("#shard-size").value.trim();
  if (shard && shard !== "5GB") output.shard_size = /^\d+$/.test(shard) ? Number(shard) : shard;
  if (state.extra.output) Object.assign(output, state.extra.output);
  if (Object.keys(output).length) r.output = output;
  for (const [k, v] of Object.entries(state.extra)) if (k !== "output") r[k] = v;
  return r;
}

function destKind() { return $("input[name=dest]:checked").value; }
function syncDest() {
  $("#dest-local").hidden = destKind() !== "local";
  $("#dest-hub").hidden = destKind() !== "hub";
}

/** Fill every control from a normalized recipe (an import, or a job's recipe). */
function fillForm(recipe) {
  clearErrors();
  selectMethod(recipe.method);
  setParams(recipe.params);
  const weights = recipe.weights;
  $("#models-list").replaceChildren();
  baseRow.fill(recipe.base ?? "");
  for (const row of Object.values(transferRows)) row.fill("");
  for (const k of Object.keys(transferRows)) if (recipe[k]) transferRows[k].fill(recipe[k]);
  (recipe.models || []).forEach((m, i) => addModel(m.source, weights ? weights[i] : m.weight, m.density));
  if (!recipe.models?.length && state.method?.kind !== "transfer") addModel();
  $("#lines-enabled").checked = Boolean(recipe.lines);
  $("#lines-fields").hidden = !recipe.lines;
  $("#lines-alpha").value = recipe.lines?.alpha ?? "";
  $("#lines-beta").value = recipe.lines?.beta ?? 0.5;
  $("#lines-head").value = recipe.lines?.head_scale ?? "alpha";
  $("#scope").value = recipe.scope ?? "";
  $("#dtype").value = recipe.dtype ?? "";
  $("#seed").value = recipe.seed ?? 0;
  $("#vocab-policy").value = recipe.vocab_policy ?? "error";
  $("#filters-include").value = (recipe.filters?.include || []).join("\n");
  $("#filters-exclude").value = (recipe.filters?.exclude || []).join("\n");
  const out = recipe.output || {};
  const hub = out.hub;
  $$("input[name=dest]").forEach((r) => { r.checked = r.value === (hub ? "hub" : "local"); });
  $("#output-path").value = out.path ?? "";
  $("#hub-repo").value = hub?.repo ?? "";
  $("#hub-branch").value = hub?.branch ?? "main";
  $("#hub-private").checked = hub ? hub.private !== false : true;
  $("#hub-pr").checked = Boolean(hub?.create_pr);
  $("#hub-message").value = hub?.commit_message ?? "";
  $("#shard-size").value = out.shard_size === undefined ? "5GB" : out.shard_size === 5e9 ? "5GB" : String(out.shard_size);
  syncDest();
  // keep what the form has no control for, so an import round-trips
  state.extra = {};
  if (recipe.overrides?.length) state.extra.overrides = recipe.overrides;
  if (recipe.allow_pickle) state.extra.allow_pickle = true;
  if (out.copy_files_from !== undefined && out.copy_files_from !== "base") state.extra.output = { copy_files_from: out.copy_files_from };
  updatePreview();
}

function updatePreview() {
  $("#yaml-preview").textContent = toYaml(readRecipe()).replace(/^\n/, "") + "\n";
}

// ---------------------------------------------------------------------------------------------- errors
function clearErrors() {
  $$(".field-error.inline").forEach((n) => n.remove());
  $$("[aria-invalid=true]").forEach((n) => {
    n.removeAttribute("aria-invalid");
    const ids = (n.getAttribute("aria-describedby") || "").split(" ").filter((x) => !x.endsWith("-error"));
    if (ids.length) n.setAttribute("aria-describedby", ids.join(" ")); else n.removeAttribute("aria-describedby");
  });
  $("#error-summary").hidden = true;
  $("#error-summary").replaceChildren();
}

/** The control a problem's loc points at: the longest prefix with a matching data-loc, else none. */
function controlFor(loc) {
  const parts = loc.map(String);
  while (parts.length && ["body", "recipe", "__root__"].includes(parts[0])) parts.shift();
  for (let n = parts.length; n > 0; n--) {
    const key = parts.slice(0, n).join(".");
    const match = $$("#recipe-form [data-loc]").find((el) => el.dataset.loc === key && !el.closest("[hidden]"));
    if (match) return match;
  }
  return null;
}

function showProblem(problem) {
  clearErrors();
  const errors = Array.isArray(problem?.errors) ? problem.errors : [];
  const summary = $("#error-summary");
  const heading = document.createElement("p");
  heading.textContent = errors.length ? `The recipe has ${errors.length} problem${errors.length > 1 ? "s" : ""}:` : problemText(problem);
  const list = document.createElement("ul");
  errors.forEach((err, i) => {
    const loc = Array.isArray(err.loc) ? err.loc : [];
    const where = loc.filter((p) => p !== "body").join(".") || "recipe";
    const control = controlFor(loc);
    const li = document.createElement("li");
    if (control) {
      const msg = document.createElement("p");
      msg.className = "field-error inline";
      msg.id = `err-${i}-error`;
      msg.textContent = err.msg;
      const anchor = control.closest(".field") || control.closest(".model-row") || control;
      anchor.append(msg);
      if (/^(INPUT|SELECT|TEXTAREA)$/.test(control.tagName)) {
        control.setAttribute("aria-invalid", "true");
        control.setAttribute("aria-describedby", `${control.getAttribute("aria-describedby") || ""} ${msg.id}`.trim());
      }
      const a = document.createElement("a");
      a.href = "#";
      a.textContent = `${where}: ${err.msg}`;
      a.addEventListener("click", (e) => { e.preventDefault(); (focusable(control) || control).focus(); });
      li.append(a);
    } else {
      li.textContent = `${where}: ${err.msg}`;
    }
    list.append(li);
  });
  summary.append(heading);
  if (errors.length) summary.append(list);
  summary.hidden = false;
  summary.focus();
}

function focusable(node) {
  if (/^(INPUT|SELECT|TEXTAREA|BUTTON)$/.test(node.tagName)) return node;
  return node.querySelector("input:not([type=hidden]), select, textarea");
}

// ---------------------------------------------------------------------------------------------- compose actions
async function submitRecipe(event) {
  event.preventDefault();
  banner("");
  const button = $("#submit");
  button.disabled = true;
  try {
    const key = crypto.randomUUID ? crypto.randomUUID() : String(Date.now()) + Math.random();
    const res = await api("POST", "/v1/merges", { json: readRecipe(), hubToken: true, idempotencyKey: key });
    if (res.ok && res.data?.id) { clearErrors(); location.hash = `#/jobs/${res.data.id}`; return; }
    if (handleAuth(res)) return;
    showProblem(res.data);
  } finally {
    button.disabled = false;
  }
}

async function validateRecipe() {
  banner("");
  const res = await api("POST", "/v1/recipes/validate", { json: readRecipe() });
  if (res.ok) { clearErrors(); banner("The recipe is valid.", "ok"); return; }
  if (handleAuth(res)) return;
  showProblem(res.data);
}

async function analyze() {
  banner("");
  const recipe = readRecipe();
  const sources = recipe.method === "transfer"
    ? [recipe.source_finetuned].filter(Boolean)
    : (recipe.models || []).map((m) => m.source).filter(Boolean);
  const base = recipe.method === "transfer" ? recipe.source_base : recipe.base;
  const res = await api("POST", "/v1/analyses", { json: { sources, base }, hubToken: true });
  if (res.ok && res.data?.id) { location.hash = `#/jobs/${res.data.id}`; return; }
  if (handleAuth(res)) return;
  showProblem(res.data);
}

async function importRecipe() {
  const box = $("#import-errors");
  box.replaceChildren();
  const text = $("#import-text").value;
  if (!text.trim()) { box.textContent = "Paste a YAML recipe first."; return; }
  const res = await api("POST", "/v1/recipes/import", { yaml: text });
  if (res.ok && res.data) {
    const recipe = res.data.recipe && res.data.recipe.method ? res.data.recipe : res.data;
    fillForm(recipe);
    banner(`Imported a ${recipe.method} recipe into the form.`, "ok");
    $("#method").focus();
    return;
  }
  if (handleAuth(res)) return;
  const p = res.data || {};
  box.textContent = problemText(p);
  if (Array.isArray(p.errors) && p.errors.length) {
    const ul = document.createElement("ul");
    for (const e of p.errors) {
      const li = document.createElement("li");
      li.textContent = `${(e.loc || []).join(".") || "recipe"}: ${e.msg}`;
      ul.append(li);
    }
    box.append(ul);
  }
}

// ---------------------------------------------------------------------------------------------- routing
function route() {
  if (state.jobStream) { state.jobStream.abort(); state.jobStream = null; }
  const hash = location.hash.replace(/^#/, "") || "/";
  const parts = hash.split("/").filter(Boolean);
  let view = "compose";
  if (parts[0] === "jobs" && parts[1]) view = "job";
  else if (parts[0] === "jobs") view = "jobs";
  else if (parts[0] === "batches" && parts[1]) view = "batch";
  for (const v of ["compose", "jobs", "job", "batch"]) $(`#view-${v}`).hidden = v !== view;
  $$("nav [data-nav]").forEach((a) => {
    if (a.dataset.nav === (view === "job" || view === "batch" ? "jobs" : view)) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  });
  banner("");
  if (view === "jobs") loadJobs({ reset: true });
  if (view === "job") openJob(decodeURIComponent(parts[1]));
  if (view === "batch") openBatch(decodeURIComponent(parts[1]));
  if (route.started) $(`#view-${view} h2`).focus?.();
  route.started = true;
}

// ---------------------------------------------------------------------------------------------- jobs list
function renderStatusFilters() {
  const box = $("#status-filters");
  box.replaceChildren();
  for (const s of ["", ...STATUSES]) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "chip";
    b.textContent = s || "all";
    b.setAttribute("aria-pressed", String(state.jobsStatus === s));
    b.addEventListener("click", () => { state.jobsStatus = s; renderStatusFilters(); loadJobs({ reset: true }); });
    box.append(b);
  }
}

function jobRow(job) {
  const tr = document.createElement("tr");
  const link = document.createElement("a");
  link.href = `#/jobs/${encodeURIComponent(job.id)}`;
  link.textContent = String(job.id).slice(0, 8);
  link.title = job.id;
  const td = (content) => { const c = document.createElement("td"); c.append(content ?? ""); return c; };
  const badge = document.createElement("span");
  badge.className = `status s-${job.status}`;
  badge.textContent = job.status;
  const pct = fraction(job.progress);
  let batch = "";
  if (job.batch_id) {
    batch = document.createElement("a");
    batch.href = `#/batches/${encodeURIComponent(job.batch_id)}`;
    batch.textContent = String(job.batch_id).slice(0, 8);
  }
  tr.append(td(link), td(job.kind || "merge"), td(job.recipe?.method || job.method || ""), td(badge),
    td(pct === null ? "" : `${Math.round(pct * 100)}%`), td(fmtTime(job.created_at)), td(batch));
  return tr;
}

async function loadJobs({ reset } = {}) {
  renderStatusFilters();
  if (reset) { state.jobsCursor = null; $("#jobs-body").replaceChildren(); }
  const q = new URLSearchParams();
  if (state.jobsStatus) q.set("status", state.jobsStatus);
  if (state.jobsCursor) q.set("cursor", state.jobsCursor);
  const res = await api("GET", `/v1/merges?${q}`);
  if (!res.ok) { if (!handleAuth(res)) banner(problemText(res.data)); return; }
  const items = res.data?.items || [];
  for (const job of items) $("#jobs-body").append(jobRow(job));
  state.jobsCursor = res.data?.next_cursor || null;
  $("#jobs-more").hidden = !state.jobsCursor;
  $("#jobs-empty").hidden = $("#jobs-body").children.length > 0;
}

// ---------------------------------------------------------------------------------------------- one job
function fraction(p) {
  if (!p) return null;
  if (Number.isFinite(p.fraction)) return p.fraction;
  if (p.bytes_total) return p.bytes_done / p.bytes_total;
  if (p.tensors_total) return p.tensors_done / p.tensors_total;
  return null;
}

function fmtBytes(n) {
  if (!Number.isFinite(n)) return "?";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function fmtDuration(s) {
  if (!Number.isFinite(s)) return "";
  if (s < 60) return `${Math.round(s)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
}

function fmtTime(t) {
  if (!t) return "";
  const d = new Date(t);
  return Number.isNaN(d.getTime()) ? String(t) : d.toLocaleString();
}

function renderJob(job) {
  $("#job-title").textContent = `${job.kind === "analyze" ? "Analysis" : "Merge"} ${String(job.id).slice(0, 8)}`;
  const facts = [["Status", job.status], ["Method", job.recipe?.method], ["Created", fmtTime(job.created_at)],
    ["Started", fmtTime(job.started_at)], ["Finished", fmtTime(job.finished_at)], ["Job id", job.id]];
  if (job.batch_id) facts.push(["Batch", job.batch_id]);
  const dl = $("#job-facts");
  dl.replaceChildren();
  for (const [k, v] of facts) {
    if (!v) continue;
    const dt = document.createElement("dt"); dt.textContent = k;
    const dd = document.createElement("dd");
    if (k === "Status") { const b = document.createElement("span"); b.className = `status s-${v}`; b.textContent = v; dd.append(b); }
    else if (k === "Batch") { const a = document.createElement("a"); a.href = `#/batches/${encodeURIComponent(v)}`; a.textContent = v; dd.append(a); }
    else dd.textContent = v;
    dl.append(dt, dd);
  }
  const p = job.progress || {};
  const f = job.status === "succeeded" ? 1 : fraction(p) ?? 0;
  const pct = Math.round(Math.max(0, Math.min(1, f)) * 100);
  $("#job-progress-bar").style.width = `${pct}%`;
  $("#job-progress").setAttribute("aria-valuenow", String(pct));
  $("#job-progress").dataset.status = job.status;
  const bits = [`${pct}%`];
  if (p.tensors_total) bits.push(`${p.tensors_done ?? 0} / ${p.tensors_total} tensors`);
  if (p.bytes_total) bits.push(`${fmtBytes(p.bytes_done)} / ${fmtBytes(p.bytes_total)}`);
  if (job.status === "running" && Number.isFinite(p.eta_s)) bits.push(`ETA ${fmtDuration(p.eta_s)}`);
  if (job.status === "queued") bits.unshift("Waiting for a worker");
  if (job.cancel_requested && !TERMINAL.has(job.status)) bits.unshift("Cancelling…");
  $("#job-progress-text").textContent = bits.join(" · ");
  $("#job-cancel").hidden = TERMINAL.has(job.status);
  const out = job.output || {};
  const link = $("#job-output");
  link.hidden = !(out.url || out.path);
  if (out.url) { link.href = out.url; link.textContent = "Open on the Hub"; link.target = "_blank"; link.rel = "noopener noreferrer"; }
  else if (out.path) { link.removeAttribute("href"); link.textContent = `Output: ${out.path}`; link.classList.add("path"); }
  const err = $("#job-error");
  err.hidden = !job.error;
  if (job.error) err.textContent = `${job.error.code ? `[${job.error.code}] ` : ""}${problemText(job.error)}`;
  if (job.recipe) $("#job-recipe").textContent = toYaml(job.recipe).replace(/^\n/, "");
}

async function openJob(id) {
  for (const s of ["#job-charts-section", "#job-card-section", "#job-report-section", "#job-error"]) $(s).hidden = true;
  $("#job-charts").replaceChildren();
  $("#job-facts").replaceChildren();
  $("#job-progress-text").textContent = "";
  $("#job-output").hidden = true;
  const controller = new AbortController();
  state.jobStream = controller;
  const res = await api("GET", `/v1/merges/${encodeURIComponent(id)}`);
  if (!res.ok) { if (!handleAuth(res)) banner(problemText(res.data)); return; }
  let job = res.data;
  renderJob(job);
  if (!TERMINAL.has(job.status)) job = await followJob(id, controller.signal) || job;
  if (controller.signal.aborted) return;
  const final = await api("GET", `/v1/merges/${encodeURIComponent(id)}`);
  if (final.ok) { job = final.data; renderJob(job); }
  if (job.status === "succeeded") await showReport(id, job);
}

/** Live status over SSE. EventSource can't send Authorization, so read the stream with fetch(); if
 *  streaming fails, poll GET /v1/merges/{id} instead. Resolves with the last status seen. */
async function followJob(id, signal) {
  let last = null;
  const headers = { Accept: "text/event-stream" };
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = `Bearer ${token}`;
  try {
    const res = await fetch(`/v1/merges/${encodeURIComponent(id)}/events`, { headers, signal });
    if (!res.ok || !res.body) throw new Error(`events: ${res.status}`);
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += value.replace(/\r\n?/g, "\n");
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const frame = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        const event = parseSse(frame);
        if (event && (event.event === "status" || event.event === "message") && event.data) {
          try { last = JSON.parse(event.data); } catch { continue; }
          renderJob(last);
          if (TERMINAL.has(last.status)) { reader.cancel().catch(() => {}); return last; }
        }
      }
    }
    if (last && TERMINAL.has(last.status)) return last;
  } catch (err) {
    if (signal.aborted) return last;
  }
  return pollJob(id, signal, last);
}

function parseSse(frame) {
  const out = { event: "message", data: "" };
  const data = [];
  for (const line of frame.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const i = line.indexOf(":");
    const field = i < 0 ? line : line.slice(0, i);
    const value = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
    if (field === "event") out.event = value;
    else if (field === "data") data.push(value);
  }
  out.data = data.join("\n");
  return data.length ? out : null;
}

async function pollJob(id, signal, last) {
  while (!signal.aborted) {
    const res = await api("GET", `/v1/merges/${encodeURIComponent(id)}`);
    if (res.ok) { last = res.data; renderJob(last); if (TERMINAL.has(last.status)) return last; }
    await new Promise((r) => setTimeout(r, 1000));
  }
  return last;
}

async function cancelJob() {
  const id = location.hash.split("/")[2];
  if (!id) return;
  const button = $("#job-cancel");
  button.disabled = true;
  const res = await api("DELETE", `/v1/merges/${encodeURIComponent(decodeURIComponent(id))}`);
  button.disabled = false;
  if (!res.ok) { if (!handleAuth(res)) banner(problemText(res.data)); return; }
  banner("Cancellation requested.", "ok");
  if (res.data?.status) renderJob(res.data);
}

async function showReport(id, job) {
  const res = await api("GET", `/v1/merges/${encodeURIComponent(id)}/report`);
  const report = res.ok ? res.data : job.report || null;
  if (!report) return;
  $("#job-report").textContent = JSON.stringify(report, null, 2);
  $("#job-report-section").hidden = false;
  const charts = AlloyCharts.fromReport(report, job);
  $("#job-charts").replaceChildren(...charts);
  $("#job-charts-section").hidden = !charts.length;
  const card = report.model_card ?? report.readme ?? report.card ?? report.outputs?.model_card ?? null;
  if (typeof card === "string" && card.trim()) {
    $("#job-card").replaceChildren(...renderMarkdown(card));
    $("#job-card-section").hidden = false;
  }
}

// ---------------------------------------------------------------------------------------------- batch
async function openBatch(id) {
  const res = await api("GET", `/v1/batches/${encodeURIComponent(id)}`);
  $("#batch-body").replaceChildren();
  $("#batch-facts").replaceChildren();
  if (!res.ok) { if (!handleAuth(res)) banner(problemText(res.data)); return; }
  const batch = res.data || {};
  $("#batch-title").textContent = `Batch ${String(batch.id || id).slice(0, 8)}`;
  for (const [k, v] of Object.entries(batch)) {
    if (v === null || typeof v === "object") continue;
    const dt = document.createElement("dt"); dt.textContent = k.replace(/_/g, " ");
    const dd = document.createElement("dd"); dd.textContent = k.endsWith("_at") ? fmtTime(v) : String(v);
    $("#batch-facts").append(dt, dd);
  }
  if (batch.counts && typeof batch.counts === "object") {
    const dt = document.createElement("dt"); dt.textContent = "counts";
    const dd = document.createElement("dd");
    dd.textContent = Object.entries(batch.counts).map(([k, v]) => `${k} ${v}`).join(" · ");
    $("#batch-facts").append(dt, dd);
  }
  const jobs = batch.jobs || batch.items || [];
  for (const j of jobs) {
    let job = j;
    if (typeof j === "string") { const r = await api("GET", `/v1/merges/${encodeURIComponent(j)}`); job = r.ok ? r.data : { id: j, status: "?" }; }
    $("#batch-body").append(jobRow(job));
  }
}

// ---------------------------------------------------------------------------------------------- markdown (model card)
/** A small, safe Markdown subset: text nodes only (no innerHTML), http(s) links only. */
function renderMarkdown(md) {
  const nodes = [];
  const lines = md.replace(/\r\n?/g, "\n").split("\n");
  let i = 0;
  if (lines[0] === "---") { // YAML front matter (Hub metadata)
    const end = lines.indexOf("---", 1);
    if (end > 0) { const pre = document.createElement("pre"); pre.className = "yaml"; pre.textContent = lines.slice(1, end).join("\n"); nodes.push(pre); i = end + 1; }
  }
  let list = null, para = [];
  const flush = () => {
    if (para.length) { const p = document.createElement("p"); p.append(...inline(para.join(" "))); nodes.push(p); para = []; }
    list = null;
  };
  for (; i < lines.length; i++) {
    const line = lines[i];
    if (line.startsWith("```")) {
      flush();
      const code = [];
      for (i++; i < lines.length && !lines[i].startsWith("```"); i++) code.push(lines[i]);
      const pre = document.createElement("pre"); pre.className = "yaml"; pre.textContent = code.join("\n"); nodes.push(pre);
      continue;
    }
    const h = line.match(/^(#{1,6})\s+(.*)$/);
    if (h) { flush(); const el = document.createElement(`h${Math.min(6, h[1].length + 3)}`); el.append(...inline(h[2])); nodes.push(el); continue; }
    const li = line.match(/^\s*[-*]\s+(.*)$/);
    if (li) {
      if (para.length) flush();
      if (!list) { list = document.createElement("ul"); nodes.push(list); }
      const item = document.createElement("li"); item.append(...inline(li[1])); list.append(item);
      continue;
    }
    if (/^\s*\|/.test(line)) { flush(); const pre = document.createElement("pre"); pre.textContent = line; nodes.push(pre); continue; }
    if (!line.trim()) { flush(); continue; }
    list = null;
    para.push(line.trim());
  }
  flush();
  return nodes;
}

function inline(text) {
  const out = [];
  const re = /`([^`]+)`|\*\*([^*]+)\*\*|\[([^\]]+)\]\((https?:\/\/[^)\s]+)\)/g;
  let last = 0, m;
  while ((m = re.exec(text))) {
    if (m.index > last) out.push(document.createTextNode(text.slice(last, m.index)));
    if (m[1]) { const c = document.createElement("code"); c.textContent = m[1]; out.push(c); }
    else if (m[2]) { const b = document.createElement("strong"); b.textContent = m[2]; out.push(b); }
    else { const a = document.createElement("a"); a.href = m[4]; a.textContent = m[3]; a.rel = "noopener noreferrer"; a.target = "_blank"; out.push(a); }
    last = re.lastIndex;
  }
  if (last < text.length) out.push(document.createTextNode(text.slice(last)));
  return out;
}

// ---------------------------------------------------------------------------------------------- start
async function loadMethods() {
  const res = await api("GET", "/v1/methods");
  if (!res.ok) { if (!handleAuth(res)) banner(`Could not load the methods: ${problemText(res.data)}`); return; }
  state.methods = Array.isArray(res.data) ? res.data : res.data?.items || res.data?.methods || [];
  const select = $("#method");
  select.replaceChildren(...state.methods.map((m) => new Option(`${m.pretty_name || m.name} (${m.name})`, m.name)));
  selectMethod(state.methods.some((m) => m.name === "ties") ? "ties" : state.methods[0]?.name);
  if (!$("#models-list").children.length) { addModel(); addModel(); }
  updatePreview();
}

function init() {
  const tokenInput = $("#api-token");
  tokenInput.value = sessionStorage.getItem(TOKEN_KEY) || "";
  tokenInput.addEventListener("change", () => {
    const v = tokenInput.value.trim();
    if (v) sessionStorage.setItem(TOKEN_KEY, v); else sessionStorage.removeItem(TOKEN_KEY);
    if (!v) return;
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
  $("#method").addEventListener("change", (e) => { selectMethod(e.target.value, { keepParams: false }); updatePreview(); });
  $("#add-model").addEventListener("click", () => { const row = addModel(); updatePreview(); $(".src-id", row).focus(); });
  $("#lines-enabled").addEventListener("change", (e) => { $("#lines-fields").hidden = !e.target.checked; });
  $$("input[name=dest]").forEach((r) => r.addEventListener("change", syncDest));
  $("#validate").addEventListener("click", validateRecipe);
  $("#analyze").addEventListener("click", analyze);
  $("#import-button").addEventListener("click", importRecipe);
  $("#copy-yaml").addEventListener("click", () => navigator.clipboard?.writeText($("#yaml-preview").textContent).catch(() => {}));
  $("#job-cancel").addEventListener("click", cancelJob);
  $("#jobs-more").addEventListener("click", () => loadJobs());
  $$("main h2").forEach((h) => h.setAttribute("tabindex", "-1"));
  // the skip link moves focus without touching the hash (the hash is the router's)
  $(".skip").addEventListener("click", (e) => { e.preventDefault(); $("#main").focus(); });
  window.addEventListener("hashchange", route);
  syncDest();
  route();
  // every /v1 route needs a token: without one, ask for it instead of making requests that must fail
  if (tokenInput.value) loadMethods();
  else banner("Enter your API token under “Tokens” (alloy token create) to load the merge methods.", "info");
}

document.addEventListener("DOMContentLoaded", init);
