// #/experiments: the caller's experiments. #/experiments/<id>: one experiment's report: per row
// n, mean ± std and its 95% confidence interval (drawn: a range bar per row in the table and a
// Chart.js chart of every row's interval with its mean and the paper's figure), the comparison
// with the baseline paired by seed, per-row progress, the runs left out, and its jobs.
// Re-read every few seconds until every job has finished.

import { getJSON, postJSON, query } from "../api.js";
import { destroyAll } from "../charts.js";
import {
  FINAL, clear, confirmButton, duration, every, errorBox, h, number, percent, progressBar, shortId,
  statusBadge, when,
} from "../dom.js";

const REFRESH_MS = 5000;

function progressCell(progress) {
  return h("div", { class: "progress-cell" },
    progressBar(progress.epoch_fraction, progress.finished === progress.total),
    h("small", {}, `${progress.finished}/${progress.total} jobs finished` +
      (progress.eta_seconds ? ` · ETA ${duration(progress.eta_seconds)}` : "")));
}

export async function renderList(container) {
  const tbody = h("tbody");
  let nextCursor = null;
  let items = [];

  const rowOf = (item) => h("tr", { dataset: { experimentId: item.id } },
    h("td", {}, h("a", { href: `#/experiments/${item.id}` }, item.name ?? shortId(item.id))),
    h("td", { class: "mono" }, shortId(item.id)),
    h("td", {}, item.preset ?? "—"),
    h("td", {}, item.owner ?? "—"),
    h("td", { class: "num" }, item.job_count),
    h("td", {}, Object.entries(item.counts).filter(([, n]) => n).map(([status, n]) => `${n} ${status}`).join(", ")),
    h("td", {}, progressCell(item.progress)),
    h("td", {}, when(item.created_at)));

  const footer = h("div");
  function draw() {
    clear(tbody, items.length ? items.map(rowOf) : h("tr", {}, h("td", { colspan: 8, class: "muted" }, "No experiments yet (POST /v1/experiments).")));
    clear(footer, nextCursor ? h("button", { onclick: more }, "Load older") : null);
  }
  async function more() {
    const page = await getJSON(`/v1/experiments${query({ limit: 50, cursor: nextCursor })}`);
    items = [...items, ...page.items];
    nextCursor = page.next_cursor;
    draw();
  }
  async function refresh() {
    const page = await getJSON(`/v1/experiments${query({ limit: Math.min(100, Math.max(50, items.length)) })}`);
    items = page.items;
    nextCursor = page.next_cursor;
    draw();
  }
  await refresh();
  clear(container, h("div", { class: "title-row" }, h("h1", {}, "Experiments")),
    h("section", { class: "card" }, h("table", { id: "experiments-table" },
      h("thead", {}, h("tr", {}, h("th", {}, "Name"), h("th", {}, "Id"), h("th", {}, "Preset"), h("th", {}, "Owner"),
        h("th", { class: "num" }, "Jobs"), h("th", {}, "States"), h("th", {}, "Progress"), h("th", {}, "Created"))),
      tbody), footer));
  return every(REFRESH_MS, refresh);
}

/** Finished / total jobs and epochs per row label, from the experiment's job list. */
export function rowProgress(jobs) {
  const rows = new Map();
  for (const job of jobs) {
    const row = rows.get(job.row_label) ?? { finished: 0, total: 0, epochs: 0, epochsTotal: 0 };
    row.total += 1;
    row.epochsTotal += job.epochs;
    row.epochs += FINAL.has(job.status) ? job.epochs : job.epoch;
    if (FINAL.has(job.status)) row.finished += 1;
    rows.set(job.row_label, row);
  }
  return rows;
}

/** A small range bar: the row's CI on a shared scale [low, high], the mean and the paper's figure. */
function ciBar(row, scale) {
  if (!row.ci95 && row.mean === null) return h("span", { class: "muted" }, "—");
  const share = (value) => Math.max(0, Math.min(100, ((value - scale.low) / (scale.high - scale.low)) * 100));
  const at = (value) => `${share(value)}%`;
  const bar = h("div", { class: "ci-bar", title: row.ci95 ? `95% CI ${row.ci95[0].toFixed(2)} – ${row.ci95[1].toFixed(2)}` : "" });
  if (row.ci95) bar.append(h("span", { class: "range", style: { left: at(row.ci95[0]), width: `${share(row.ci95[1]) - share(row.ci95[0])}%` } }));
  if (row.mean !== null) bar.append(h("span", { class: "mean", style: { left: at(row.mean) } }));
  if (row.paper !== null && row.paper !== undefined) bar.append(h("span", { class: "paper", style: { left: at(row.paper) } }));
  return bar;
}

function scaleOf(rows) {
  const values = rows.flatMap((row) => [...(row.ci95 ?? []), row.mean, row.paper]).filter((v) => typeof v === "number");
  if (!values.length) return { low: 0, high: 100 };
  let low = Math.min(...values);
  let high = Math.max(...values);
  const pad = Math.max(0.5, (high - low) * 0.08);
  // Accuracies are percentages: a t-interval over two or three seeds can reach past 0 or 100,
  // which says nothing more than the edge of the scale does.
  low = Math.max(0, low - pad);
  high = Math.min(100, high + pad);
  return { low, high };
}

function comparison(vs) {
  if (!vs) return "—";
  const ci = vs.ci95 ? ` [${vs.ci95[0].toFixed(2)}, ${vs.ci95[1].toFixed(2)}]` : "";
  const p = [vs.p_t !== null ? `t p=${number(vs.p_t, 2)}` : null, vs.p_wilcoxon !== null ? `W p=${number(vs.p_wilcoxon, 2)}` : null]
    .filter(Boolean).join(", ");
  const diff = vs.diff === null ? "—" : `${vs.diff >= 0 ? "+" : ""}${vs.diff.toFixed(2)}`;
  return `${diff}${ci} ${p} (${vs.wins}/${vs.ties}/${vs.losses} of ${vs.pairs})`;
}

function points(rows, valueOf) {
  return rows
    .filter((row) => typeof valueOf(row) === "number")
    .map((row) => ({ x: valueOf(row), y: row.label }));
}

function ciChart(canvas, rows, scale) {
  const labels = rows.map((row) => row.label);
  return new window.Chart(canvas, {
    type: "bar",
    data: {
      labels,
      datasets: [
        // `order`: Chart.js draws the lowest order last, so the markers sit on top of the CI bar
        // that contains them (in dataset order the bar was drawn over the mean and hid it).
        { type: "bar", label: "95% CI of the mean", data: rows.map((row) => row.ci95 ?? null), backgroundColor: "#93c5fd", barPercentage: 0.5, order: 2 },
        // Points as {x, y: row label}: a line dataset in a horizontal chart needs its own
        // indexAxis, and objects, to be placed on the rows.
        { type: "line", indexAxis: "y", label: "mean", data: points(rows, (row) => row.mean), showLine: false, pointRadius: 7, pointStyle: "rectRot", borderColor: "#ffffff", borderWidth: 1.5, backgroundColor: "#1e3a8a", order: 1 },
        { type: "line", indexAxis: "y", label: "paper", data: points(rows, (row) => row.paper), showLine: false, pointRadius: 8, pointStyle: "crossRot", borderColor: "#dc2626", borderWidth: 3, order: 0 },
      ],
    },
    options: {
      indexAxis: "y",
      scales: { x: { min: scale.low, max: scale.high, title: { display: true, text: "final test accuracy (%)" } } },
      // reverse: the legend follows `order`; read it in dataset order (CI, mean, paper).
      plugins: { legend: { position: "bottom", reverse: true } },
    },
  });
}

export async function renderOne(container, { params: [experimentId] }) {
  const charts = [];
  const head = h("div");
  const tableCard = h("section", { class: "card", id: "report" });
  const chartCanvas = h("canvas");
  const chartCard = h("section", { class: "card chart-card", id: "ci-chart" },
    h("h3", {}, "Final test accuracy per row: 95% CI, mean, and the paper's figure"),
    h("div", { class: "chart", style: { height: "320px" } }, chartCanvas));
  const excludedCard = h("section", { class: "card" });
  const jobsCard = h("details", { class: "card" });
  const message = h("div");
  let experiment = null;
  let report = null;

  async function load() {
    [experiment, report] = await Promise.all([
      getJSON(`/v1/experiments/${experimentId}`),
      getJSON(`/v1/experiments/${experimentId}/report`),
    ]);
  }

  function draw() {
    const finished = experiment.progress.finished === experiment.progress.total;
    const cancel = !finished && !experiment.cancel_requested
      ? confirmButton("Cancel all", async () => {
        try {
          experiment = await postJSON(`/v1/experiments/${experimentId}/cancel`);
          draw();
        } catch (error) {
          clear(message, errorBox(error));
        }
      })
      : null;
    clear(head,
      h("div", { class: "title-row" },
        h("h1", {}, `Experiment ${experiment.name ?? shortId(experiment.id)}`),
        h("span", { class: "muted mono" }, experiment.id),
        h("span", { class: "actions" }, cancel)),
      h("section", { class: "card" }, h("div", { class: "row" },
        h("div", { class: "grow" }, progressCell(experiment.progress)),
        h("div", { class: "grow" },
          h("div", {}, `${report.dataset} · ${report.architecture} · metric ${report.metric} (${report.unit})`),
          h("div", { class: "muted" }, `baseline: ${report.baseline ?? "none"} · seeds ${experiment.seeds.join(", ")} · ${Object.entries(experiment.counts).filter(([, n]) => n).map(([s, n]) => `${n} ${s}`).join(", ")}`)))),
      message);

    const progress = rowProgress(experiment.jobs);
    const jobsOf = (label) => experiment.jobs.filter((job) => job.row_label === label).map((job) => job.id);
    const scale = scaleOf(report.rows);
    clear(tableCard, h("h2", {}, "Report"), h("table", { id: "report-table" },
      h("thead", {}, h("tr", {},
        h("th", {}, "Row"), h("th", {}, "Progress"), h("th", { class: "num" }, "n"), h("th", { class: "num" }, "Mean ± std"),
        h("th", { class: "num" }, "95% CI"), h("th", {}, "CI (blue), mean, paper (red)"), h("th", { class: "num" }, "Paper"),
        h("th", {}, `vs ${report.baseline ?? "baseline"}: diff [bootstrap CI], p, wins/ties/losses`),
        h("th", {}, "Realised rate per slot"), h("th", {}, ""))),
      h("tbody", {}, report.rows.map((row) => {
        const rowState = progress.get(row.label) ?? { finished: 0, total: 0, epochs: 0, epochsTotal: 0 };
        const ids = jobsOf(row.label).slice(0, 10);
        return h("tr", { dataset: { row: row.label } },
          h("td", {}, h("strong", {}, row.label), h("div", { class: "muted mono" }, Object.entries(row.params).map(([k, v]) => `${k}=${v}`).join(" "))),
          h("td", {}, h("div", { class: "progress-cell" },
            progressBar(rowState.epochsTotal ? rowState.epochs / rowState.epochsTotal : 0, rowState.finished === rowState.total),
            h("small", {}, `${rowState.finished}/${rowState.total} runs`))),
          h("td", { class: "num" }, row.n),
          h("td", { class: "num" }, row.mean === null ? "—" : `${row.mean.toFixed(2)}${row.std !== null ? ` ± ${row.std.toFixed(2)}` : ""}`),
          h("td", { class: "num" }, row.ci95 ? `[${row.ci95[0].toFixed(2)}, ${row.ci95[1].toFixed(2)}]` : "—"),
          h("td", {}, ciBar(row, scale)),
          h("td", { class: "num" }, row.paper === null || row.paper === undefined ? "—" : row.paper.toFixed(2)),
          h("td", { class: "mono" }, row.label === report.baseline ? "baseline" : comparison(row.vs_baseline)),
          h("td", { class: "mono" }, row.layers.map((layer) => `${layer.name}: ${layer.rate === null || layer.rate === undefined ? "—" : number(layer.rate, 3)}`).join("  ")),
          h("td", {}, ids.length ? h("a", { href: `#/compare?ids=${ids.join(",")}` }, "curves") : null));
      }))),
      h("p", { class: "muted" }, `Accuracies in ${report.unit}; CI: the t-interval of the mean over the row's succeeded runs.`));

    destroyAll(charts);
    charts.push(ciChart(chartCanvas, report.rows, scale));

    clear(excludedCard, h("h2", {}, "Left out of the statistics"), report.excluded.length
      ? h("ul", {}, report.excluded.map((run) => h("li", {}, `${run.label}, seed ${run.seed}: ${run.status} `,
        run.job_id ? h("a", { href: `#/jobs/${run.job_id}` }, shortId(run.job_id)) : null)))
      : h("p", { class: "muted" }, "None: every planned run succeeded."));
    clear(jobsCard, h("summary", {}, `Jobs (${experiment.jobs.length})`), h("table", {}, h("tbody", {},
      experiment.jobs.map((job) => h("tr", {},
        h("td", {}, h("a", { class: "mono", href: `#/jobs/${job.id}` }, shortId(job.id))),
        h("td", {}, job.row_label), h("td", {}, `seed ${job.seed}`), h("td", {}, statusBadge(job)),
        h("td", { class: "num" }, `${job.epoch}/${job.epochs}`),
        h("td", { class: "num" }, percent(job.final_accuracy)))))));
  }

  await load();
  clear(container, head, tableCard, chartCard, excludedCard, jobsCard);
  draw();
  const stop = every(REFRESH_MS, async () => {
    if (experiment.progress.finished === experiment.progress.total) return;
    await load();
    draw();
  });
  return () => {
    stop();
    destroyAll(charts);
  };
}
