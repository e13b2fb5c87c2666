// Plain-SVG charts: line charts over the layer index and a heatmap. No library, so no license question and
// no network. Every chart takes already-clean numbers; callers drop missing series before calling.
"use strict";

const Charts = (() => {
  const SVG = "http://www.w3.org/2000/svg";
  const PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"];

  function el(name, attrs = {}, text) {
    const node = document.createElementNS(SVG, name);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function fmt(v) {
    if (!Number.isFinite(v)) return "–";
    const a = Math.abs(v);
    if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(1);
    return Number(v.toPrecision(3)).toString();
  }

  function niceTicks(lo, hi, count = 5) {
    if (lo === hi) { lo -= 0.5; hi += 0.5; }
    const step0 = (hi - lo) / count;
    const mag = 10 ** Math.floor(Math.log10(step0));
    const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= step0) || step0;
    // from the last tick at or below lo to the first at or above hi: the axis always shows its top value
    const first = Math.floor(lo / step + 1e-9) * step, last = Math.ceil(hi / step - 1e-9) * step;
    const ticks = [];
    for (let t = first; t <= last + step * 1e-9; t += step) ticks.push(Number(t.toPrecision(12)));
    return { lo: ticks[0], hi: ticks[ticks.length - 1], ticks };
  }

  function figure(title, note) {
    const fig = document.createElement("figure");
    fig.className = "chart";
    const cap = document.createElement("figcaption");
    cap.textContent = title;
    fig.append(cap);
    if (note) {
      const p = document.createElement("p");
      p.className = "chart-note";
      p.textContent = note;
      fig.append(p);
    }
    return fig;
  }

  /** A figure with only a note: the series this chart needs is not in the report. */
  function missing(title, note) {
    const fig = figure(title, note);
    fig.classList.add("chart-missing");
    return fig;
  }

  /**
   * series: [{label, points: [[x, y], ...]}]; opts: {xLabel, yLabel, yMin, yMax, bars}.
   * Returns a <figure> holding an SVG with axes, a legend and a <title> per point for hover/screen readers.
   */
  function line(title, series, opts = {}) {
    // drawn at about its shown width, so 11-unit ticks stay ~11 px on a phone instead of shrinking to 7
    const W = Math.round(Math.min(560, Math.max(300, (window.innerWidth || 560) - 64)));
    const H = Math.round(W * 0.46), m = { l: 56, r: 12, t: 12, b: 40 };
    const pts = series.flatMap((s) => s.points);
    const fig = figure(title, opts.note);
    if (!pts.length) return missing(title, "No data points.");
    const xs = pts.map((p) => p[0]), ys = pts.map((p) => p[1]);
    const xr = niceTicks(Math.min(...xs), Math.max(...xs), Math.min(8, new Set(xs).size));
    if (opts.bars) { // half a slot of room on both sides, so the first and last bars stay inside the axes
      xr.lo = Math.min(...xs) - 0.5; xr.hi = Math.max(...xs) + 0.5;
      xr.ticks = xr.ticks.filter((t) => t >= xr.lo && t <= xr.hi);
    }
    const yr = niceTicks(opts.yMin ?? Math.min(0, ...ys), opts.yMax ?? Math.max(...ys));
    const sx = (x) => m.l + ((x - xr.lo) / (xr.hi - xr.lo || 1)) * (W - m.l - m.r);
    const sy = (y) => H - m.b - ((y - yr.lo) / (yr.hi - yr.lo || 1)) * (H - m.t - m.b);
    const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title, class: "chart-svg" });
    for (const t of yr.ticks) {
      svg.append(el("line", { x1: m.l, x2: W - m.r, y1: sy(t), y2: sy(t), class: "grid" }));
      svg.append(el("text", { x: m.l - 6, y: sy(t) + 4, "text-anchor": "end", class: "tick" }, fmt(t)));
    }
    for (const t of xr.ticks) {
      svg.append(el("text", { x: sx(t), y: H - m.b + 16, "text-anchor": "middle", class: "tick" }, fmt(t)));
    }
    svg.append(el("line", { x1: m.l, x2: W - m.r, y1: H - m.b, y2: H - m.b, class: "axis" }));
    svg.append(el("line", { x1: m.l, x2: m.l, y1: m.t, y2: H - m.b, class: "axis" }));
    if (opts.xLabel) svg.append(el("text", { x: (m.l + W - m.r) / 2, y: H - 6, "text-anchor": "middle", class: "label" }, opts.xLabel));
    if (opts.yLabel) svg.append(el("text", { x: 12, y: (m.t + H - m.b) / 2, transform: `rotate(-90 12 ${(m.t + H - m.b) / 2})`, "text-anchor": "middle", class: "label" }, opts.yLabel));
    series.forEach((s, i) => {
      const color = PALETTE[i % PALETTE.length];
      const sorted = [...s.points].sort((a, b) => a[0] - b[0]);
      if (opts.bars) {
        const slot = (W - m.l - m.r) / (xr.hi - xr.lo || 1);
        const bw = Math.max(2, (slot * 0.8) / series.length);
        sorted.forEach(([x, y]) => {
          const r = el("rect", { x: sx(x) - (bw * series.length) / 2 + i * bw, y: Math.min(sy(y), sy(0)), width: bw, height: Math.abs(sy(0) - sy(y)), fill: color });
          r.append(el("title", {}, `${s.label ? `${s.label} · ` : ""}layer ${x}: ${fmt(y)}`));
          svg.append(r);
        });
        return;
      }
      if (sorted.length > 1) {
        const d = sorted.map(([x, y], j) => `${j ? "L" : "M"}${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join("");
        svg.append(el("path", { d, stroke: color, fill: "none", "stroke-width": 2 }));
      }
      for (const [x, y] of sorted) {
        const c = el("circle", { cx: sx(x), cy: sy(y), r: 3, fill: color });
        c.append(el("title", {}, `${s.label ? `${s.label} · ` : ""}layer ${x}: ${fmt(y)}`));
        svg.append(c);
      }
    });
    fig.append(svg);
    if (series.length > 1 || series[0].label) fig.append(legend(series.map((s) => s.label)));
    return fig;
  }

  function legend(labels) {
    const ul = document.createElement("ul");
    ul.className = "legend";
    labels.forEach((label, i) => {
      const li = document.createElement("li");
      const sw = document.createElement("span");
      sw.className = "swatch";
      sw.style.background = PALETTE[i % PALETTE.length];
      li.append(sw, document.createTextNode(label));
      ul.append(li);
    });
    return ul;
  }

  /** A symmetric matrix in [-1, 1] (cosine similarity), diverging colours, values printed in the cells. */
  function heatmap(title, labels, matrix, opts = {}) {
    const n = labels.length;
    if (!n) return missing(title, "No data points.");
    const cell = Math.max(28, Math.min(64, 320 / n));
    const left = 120, top = 10;
    const W = left + n * cell + 10, H = top + n * cell + 90;
    const fig = figure(title, opts.note);
    const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title, class: "chart-svg heatmap" });
    svg.style.maxWidth = `${W * 1.2}px`; // a 2×2 matrix should not blow up to the column width
    const short = (s) => (s.length > 16 ? "…" + s.slice(-15) : s);
    for (let i = 0; i < n; i++) {
      svg.append(el("text", { x: left - 6, y: top + i * cell + cell / 2 + 4, "text-anchor": "end", class: "tick" }, short(labels[i])));
      const bx = left + i * cell + cell / 2, by = top + n * cell + 8;
      svg.append(el("text", { x: bx, y: by, transform: `rotate(40 ${bx} ${by})`, class: "tick" }, short(labels[i])));
      for (let j = 0; j < n; j++) {
        const raw = matrix[i]?.[j];
        const v = raw === null || raw === undefined ? NaN : Number(raw); // null: a zero task vector, no cosine
        const rect = el("rect", { x: left + j * cell, y: top + i * cell, width: cell - 1, height: cell - 1, fill: diverging(v) });
        rect.append(el("title", {}, `${labels[i]} × ${labels[j]}: ${fmt(v)}`));
        svg.append(rect);
        svg.append(el("text", { x: left + j * cell + cell / 2, y: top + i * cell + cell / 2 + 4, "text-anchor": "middle", class: Math.abs(v) > 0.6 ? "cell light" : "cell" }, fmt(v)));
      }
    }
    fig.append(svg);
    return fig;
  }

  function diverging(v) {
    if (!Number.isFinite(v)) return "#ccc";
    const t = Math.max(-1, Math.min(1, v));
    // white at 0, blue for +1, red for -1
    const [r, g, b] = t >= 0 ? [255 - 200 * t, 255 - 150 * t, 255 - 40 * t] : [255 + 40 * t, 255 + 200 * t, 255 + 200 * t];
    return `rgb(${r | 0},${g | 0},${b | 0})`;
  }

  return { line, heatmap, missing, fmt };
})();
