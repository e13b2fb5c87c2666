// Jobs: the list with status filters, one job live over SSE (read with fetch(), since EventSource can't send
// the Authorization header), its report, charts and model card, and the batch view.
"use strict";

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


/** Where a job's result is (or goes): the Hub repo, else the output folder's name (full path on hover). */
function outputLabel(job) {
  const out = job.output || {};
  const hub = job.recipe?.output?.hub?.repo;
  if (out.url) return { text: hub || out.url, title: out.url };
  const path = out.path || job.recipe?.output?.path;
  if (path) return { text: String(path).split("/").filter(Boolean).pop() || path, title: path };
  return { text: hub ? `hub: ${hub}` : "", title: "" };
}

function jobRow(job) {
  const tr = document.createElement("tr");
  tr.dataset.id = job.id;
  const link = document.createElement("a");
  link.href = `#/jobs/${encodeURIComponent(job.id)}`;
  const name = job.name;
  link.textContent = name ? `${name} (${String(job.id).slice(0, 8)})` : String(job.id).slice(0, 8);
  link.title = job.id;
  const td = (content, cls) => { const c = document.createElement("td"); c.append(content ?? ""); if (cls) c.className = cls; return c; };
  const status = document.createElement("span");
  const badge = document.createElement("span");
  badge.className = `status s-${job.status}`;
  badge.textContent = job.status;
  status.append(badge);
  if (job.error?.code && job.status !== "succeeded") {
    const code = document.createElement("code");
    code.className = "error-code";
    code.textContent = ` ${job.error.code}`;
    code.title = job.error.detail || "";
    status.append(code);
  }
  const pct = fraction(job.progress);
  let batch = "";
  if (job.batch_id) {
    batch = document.createElement("a");
    batch.href = `#/batches/${encodeURIComponent(job.batch_id)}`;
    batch.textContent = String(job.batch_id).slice(0, 8);
  }
  const out = outputLabel(job);
  const outCell = td(out.text, "output-cell");
  if (out.title) outCell.title = out.title;
  const running = job.status === "running" && job.started_at ? (Date.now() - new Date(job.started_at).getTime()) / 1000 : null;
  const pick = document.createElement("input");
  pick.type = "checkbox";
  pick.className = "compare-pick";
  pick.value = job.id;
  pick.checked = (state.compare || []).includes(job.id);
  pick.setAttribute("aria-label", `Select ${name || String(job.id).slice(0, 8)} to compare`);
  pick.addEventListener("change", () => togglePick(job.id, pick.checked));
  tr.append(td(pick), td(link), td(job.kind || "merge"), td(job.recipe?.method || job.method || ""), td(status),
    td(pct === null ? "" : `${Math.round((job.status === "succeeded" ? 1 : pct) * 100)}%`), outCell,
    td(fmtDuration(job.duration_s ?? running)), td(fmtTime(job.created_at)), td(batch));
  return tr;
}

const JOBS_REFRESH_MS = 2000;

/** Two jobs picked in the list open side by side; a third pick replaces the oldest. */
function togglePick(id, on) {
  const picked = (state.compare || []).filter((x) => x !== id);
  if (on) picked.push(id);
  state.compare = picked.slice(-2);
  $$(".compare-pick").forEach((c) => { c.checked = state.compare.includes(c.value); });
  $$(".compare-button").forEach((b) => { b.disabled = state.compare.length !== 2; });
}

/** Flatten a recipe / report into dotted keys, so two jobs can be lined up field by field. */
function flatten(value, prefix = "", out = {}) {
  if (Array.isArray(value) && value.every((v) => v === null || typeof v !== "object")) out[prefix] = value.join(", ");
  else if (value && typeof value === "object") {
    for (const [k, v] of Object.entries(value)) flatten(v, prefix ? `${prefix}.${k}` : k, out);
  } else if (prefix) out[prefix] = value === null || value === undefined ? "" : String(value);
  return out;
}

/** Totals without the per-layer task-vector matrices (charts, not fields to line up). */
function withoutTaskVectors(totals) {
  const { task_vectors: _, ...rest } = totals || {};
  return rest;
}

async function openCompare(a, b) {
  const controller = new AbortController();
  state.jobStream = controller;
  $("#compare-body").replaceChildren();
  const [ja, jb] = await Promise.all([a, b].map((id) => api("GET", `/v1/merges/${encodeURIComponent(id)}`)));
  if (controller.signal.aborted) return;
  if (!ja.ok || !jb.ok) { const bad = ja.ok ? jb : ja; if (!handleAuth(bad)) banner(problemText(bad.data)); return; }
  const [ra, rb] = await Promise.all([ja.data, jb.data].map((j) => j.status === "succeeded"
    ? api("GET", `/v1/merges/${encodeURIComponent(j.id)}/report`) : Promise.resolve({ ok: false })));
  if (controller.signal.aborted) return;
  const head = (job) => job.name ? `${job.name} (${String(job.id).slice(0, 8)})` : String(job.id).slice(0, 8);
  $("#compare-a").textContent = head(ja.data);
  $("#compare-b").textContent = head(jb.data);
  const side = (job, report) => ({
    status: job.status,
    duration: fmtDuration(job.duration_s),
    output: job.output?.url || job.output?.path || "",
    ...flatten(job.recipe || {}, "recipe"),
    ...(report.ok ? flatten({ totals: withoutTaskVectors(report.data?.totals), timings: report.data?.timings || {} }) : {}),
    ...(report.ok && report.data?.peak_rss_bytes ? { "peak memory": fmtBytes(report.data.peak_rss_bytes) } : {}),
  });
  const A = side(ja.data, ra), B = side(jb.data, rb);
  const keys = [...new Set([...Object.keys(A), ...Object.keys(B)])].filter((k) => !/^recipe\.warnings/.test(k));
  $("#compare-body").replaceChildren(...keys.map((k) => {
    const tr = document.createElement("tr");
    if ((A[k] ?? "") !== (B[k] ?? "")) tr.className = "differs";
    for (const v of [k, A[k] ?? "", B[k] ?? ""]) { const c = document.createElement("td"); c.textContent = v; tr.append(c); }
    return tr;
  }));
}

async function loadJobs({ reset } = {}) {
  renderStatusFilters();
  if (reset) { state.jobsCursor = null; state.jobsPaged = false; $("#jobs-body").replaceChildren(); }
  else if (state.jobsCursor) state.jobsPaged = true;
  const q = new URLSearchParams();
  if (state.jobsStatus) q.set("status", state.jobsStatus);
  if (state.jobsCursor) q.set("cursor", state.jobsCursor);
  const ticket = (state.jobsTicket = (state.jobsTicket || 0) + 1);
  const res = await api("GET", `/v1/merges?${q}`);
  if (ticket !== state.jobsTicket) return; // a newer filter or page was asked for meanwhile
  if (!res.ok) { if (!handleAuth(res)) banner(problemText(res.data)); return; }
  const items = res.data?.items || [];
  for (const job of items) $("#jobs-body").append(jobRow(job));
  state.jobsCursor = res.data?.next_cursor || null;
  $("#jobs-more").hidden = !state.jobsCursor;
  $("#jobs-empty").hidden = $("#jobs-body").children.length > 0;
  scheduleJobsRefresh();
}

/** While the list is shown, re-read the newest page every 2 s: new jobs appear, running ones move on. Rows
 *  loaded with "Load more" stay as they are. */
function scheduleJobsRefresh() {
  clearTimeout(state.jobsTimer);
  state.jobsTimer = setTimeout(refreshJobs, JOBS_REFRESH_MS);
}

async function refreshJobs() {
  if ($("#view-jobs").hidden) return;
  const q = new URLSearchParams();
  if (state.jobsStatus) q.set("status", state.jobsStatus);
  const ticket = state.jobsTicket;
  const res = await api("GET", `/v1/merges?${q}`);
  if (ticket !== state.jobsTicket || $("#view-jobs").hidden) return;
  if (res.ok) {
    const body = $("#jobs-body");
    const fresh = (res.data?.items || []).map(jobRow);
    const byId = new Map([...body.children].map((r) => [r.dataset.id, r]));
    // rows are updated in place, new jobs on top; a row holding keyboard focus is left as it is until it loses it
    const keep = (row) => row.contains(document.activeElement);
    const added = [];
    for (const row of fresh) {
      const old = byId.get(row.dataset.id);
      if (!old) added.push(row);
      else if (!keep(old)) old.replaceWith(row);
    }
    body.prepend(...added);
    if (!state.jobsPaged) { // one page shown: it is exactly the newest page
      const ids = new Set(fresh.map((r) => r.dataset.id));
      for (const row of [...body.children]) if (!ids.has(row.dataset.id) && !keep(row)) row.remove();
    }
    $("#jobs-empty").hidden = body.children.length > 0;
  }
  scheduleJobsRefresh();
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

// What a job's progress counts, by phase (jobs.progress_phase): a first pass reads every merged tensor once
// before the merge starts, so it gets its own label instead of a merge stuck at 0 %.
const PHASES = {
  global_stats: { label: "First pass: global statistics", unit: "tensors" },
  lines_alpha: { label: "First pass: LiNeS α", unit: "tensors" },
  merge: { label: "Merging", unit: "tensors" },
  evaluate: { label: "Scoring candidate soups", unit: "evaluations" },
  train: { label: "Learning coefficients", unit: "steps" },
};

function renderJob(job) {
  $("#charts-title").textContent = job.kind === "analyze" ? "What the task vectors look like" : "What the merge does";
  const name = job.name;
  $("#job-title").textContent = `${job.kind === "analyze" ? "Analysis" : "Merge"} ${name ? `“${name}” ` : ""}${String(job.id).slice(0, 8)}`;
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
  const phase = PHASES[p.phase] || null;
  const bits = [`${pct}%`];
  if (job.status === "running" && phase) bits.unshift(phase.label);
  if (p.tensors_total) bits.push(`${p.tensors_done ?? 0} / ${p.tensors_total} ${phase?.unit || "tensors"}`);
  if (p.bytes_total) bits.push(`${fmtBytes(p.bytes_done)} / ${fmtBytes(p.bytes_total)}`);
  if (job.status === "running" && Number.isFinite(p.eta_s)) bits.push(`ETA ${fmtDuration(p.eta_s)}`);
  if (job.status === "queued") bits.unshift("Waiting for a worker");
  if (job.cancel_requested && !TERMINAL.has(job.status)) bits.unshift("Cancelling…");
  $("#job-progress-text").textContent = bits.join(" · ");
  const confirming = !$("#job-cancel-confirm").hidden;
  if (TERMINAL.has(job.status) || job.cancel_requested) $("#job-cancel-confirm").hidden = true;
  $("#job-cancel").hidden = TERMINAL.has(job.status) || (confirming && !job.cancel_requested);
  $("#job-cancel").disabled = Boolean(job.cancel_requested);
  $("#job-edit").hidden = !(job.kind !== "analyze" && job.recipe?.method);
  const out = job.output || {};
  const link = $("#job-output");
  link.hidden = !(out.url || out.path);
  if (out.url) { link.href = out.url; link.textContent = "Open on the Hub"; link.target = "_blank"; link.rel = "noopener noreferrer"; }
  else if (out.path) { link.removeAttribute("href"); link.textContent = `Output: ${out.path}`; link.classList.add("path"); }
  const r = job.recipe || {};
  $("#job-analyze").hidden = !(job.kind !== "analyze" && r.base && r.models?.length && TERMINAL.has(job.status));
  const err = $("#job-error");
  err.hidden = !job.error && job.status !== "cancelled";
  err.classList.toggle("notice", job.status === "cancelled");
  if (job.status === "cancelled") err.textContent = `Cancelled: ${job.error?.detail || "the job was cancelled"}.`;
  else if (job.error) err.textContent = `${job.error.code ? `[${job.error.code}] ` : ""}${problemText(job.error)}`;
  // a failed Hub push after a finished merge: the model is on disk, only the upload needs another try
  const uploadFailed = job.status === "failed" && Boolean(out.path) && Boolean(r.output?.hub);
  $("#job-retry-publish").hidden = !uploadFailed;
  if (uploadFailed) err.textContent = `The merge finished and is kept at ${out.path}; only the upload to ${r.output.hub.repo} failed. ${err.textContent}`;
  state.job = job;
  state.jobRecipe = job.recipe;
  $("#job-recipe-details").hidden = !job.recipe;
  if (job.recipe) $("#job-recipe").textContent = toYaml(job.recipe).replace(/^\n/, "");
}

async function openJob(id) {
  for (const s of ["#job-cancel", "#job-cancel-confirm", "#job-edit", "#job-retry-publish", "#job-files-section", "#job-soup-section", "#job-charts-section", "#job-card-section", "#job-report-details", "#job-recipe-details", "#job-error"]) $(s).hidden = true;
  $("#job-charts").replaceChildren();
  $("#job-facts").replaceChildren();
  $("#job-progress-text").textContent = "";
  $("#job-output").hidden = true;
  $("#job-title").textContent = "Job";
  if (!sessionStorage.getItem(TOKEN_KEY)) { // a job link opened in a new tab: this tab has no token yet
    $("#job-progress-text").textContent = "Enter your API token to see this job.";
    banner("This tab has no API token yet: enter it under “Tokens” to open the job.", "info");
    $("#tokens").open = true;
    $("#api-token").focus();
    return;
  }
  const controller = new AbortController();
  state.jobStream = controller;
  const res = await api("GET", `/v1/merges/${encodeURIComponent(id)}`);
  if (controller.signal.aborted) return; // the user has moved on
  if (!res.ok) { if (!handleAuth(res)) banner(problemText(res.data)); return; }
  let job = res.data;
  renderJob(job);
  if (!TERMINAL.has(job.status)) job = await followJob(id, controller.signal) || job;
  if (controller.signal.aborted) return;
  const final = await api("GET", `/v1/merges/${encodeURIComponent(id)}`);
  if (final.ok) { job = final.data; renderJob(job); }
  const merged = job.status === "succeeded" || (job.status === "failed" && job.output?.path);
  if (merged && !controller.signal.aborted) await Promise.all([showReport(id, job), job.output?.path ? showFiles(id) : null]);
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

/** Cancel asks first: the merge's work so far is thrown away. */
function askCancel() {
  $("#job-cancel").hidden = true;
  $("#job-cancel-confirm").hidden = false;
  $("#job-cancel-no").focus();
}

/** Edit and resubmit: the job's recipe back in the compose form (its output folder cleared: it is taken). */
function editJob() {
  const job = state.job;
  if (!job?.recipe) return;
  const recipe = structuredClone(job.recipe);
  if (recipe.output?.path && job.status === "succeeded") delete recipe.output.path;
  delete recipe.warnings;
  if (state.methods.length) fillForm(recipe); else state.pendingEdit = recipe;
  state.flash = [`The recipe of job ${String(job.id).slice(0, 8)} is in the form: change it and submit again.`, "info"];
  location.hash = "#/";
}

/** Push the finished folder again (one new commit); the merge is not redone. */
async function retryPublish() {
  const job = state.job;
  if (!job) return;
  const button = $("#job-retry-publish");
  button.disabled = true;
  const res = await api("POST", `/v1/merges/${encodeURIComponent(job.id)}/publish`, { hubToken: true });
  button.disabled = false;
  if (!res.ok) { if (!handleAuth(res)) banner(problemText(res.data)); return; }
  state.flash = ["Upload queued again: the finished merge is pushed as it is.", "ok"];
  route(); // follow the job live again
}

async function cancelJob() {
  const id = location.hash.split("/")[2];
  if (!id) return;
  $("#job-cancel-confirm").hidden = true;
  $("#job-cancel").hidden = false;
  const button = $("#job-cancel");
  button.disabled = true;
  const res = await api("DELETE", `/v1/merges/${encodeURIComponent(decodeURIComponent(id))}`);
  if (!res.ok) {
    button.disabled = false;
    if (!handleAuth(res)) banner(problemText(res.data));
    return;
  }
  banner("Cancellation requested.", "ok");
  if (res.data?.status) renderJob(res.data);
}

/** The output folder's files with their sizes (what a download would fetch). */
async function showFiles(id) {
  const res = await api("GET", `/v1/merges/${encodeURIComponent(id)}/files`);
  if (!res.ok || !Array.isArray(res.data?.files)) return;
  const rows = res.data.files.map((f) => {
    const tr = document.createElement("tr");
    const name = document.createElement("td"); name.textContent = f.name;
    const size = document.createElement("td"); size.textContent = fmtBytes(f.bytes); size.title = `${f.bytes} bytes`;
    tr.append(name, size);
    return tr;
  });
  $("#job-files-body").replaceChildren(...rows);
  $("#job-files-summary").textContent = `${res.data.files.length} files, ${fmtBytes(res.data.total_bytes)} in ${res.data.path}`;
  $("#job-files-section").hidden = false;
}

async function showReport(id, job) {
  const res = await api("GET", `/v1/merges/${encodeURIComponent(id)}/report`);
  const report = res.ok ? res.data : job.report || null;
  if (!report) return;
  $("#job-report").textContent = JSON.stringify(report, null, 2);
  $("#job-report-details").hidden = false;
  const charts = AlloyCharts.fromReport(report, job);
  $("#job-charts").replaceChildren(...charts);
  $("#job-charts-section").hidden = !charts.length;
  renderGreedySoup(report);
  const card = report.model_card ?? report.readme ?? report.card ?? report.outputs?.model_card ?? null;
  if (typeof card === "string" && card.trim()) {
    $("#job-card").replaceChildren(...renderMarkdown(card));
    $("#job-card-section").hidden = false;
  }
}

// ---------------------------------------------------------------------------------------------- batch
/** The batch view: its facts and its jobs, refreshed every 2 s until every job has ended. */
async function openBatch(id) {
  const controller = new AbortController();
  state.jobStream = controller;
  $("#batch-body").replaceChildren();
  $("#batch-facts").replaceChildren();
  while (!controller.signal.aborted) {
    const res = await api("GET", `/v1/batches/${encodeURIComponent(id)}`);
    if (controller.signal.aborted) return;
    if (!res.ok) { if (!handleAuth(res)) banner(problemText(res.data)); return; }
    const jobs = renderBatch(res.data || {}, id);
    if (jobs.every((j) => TERMINAL.has(j.status))) return;
    await new Promise((r) => setTimeout(r, 2000));
  }
}

function renderBatch(batch, id) {
  $("#batch-title").textContent = `Batch ${String(batch.id || id).slice(0, 8)}`;
  const facts = [["Batch id", batch.id], ["Created", fmtTime(batch.created_at)], ["Priority", batch.priority],
    ["Jobs", batch.total]];
  if (batch.counts && typeof batch.counts === "object") {
    facts.push(["By status", Object.entries(batch.counts).filter(([, n]) => n).map(([k, n]) => `${k} ${n}`).join(" · ")]);
  }
  $("#batch-facts").replaceChildren(...facts.filter(([, v]) => v !== undefined && v !== null && v !== "").flatMap(([k, v]) => {
    const dt = document.createElement("dt"); dt.textContent = k;
    const dd = document.createElement("dd"); dd.textContent = String(v);
    return [dt, dd];
  }));
  const jobs = (batch.jobs || batch.items || []).filter((j) => j && typeof j === "object");
  $("#batch-body").replaceChildren(...jobs.map(jobRow));
  renderSweep(batch, jobs);
  return jobs;
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

