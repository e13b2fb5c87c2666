// The compose form: fields generated from each method's JSON schema, model rows, the recipe <-> form mapping,
// the live YAML preview's input, and API problem details shown next to the fields they concern.
"use strict";

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
    if (input.dataset.kind === "number") {
      help.textContent += " A list like “0.1, 0.5” is a gradient over the layers.";
      input.addEventListener("input", () => noteGradient(input));
    }
    input.setAttribute("aria-describedby", help.id);
    if (p.type === "boolean") wrap.append(input, label, help); else wrap.append(label, input, help);
    box.append(wrap);
  }
  $('#params-fields [data-param="sparsify"]')?.addEventListener("change", syncParamVisibility);
  syncParamVisibility();
  syncSweepParams();
}

/** Say in place when a number field is read as a gradient, above all "1,0" (a decimal comma): [1, 0]. */
function noteGradient(input) {
  const wrap = input.closest(".field");
  let note = wrap.querySelector(".field-note");
  const v = parseNumberish(input.value);
  const text = !Array.isArray(v) ? ""
    : /^\s*-?\d+,\d+\s*$/.test(input.value)
      ? `“${input.value.trim()}” is read as a gradient [${v.join(", ")}] over the layers, not one number; write ${input.value.trim().replace(",", ".")} for a decimal.`
      : `A gradient over the layers: ${v.join(" → ")}.`;
  if (!text) { note?.remove(); return; }
  if (!note) {
    note = document.createElement("p");
    note.className = "field-note";
    note.id = `${input.id}-note`;
    note.setAttribute("role", "status");
    wrap.append(note);
    input.setAttribute("aria-describedby", `${input.getAttribute("aria-describedby") || ""} ${note.id}`.trim());
  }
  note.textContent = text;
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
  $(".find", node).setAttribute("aria-label", `Find ${label}: data folders or Hub`);
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
  const lines = info.lines_applies !== false;
  $("#lines-fieldset").hidden = !lines;
  if (!lines) { $("#lines-enabled").checked = false; $("#lines-fields").hidden = true; }
  $("#scope").options[0].textContent = `method default (${info.default_scope || "per_tensor"})`;
  renderParams();
  setParams(previous);
  syncEvaluator();
}

function setParams(params) {
  for (const [k, v] of Object.entries(params || {})) {
    const input = $(`#params-fields [data-param="${CSS.escape(k)}"]`);
    if (!input) continue;
    if (input.dataset.kind === "bool") input.checked = Boolean(v);
    else input.value = Array.isArray(v) ? v.join(", ") : v ?? "";
    if (input.dataset.kind === "number") noteGradient(input);
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
  const evaluator = readEvaluator();
  if (evaluator) r.evaluator = { ...evaluator, ...state.evaluatorExtra };
  if ($("#lines-enabled").checked && !$("#lines-fieldset").hidden) {
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
  fillEvaluator(recipe.evaluator);
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

const DRAFT_KEY = "alloy.draft";

function updatePreview() {
  const recipe = readRecipe();
  $("#yaml-preview").textContent = toYaml(recipe).replace(/^\n/, "") + "\n";
  if (state.methods.length) {
    try { localStorage.setItem(DRAFT_KEY, JSON.stringify({ recipe, name: $("#job-name").value })); } catch { /* storage full or off */ }
  }
}

/** The recipe being composed when the page was last closed or reloaded, if any. */
function restoreDraft() {
  let draft = null;
  try { draft = JSON.parse(localStorage.getItem(DRAFT_KEY) || "null"); } catch { draft = null; }
  if (!draft?.recipe?.method || !state.methods.some((m) => m.name === draft.recipe.method)) return false;
  fillForm(draft.recipe);
  $("#job-name").value = draft.name || "";
  return true;
}

function resetForm() {
  localStorage.removeItem(DRAFT_KEY);
  $("#job-name").value = "";
  $("#validate-result").hidden = true;
  fillForm({ method: state.methods.some((m) => m.name === "ties") ? "ties" : state.methods[0]?.name, models: [{ source: "" }, { source: "" }] });
  $("#method").focus();
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

/** A problem's location as the form labels it: ["models", "1", "source"] -> "Model 2 › source". */
function humanLoc(loc) {
  const parts = (Array.isArray(loc) ? loc : []).map(String).filter((p) => !["body", "recipe", "__root__"].includes(p));
  if (!parts.length) return "Recipe";
  const named = { base: "Base model", output: "Output", params: "Parameters", lines: "LiNeS", evaluator: "Evaluator",
    source_base: "Source base", source_finetuned: "Source fine-tune", target_base: "Target base" };
  const out = [];
  for (let i = 0; i < parts.length; i++) {
    const p = parts[i];
    const noun = { models: "Model", sources: "Source", overrides: "Override", slices: "Slice", recipes: "Recipe" }[p];
    if (noun && /^\d+$/.test(parts[i + 1] || "")) {
      out.push(`${noun} ${Number(parts[i + 1]) + 1}`);
      i++;
    } else if (/^\d+$/.test(p)) out.push(`#${Number(p) + 1}`);
    else out.push(named[p] && i === 0 ? named[p] : p);
  }
  return out.join(" › ");
}

/** Typing in a field that has an error clears that error (and its line in the summary). */
function clearFieldError(event) {
  const control = event.target;
  if (control.getAttribute?.("aria-invalid") !== "true") return;
  const ids = (control.getAttribute("aria-describedby") || "").split(" ");
  for (const id of ids.filter((x) => x.endsWith("-error"))) {
    document.getElementById(id)?.remove();
    $(`#error-summary li[data-error="${CSS.escape(id)}"]`)?.remove();
  }
  control.removeAttribute("aria-invalid");
  const rest = ids.filter((x) => x && !x.endsWith("-error"));
  if (rest.length) control.setAttribute("aria-describedby", rest.join(" ")); else control.removeAttribute("aria-describedby");
  const summary = $("#error-summary");
  const left = $$("#error-summary li").length;
  if (!left) { summary.hidden = true; summary.replaceChildren(); }
  else { const p = $("p", summary); if (p) p.textContent = `The recipe has ${left} problem${left > 1 ? "s" : ""}:`; }
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

function showProblem(problem, { focus = true } = {}) {
  clearErrors();
  const errors = Array.isArray(problem?.errors) ? problem.errors : [];
  const summary = $("#error-summary");
  const heading = document.createElement("p");
  heading.textContent = errors.length ? `The recipe has ${errors.length} problem${errors.length > 1 ? "s" : ""}:` : problemText(problem);
  const list = document.createElement("ul");
  errors.forEach((err, i) => {
    const loc = Array.isArray(err.loc) ? err.loc : [];
    const where = humanLoc(loc);
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
      li.dataset.error = msg.id;
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
  if (focus) summary.focus();
}

function focusable(node) {
  if (/^(INPUT|SELECT|TEXTAREA|BUTTON)$/.test(node.tagName)) return node;
  return node.querySelector("input:not([type=hidden]), select, textarea");
}

// ---------------------------------------------------------------------------------------------- compose actions
/** Enter in a one-line field must not submit a merge by accident (implicit form submission); buttons, links,
 *  text areas and selects keep their own Enter. */
function blockImplicitSubmit(event) {
  if (event.key !== "Enter" || event.target.tagName !== "INPUT") return;
  if (["button", "submit", "checkbox", "radio", "file"].includes(event.target.type)) return;
  event.preventDefault();
}

async function submitRecipe(event) {
  event.preventDefault();
  if (event.submitter && event.submitter.id !== "submit") return;
  banner("");
  $("#validate-result").hidden = true;
  const button = $("#submit");
  button.disabled = true;
  try {
    const key = crypto.randomUUID ? crypto.randomUUID() : String(Date.now()) + Math.random();
    const name = $("#job-name").value.trim();
    const path = name ? `/v1/merges?${new URLSearchParams({ name })}` : "/v1/merges";
    const res = await api("POST", path, { json: readRecipe(), hubToken: true, idempotencyKey: key });
    if (res.ok && res.data?.id) {
      clearErrors();
      location.hash = `#/jobs/${res.data.id}`;
      return;
    }
    if (handleAuth(res)) return;
    showProblem(res.data);
  } finally {
    button.disabled = false;
  }
}

/** Validate = the worker's preflight over headers (POST /v1/recipes/plan): every problem at once, or the plan;
 *  either way the answer shows right under the buttons. */
async function validateRecipe() {
  banner("");
  const box = $("#validate-result");
  const button = $("#validate");
  button.disabled = true;
  box.className = "validate-result";
  box.hidden = false;
  box.textContent = "Checking the sources' headers…";
  let res;
  try {
    res = await api("POST", "/v1/recipes/plan", { json: readRecipe(), hubToken: true });
  } finally {
    button.disabled = false;
  }
  if (res.ok) { clearErrors(); renderPlan(box, res.data || {}); return; }
  if (handleAuth(res)) { box.hidden = true; return; }
  box.classList.add("bad");
  const errors = Array.isArray(res.data?.errors) ? res.data.errors : [];
  box.textContent = errors.length
    ? `Not valid: ${errors.length} problem${errors.length > 1 ? "s" : ""}, listed above and next to each field.`
    : `Not valid: ${problemText(res.data)}`;
  showProblem(res.data, { focus: false });
}

function renderPlan(box, { plan, notes }) {
  box.classList.add("ok");
  const head = document.createElement("p");
  head.textContent = "Valid: the worker's preflight passes.";
  box.replaceChildren(head);
  if (plan) {
    const tensors = plan.tensors || [];
    const merged = tensors.filter((t) => t.action === "merge").length;
    const why = {};
    for (const t of tensors) if (t.action === "copy") why[t.reason || "copied"] = (why[t.reason || "copied"] || 0) + 1;
    const layers = new Set(tensors.filter((t) => t.action === "merge" && t.layer !== null && t.layer !== undefined).map((t) => t.layer));
    const rows = [
      ["Tensors", `${merged} merged, ${tensors.length - merged} copied`],
      ["Merged", `${merged} tensor${merged === 1 ? "" : "s"} in ${layers.size} layer${layers.size === 1 ? "" : "s"}${merged > tensors.filter((t) => t.action === "merge" && Number.isInteger(t.layer)).length ? " plus embeddings, norms or head" : ""}`],
      ...Object.entries(why).map(([reason, n]) => ["Copied from the base", `${n}: ${reason}`]),
      ["Read", `${fmtBytes(plan.bytes_read)} in ${plan.passes} pass${plan.passes > 1 ? "es" : ""}`],
      ["Write", fmtBytes(plan.bytes_written)],
      ["Largest tensor", fmtBytes(plan.largest_tensor_bytes)],
      ["Estimated peak memory", fmtBytes(plan.estimated_peak_bytes)],
    ];
    const dl = document.createElement("dl");
    dl.id = "plan-facts";
    for (const [k, v] of rows) {
      const dt = document.createElement("dt"); dt.textContent = k;
      const dd = document.createElement("dd"); dd.textContent = v;
      dl.append(dt, dd);
    }
    box.append(dl);
  }
  for (const note of notes || []) {
    const p = document.createElement("p"); p.className = "muted"; p.textContent = note; box.append(p);
  }
}

async function analyze(event, recipe = readRecipe()) {
  banner("");
  const sources = recipe.method === "transfer"
    ? [recipe.source_finetuned].filter(Boolean)
    : (recipe.models || []).map((m) => m.source).filter(Boolean);
  const base = recipe.method === "transfer" ? recipe.source_base : recipe.base;
  const res = await api("POST", "/v1/analyses", { json: { sources, base }, hubToken: true });
  if (res.ok && res.data?.id) { location.hash = `#/jobs/${res.data.id}`; return; }
  if (handleAuth(res)) return;
  if ($("#view-compose").hidden) banner(problemText(res.data)); else showProblem(res.data);
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
  // the detail repeats the list: show the list alone when there is one
  if (Array.isArray(p.errors) && p.errors.length) {
    box.textContent = `The import failed: ${p.errors.length} problem${p.errors.length > 1 ? "s" : ""}.`;
    const ul = document.createElement("ul");
    for (const e of p.errors) {
      const li = document.createElement("li");
      li.textContent = `${humanLoc(e.loc)}: ${e.msg}`;
      ul.append(li);
    }
    box.append(ul);
  } else box.textContent = problemText(p);
}


// ---------------------------------------------------------------------------------------------- sweeps
/** The number parameters of the current method, for the sweep's parameter list. */
function syncSweepParams() {
  const select = $("#sweep-param");
  const names = $$("#params-fields [data-param]").filter((i) => i.dataset.kind === "number").map((i) => i.dataset.param);
  const keep = select.value;
  select.replaceChildren(...names.map((n) => new Option(n, n)));
  if (names.includes(keep)) select.value = keep;
  $("#sweep").hidden = !names.length;
}

/** A list of values for one parameter becomes a batch (POST /v1/batches): one recipe per value. */
async function submitSweep() {
  const box = $("#sweep-errors");
  box.textContent = "";
  const param = $("#sweep-param").value;
  const values = $("#sweep-values").value.split(/[,\s]+/).filter(Boolean).map(Number);
  if (!param || values.length < 2 || values.some((v) => !Number.isFinite(v))) {
    box.textContent = "Give at least two numbers, separated by commas (use a dot for decimals: 0.5).";
    return;
  }
  const base = readRecipe();
  const recipes = values.map((v) => {
    const r = structuredClone(base);
    r.params = { ...(r.params || {}), [param]: v };
    if (r.output?.path) r.output.path = `${r.output.path.replace(/\/+$/, "")}-${param}-${v}`;
    return r;
  });
  const names = values.map((v) => `${param}=${v}`);
  const res = await api("POST", "/v1/batches", { json: { recipes, names }, hubToken: true });
  if (res.ok && res.data?.id) {
    location.hash = `#/batches/${res.data.id}`;
    return;
  }
  if (handleAuth(res)) return;
  const errors = Array.isArray(res.data?.errors) ? res.data.errors : [];
  box.textContent = errors.length ? errors.map((e) => `${humanLoc(e.loc)}: ${e.msg}`).join("; ") : problemText(res.data);
}

// ---------------------------------------------------------------------------------------------- gallery
/** The README's examples (GET /examples.json) as a starting point: loaded through the import, like a paste. */
async function loadGallery() {
  let examples = [];
  try {
    const res = await fetch("/examples.json");
    examples = res.ok ? await res.json() : [];
  } catch { examples = []; }
  state.gallery = Array.isArray(examples) ? examples : [];
  const select = $("#gallery");
  select.append(...state.gallery.map((e, i) => new Option(e.title, String(i))));
  select.closest("section").querySelector(".gallery-row").hidden = !state.gallery.length;
  $("label[for=gallery]").hidden = !state.gallery.length;
}

function loadExample() {
  const example = state.gallery?.[Number($("#gallery").value)];
  if (!example || $("#gallery").value === "") return;
  $("#import-text").value = example.yaml;
  importRecipe();
}
