// Charts: Chart.js (the pinned copy in /static/vendor, loaded by index.html as `window.Chart`)
// set up once for this dashboard, and the per-epoch series the job and compare pages draw.
//
// Speed: animation is off and points are not parsed (the series are built here as {x, y}
// already sorted by epoch), so a 200-epoch job with 10 dropout slots (about 9,000 points over
// six charts) draws in tens of milliseconds; live updates are coalesced into one redraw per
// animation frame.

const Chart = window.Chart;

Chart.defaults.animation = false;
Chart.defaults.responsive = true;
Chart.defaults.maintainAspectRatio = false;
Chart.defaults.font.family = "system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif";
Chart.defaults.plugins.legend.labels.boxWidth = 14;

// Tableau 10: distinguishable, and the same slot keeps its colour on every chart.
export const PALETTE = [
  "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
  "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac",
];

export function color(index) {
  return PALETTE[index % PALETTE.length];
}

/** Line style by method, Figure 4's way: dropout dashed, jumpout solid, none dotted. */
export function dashFor(method) {
  return { dropout: [6, 4], none: [2, 3] }[method] ?? [];
}

/**
 * A line chart over epochs in `canvas`.
 * options: yTitle, yMin, yMax, percent (ticks as %), legend (default true).
 */
export function lineChart(canvas, { yTitle, yMin, yMax, percent = false, legend = true } = {}) {
  return new Chart(canvas, {
    type: "line",
    data: { datasets: [] },
    options: {
      parsing: false,
      normalized: true,
      spanGaps: true,
      interaction: { mode: "nearest", axis: "x", intersect: false },
      elements: { line: { borderWidth: 1.8, tension: 0 }, point: { radius: 0, hitRadius: 6 } },
      scales: {
        x: { type: "linear", title: { display: true, text: "epoch" }, ticks: { precision: 0 } },
        y: {
          min: yMin,
          max: yMax,
          title: { display: Boolean(yTitle), text: yTitle },
          ticks: percent ? { callback: (value) => `${Math.round(value * 1000) / 10}%` } : {},
        },
      },
      plugins: {
        legend: { display: legend, position: "bottom" },
        tooltip: {
          callbacks: percent
            ? { label: (item) => `${item.dataset.label}: ${(item.parsed.y * 100).toFixed(2)}%` }
            : {},
        },
      },
    },
  });
}

/** A series: one {x: epoch, y: value} per metric row where `valueOf(row)` is a number. */
export function series(rows, valueOf) {
  const points = [];
  for (const row of rows) {
    const y = valueOf(row);
    if (typeof y === "number" && Number.isFinite(y)) points.push({ x: row.epoch, y });
  }
  return points;
}

export function dataset(label, data, index, extra = {}) {
  const lineColor = color(index);
  // A handful of epochs would be invisible as a line without points.
  const radius = data.length <= 30 ? 2.5 : 0;
  return { label, data, borderColor: lineColor, backgroundColor: lineColor, pointRadius: radius, ...extra };
}

/** Replace a chart's datasets and redraw at the next frame (many calls, one redraw). */
export function setDatasets(chart, datasets) {
  chart.data.datasets = datasets;
  scheduleUpdate(chart);
}

const pending = new Set();

export function scheduleUpdate(chart) {
  if (pending.size === 0) {
    requestAnimationFrame(() => {
      for (const item of pending) {
        if (item.canvas) item.update("none");
      }
      pending.clear();
    });
  }
  pending.add(chart);
}

/** A card holding one chart: returns {card, canvas}. */
export function chartCard(h, title, subtitle) {
  const canvas = h("canvas");
  const card = h("section", { class: "card chart-card" },
    h("h3", {}, title),
    subtitle ? h("p", { class: "sub" }, subtitle) : null,
    h("div", { class: "chart" }, canvas));
  return { card, canvas };
}

export function destroyAll(charts) {
  for (const chart of charts) {
    pending.delete(chart);
    chart.destroy();
  }
  charts.length = 0;
}
