// Greedy soup's held-out evaluator: the "Evaluator" fieldset (shown for methods that need one), the held-out
// JSONL upload (POST /v1/files fills the data path), and the job page's table of ingredient scores.
"use strict";

/** Methods whose recipe carries an `evaluator` section (atlas: to train, unless its steps are 0). */
const EVALUATOR_METHODS = new Set(["greedy_soup", "atlas"]);
/** Of those, the ones that run without one: a blank data path leaves the section out. */
const OPTIONAL_EVALUATOR = new Set(["atlas"]);

function needsEvaluator(info) { return Boolean(info && EVALUATOR_METHODS.has(info.name)); }

function syncEvaluator() {
  $("#evaluator-fieldset").hidden = !needsEvaluator(state.method);
}

/** The recipe's evaluator section, or undefined when the method has none. Empty optional fields are left out. */
function readEvaluator() {
  if (!needsEvaluator(state.method)) return undefined;
  const ev = { kind: $("#evaluator-kind").value, data: $("#evaluator-data").value.trim() };
  if (!ev.data && OPTIONAL_EVALUATOR.has(state.method.name)) return undefined;
  const text = $("#evaluator-text-field").value.trim();
  if (text && text !== "text") ev.text_field = text;
  const label = $("#evaluator-label-field").value.trim();
  if (label && label !== "label") ev.label_field = label;
  const model = $("#evaluator-model").value.trim();
  if (model) ev.model = model;
  const max = parseNumberish($("#evaluator-max-examples").value);
  if (max !== undefined) ev.max_examples = max;
  return ev;
}

function fillEvaluator(ev) {
  ev = ev || {};
  $("#evaluator-kind").value = ev.kind || "causal_lm_loss";
  $("#evaluator-data").value = ev.data ?? "";
  $("#evaluator-text-field").value = ev.text_field ?? "text";
  $("#evaluator-label-field").value = ev.label_field ?? "label";
  $("#evaluator-model").value = ev.model ?? "";
  $("#evaluator-max-examples").value = ev.max_examples ?? "";
  // sections the form has no control for (classes, prompt_template, ...) are kept so an import round-trips
  const known = ["kind", "data", "text_field", "label_field", "model", "max_examples"];
  state.evaluatorExtra = Object.fromEntries(Object.entries(ev).filter(([k]) => !known.includes(k)));
}

/** Upload the picked file as raw JSONL; on success its server path goes into the data field. */
async function uploadHeldout(event) {
  const file = event.target.files?.[0];
  const status = $("#evaluator-upload-status");
  if (!file) return;
  status.textContent = `Uploading ${file.name}…`;
  const headers = { Accept: "application/json, application/problem+json", "Content-Type": "application/x-ndjson" };
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = `Bearer ${token}`;
  let res, data = null;
  try {
    res = await fetch("/v1/files", { method: "POST", headers, body: file });
    const text = await res.text();
    try { data = text ? JSON.parse(text) : null; } catch { data = { detail: text.slice(0, 500) }; }
  } catch (err) {
    status.textContent = `Upload failed: ${err.message || err}`;
    return;
  } finally {
    event.target.value = ""; // picking the same file again uploads again
  }
  if (!res.ok) {
    if (handleAuth({ status: res.status, data })) { status.textContent = ""; return; }
    status.textContent = `Upload failed: ${problemText(data)}`;
    return;
  }
  $("#evaluator-data").value = data.path;
  status.textContent = `Uploaded ${file.name}: ${data.lines} rows, ${fmtBytes(data.bytes)}.`;
  updatePreview();
}

/** The job page's greedy-soup table: every ingredient's score, its greedy step, and whether it was chosen. */
function renderGreedySoup(report) {
  const section = $("#job-soup-section");
  const soup = report?.greedy_soup;
  if (!soup || !Array.isArray(soup.ingredients)) { section.hidden = true; return; }
  const chosen = new Set(soup.chosen || []);
  const steps = new Map((soup.steps || []).map((s) => [s.index, s]));
  const fmt = (x) => (typeof x === "number" && Number.isFinite(x) ? x.toFixed(4) : "–");
  const rows = soup.ingredients.map((ing) => {
    const tr = document.createElement("tr");
    const step = steps.get(ing.index);
    const verdict = chosen.has(ing.index) ? "chosen" : step && !step.accepted ? "rejected" : "not tried";
    tr.dataset.chosen = String(chosen.has(ing.index));
    for (const text of [String(ing.index + 1), ing.source, fmt(ing.score), step ? fmt(step.score) : "–", verdict]) {
      const td = document.createElement("td");
      td.textContent = text;
      tr.append(td);
    }
    return tr;
  });
  $("#job-soup-body").replaceChildren(...rows);
  $("#job-soup-summary").textContent =
    `${chosen.size} of ${soup.ingredients.length} ingredients chosen; soup score ${fmt(soup.final_score)} ` +
    `after ${soup.evaluations ?? "?"} evaluations.`;
  section.hidden = false;
}
