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
  const ticket = (state.jobsTicket = (state.jobsTicket || 0) + 1);
  const res = await api("GET", `/v1/merges?${q}`);
  if (ticket !== state.jobsTicket) return; // a newer filter or page was asked for meanwhile
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
  $("#charts-title").textContent = job.kind === "analyze" ? "What the task vectors look like" : "What the merge does";
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
  $("#job-cancel").disabled = Boolean(job.cancel_requested);
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
  state.jobRecipe = job.recipe;
  $("#job-recipe-details").hidden = !job.recipe;
  if (job.recipe) $("#job-recipe").textContent = toYaml(job.recipe).replace(/^\n/, "");
}

async function openJob(id) {
  for (const s of ["#job-soup-section", "#job-charts-section", "#job-card-section", "#job-report-details", "#job-recipe-details", "#job-error"]) $(s).hidden = true;
  $("#job-charts").replaceChildren();
  $("#job-facts").replaceChildren();
  $("#job-progress-text").textContent = "";
  $("#job-output").hidden = true;
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
  if (job.status === "succeeded" && !controller.signal.aborted) await showReport(id, job);
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
  if (!res.ok) {
    button.disabled = false;
    if (!handleAuth(res)) banner(problemText(res.data));
    return;
  }
  banner("Cancellation requested.", "ok");
  if (res.data?.status) renderJob(res.data);
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

