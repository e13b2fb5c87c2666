// Turns a job report into charts. Two report shapes (see merge_ops/pipeline.py and merge_ops/inspect.py):
//   merge:   {tensors: [{name, action, shape, layer, kept_density?, sign_conflict_rate?, lines_scale?,
//             task_vector_gram?, ...}], totals: {task_vectors?: {norms, cosine, layers: [{layer, norms, cosine}]}}}
//             (task_vectors: merge_ops/task_vector_stats.py, the Gram matrices summed per layer and model)
//   analyze: {models: [label], norms: [n], cosine: [[c]], sign_conflict_rate, layers: [{layer, index, norms: [..],
//             sign_conflict_rate, numel}]}  (possibly nested under "statistics"/"stats"/"analysis")
// Defensive by design: a series that isn't in the report becomes a note, never an exception.
"use strict";

const AlloyCharts = (() => {
  const num = (v) => (typeof v === "number" && Number.isFinite(v) ? v : null);
  const numel = (shape) => (Array.isArray(shape) ? shape.reduce((a, b) => a * (Number(b) || 0), 1) : 1);

  /** Per-layer weighted mean of one stat over the merged tensors in each layer: [[layer, value], ...]. */
  function perLayerMean(tensors, key) {
    const acc = new Map();
    for (const t of tensors) {
      const layer = num(t?.layer);
      const v = num(t?.[key] ?? t?.stats?.[key]);
      if (layer === null || v === null) continue;
      const w = Math.max(1, numel(t.shape));
      const a = acc.get(layer) || [0, 0];
      acc.set(layer, [a[0] + v * w, a[1] + w]);
    }
    return [...acc.entries()].sort((a, b) => a[0] - b[0]).map(([l, [s, w]]) => [l, s / w]);
  }

  /** Per-layer, per-model norm from tensor rows that carry a list of per-model norms (if the engine adds them). */
  function perLayerNormsFromTensors(tensors) {
    const acc = new Map();
    let k = 0;
    for (const t of tensors) {
      const norms = t?.task_vector_norms ?? t?.norms;
      const layer = num(t?.layer);
      if (layer === null || !Array.isArray(norms)) continue;
      k = Math.max(k, norms.length);
      const sq = acc.get(layer) || [];
      norms.forEach((n, i) => { sq[i] = (sq[i] || 0) + (num(n) ?? 0) ** 2; });
      acc.set(layer, sq);
    }
    const layers = [...acc.keys()].sort((a, b) => a - b);
    return Array.from({ length: k }, (_, i) => ({
      label: `model ${i + 1}`,
      points: layers.map((l) => [l, Math.sqrt(acc.get(l)[i] || 0)]),
    }));
  }

  function analysisOf(report) {
    for (const c of [report, report?.statistics, report?.stats, report?.analysis, report?.result]) {
      if (c && typeof c === "object" && Array.isArray(c.layers) && (Array.isArray(c.models) || Array.isArray(c.cosine))) return c;
    }
    return null;
  }

  function layerIndex(row, i) {
    return num(row?.index) ?? num(row?.layer) ?? (String(row?.layer).match(/(\d+)$/) ? Number(RegExp.$1) : i);
  }

  function fromReport(report, job) {
    const figs = [];
    const analysis = analysisOf(report);
    const tensors = Array.isArray(report?.tensors) ? report.tensors : [];
    const tv = taskVectorsOf(report);
    const labels = (analysis?.models || modelLabels(job, tv?.norms?.length)).map((m, i) => shortLabel(m, i));
    const isMerge = tensors.length > 0 || job?.kind === "merge";

    // 1. per-layer task-vector norm per model
    let normSeries = [];
    if (analysis) {
      const rows = analysis.layers.filter((r) => num(r?.index) !== null && Array.isArray(r?.norms));
      const k = Math.max(0, ...rows.map((r) => r.norms.length));
      normSeries = Array.from({ length: k }, (_, i) => ({
        label: labels[i] || `model ${i + 1}`,
        points: rows.map((r, j) => [layerIndex(r, j), num(r.norms[i])]).filter((p) => p[1] !== null),
      })).filter((s) => s.points.length);
    } else if (tv) {
      normSeries = (tv.norms || []).map((_, i) => ({
        label: labels[i] || `model ${i + 1}`,
        points: tv.layers.map((r) => [num(r?.layer), num(r?.norms?.[i])]).filter((p) => p[0] !== null && p[1] !== null),
      })).filter((s) => s.points.length);
    } else {
      normSeries = perLayerNormsFromTensors(tensors).filter((s) => s.points.length);
    }
    figs.push(normSeries.length
      ? Charts.line("Task-vector norm per layer", normSeries, { xLabel: "layer", yLabel: "‖τ‖₂" })
      : Charts.missing("Task-vector norm per layer", isMerge && !analysis
        ? "Per-model norms are not in a merge report — run “Analyze task vectors” on the same models."
        : "No per-layer norms in this report."));

    // 2. pairwise cosine similarity of the task vectors
    const cos = analysis?.cosine ?? tv?.cosine ?? report?.cosine ?? report?.cosine_similarity;
    const okMatrix = Array.isArray(cos) && cos.length && cos.every((r) => Array.isArray(r) && r.length === cos.length);
    figs.push(okMatrix
      ? Charts.heatmap("Cosine similarity of the task vectors", cos.map((_, i) => labels[i] || `model ${i + 1}`), cos)
      : Charts.missing("Cosine similarity of the task vectors", isMerge && !analysis
        ? "Not in a merge report — run “Analyze task vectors” on the same models."
        : "No cosine matrix in this report."));

    // 2b. per layer, the cosine of each pair of task vectors (from the layer's summed Gram matrix: exact)
    const k = tv?.norms?.length || 0;
    if (!analysis && tv && k > 1 && k <= 4) {
      const pairs = [];
      for (let i = 0; i < k; i++) for (let j = i + 1; j < k; j++) pairs.push([i, j]);
      const pairSeries = pairs.map(([i, j]) => ({
        label: `${labels[i] || `model ${i + 1}`} × ${labels[j] || `model ${j + 1}`}`,
        points: tv.layers.map((r) => [num(r?.layer), num(r?.cosine?.[i]?.[j])]).filter((p) => p[0] !== null && p[1] !== null),
      })).filter((s) => s.points.length);
      if (pairSeries.length) figs.push(Charts.line("Cosine of the task vectors per layer", pairSeries, { xLabel: "layer", yLabel: "cos", yMin: Math.min(0, ...pairSeries.flatMap((s) => s.points.map((p) => p[1]))), yMax: 1 }));
    }

    // 3. sign-conflict rate per layer (TIES)
    let conflict = [];
    if (analysis) {
      conflict = analysis.layers.filter((r) => num(r?.index) !== null)
        .map((r, j) => [layerIndex(r, j), num(r.sign_conflict_rate)]).filter((p) => p[1] !== null);
    } else conflict = perLayerMean(tensors, "sign_conflict_rate");
    figs.push(conflict.length
      ? Charts.line("Sign-conflict rate per layer", [{ label: "", points: conflict }], { xLabel: "layer", yLabel: "rate", yMin: 0, bars: true })
      : Charts.missing("Sign-conflict rate per layer", "No sign election in this merge (a TIES-style method reports it)."));

    if (!analysis) {
      // 4. density kept per layer
      const kept = perLayerMean(tensors, "kept_density");
      figs.push(kept.length
        ? Charts.line("Density kept per layer", [{ label: "", points: kept }], { xLabel: "layer", yLabel: "kept", yMin: 0, yMax: 1 })
        : Charts.missing("Density kept per layer", "This method does not sparsify, so nothing is dropped."));
      // 5. LiNeS scale per layer
      const lines = perLayerMean(tensors, "lines_scale");
      figs.push(lines.length
        ? Charts.line("LiNeS scale per layer", [{ label: "", points: lines }], { xLabel: "layer", yLabel: "λ(ℓ)", yMin: 0 })
        : Charts.missing("LiNeS scale per layer", "LiNeS was not used in this merge."));
    }
    // only the panels that have data; a report with none gets one note saying so
    const drawn = figs.filter((f) => !f.classList.contains("chart-missing"));
    if (drawn.length) return drawn;
    return [Charts.missing("Charts", isMerge && !analysis
      ? "This merge reports no per-layer statistics; “Analyze task vectors” shows norms and cosines of the same models."
      : "No per-layer statistics in this report.")];
  }

  function taskVectorsOf(report) {
    const tv = report?.totals?.task_vectors;
    return tv && Array.isArray(tv.norms) && Array.isArray(tv.layers) ? tv : null;
  }

  /** The job's model sources as labels, when they line up with the K task vectors (else "model i"). */
  function modelLabels(job, k) {
    const models = Array.isArray(job?.recipe?.models) ? job.recipe.models : [];
    if (!k || models.length !== k) return [];
    return models.map((m) => {
      const src = m?.source ?? m;
      return typeof src === "string" ? src.replace(/^hf:\/\//, "") : src?.repo ?? "";
    });
  }

  function shortLabel(label, i) {
    const s = String(label ?? `model ${i + 1}`);
    const parts = s.replace(/\/+$/, "").split("/");
    return parts.length > 1 ? parts.slice(-2).join("/") : s;
  }

  return { fromReport };
})();
