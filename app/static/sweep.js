// A sweep's comparison table on the batch page: when a batch's jobs differ in one number of their recipes (the
// form's sweep: a λ or density list becomes a batch), one row per value: the job, its status and the evaluator's
// score (GET /v1/batches/{id} → scores, see app/services/scores.py), the best one marked once every job has ended.
"use strict";

const SCORE_NAMES = {
  "greedy_soup.final_score": "Held-out score (higher is better)",
  "atlas.final_loss": "Final loss (lower is better)",
};

/** The one recipe field whose value differs between the jobs, if it is a number in each: {key, values}. */
function sweptField(jobs) {
  if (jobs.length < 2) return null;
  const flat = jobs.map((j) => flatten(j.recipe || {}));
  const keys = new Set(flat.flatMap((f) => Object.keys(f)));
  const differing = [...keys].filter((k) => !k.startsWith("output.") && new Set(flat.map((f) => f[k])).size > 1);
  if (differing.length !== 1) return null;
  const key = differing[0];
  const values = flat.map((f) => Number(f[key]));
  return values.every((v) => Number.isFinite(v)) && flat.every((f) => f[key] !== "") ? { key, values } : null;
}

function renderSweep(batch, jobs) {
  const section = $("#sweep-results");
  const swept = sweptField(jobs);
  section.hidden = !swept;
  if (!swept) return;
  const scores = new Map((Array.isArray(batch.scores) ? batch.scores : []).map((s) => [s.job_id, s]));
  const metrics = new Set([...scores.values()].map((s) => s.metric));
  const finished = jobs.every((j) => TERMINAL.has(j.status));
  let best = null;
  if (finished && metrics.size === 1) {
    for (const s of scores.values()) {
      if (!best || (s.higher_is_better ? s.value > best.value : s.value < best.value)) best = s;
    }
  }
  $("#sweep-param-head").textContent = swept.key.replace(/^params\./, "");
  $("#sweep-score-head").textContent = metrics.size === 1 ? SCORE_NAMES[[...metrics][0]] || [...metrics][0] : "Score";
  const rows = jobs.map((job, i) => ({ job, value: swept.values[i] })).sort((a, b) => a.value - b.value);
  $("#sweep-body").replaceChildren(...rows.map(({ job, value }) => {
    const tr = document.createElement("tr");
    const cell = (content) => { const td = document.createElement("td"); td.append(content); return td; };
    const link = document.createElement("a");
    link.href = `#/jobs/${encodeURIComponent(job.id)}`;
    link.textContent = job.name || String(job.id).slice(0, 8);
    const badge = document.createElement("span");
    badge.className = `status s-${job.status}`;
    badge.textContent = job.status;
    const score = scores.get(job.id);
    const scoreCell = cell(score ? Charts.fmt(score.value) : "–");
    scoreCell.className = "score";
    if (best && score === best) {
      tr.classList.add("best");
      const mark = document.createElement("strong");
      mark.className = "best-mark";
      mark.textContent = " ★ best";
      scoreCell.append(mark);
    }
    tr.append(cell(String(value)), cell(link), cell(badge), scoreCell);
    return tr;
  }));
  const note = $("#sweep-results-note");
  if (!finished) note.textContent = "The best value is marked when every job has ended.";
  else if (!scores.size) note.textContent = "No scores: this method does not run an evaluator on its result (greedy_soup and atlas do).";
  else note.textContent = "";
}
