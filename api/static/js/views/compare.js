// #/compare?ids=a,b,...: the curves of selected jobs overlaid, Figure 4's way (dropout dashed,
// jumpout solid, no dropout dotted; one colour per job): test accuracy, test loss and train
// loss per epoch. Jobs still training are re-read every few seconds. At most MAX_JOBS jobs, as
// a chart with more lines cannot be read anyway.

import { getJSON, query } from "../api.js";
import { chartCard, dashFor, dataset, destroyAll, lineChart, setDatasets } from "../charts.js";
import { FINAL, accuracyCell, clear, errorBox, every, h, shortId, statusBadge, when } from "../dom.js";

const MAX_JOBS = 10;
const REFRESH_MS = 4000;
const PANELS = [
  { key: "test_accuracy", title: "Test accuracy", percent: true },
  { key: "test_loss", title: "Test loss", percent: false },
  { key: "train_loss", title: "Train loss", percent: false },
  { key: "train_accuracy", title: "Train accuracy", percent: true },
];

function labelOf(job) {
  const parts = [job.method];
  if (job.row_label && job.row_label !== job.method) parts.push(job.row_label);
  if (job.spec?.seed !== undefined) parts.push(`seed ${job.spec.seed}`);
  parts.push(shortId(job.id));
  return parts.join(" · ");
}

export async function render(container, { query: hashQuery }) {
  const ids = [...new Set((hashQuery.get("ids") ?? "").split(",").filter((id) => /^[0-9a-f]{32}$/.test(id)))]
    .slice(0, MAX_JOBS);
  const charts = [];
  const entries = new Map();  // id -> {job, metrics, error}

  const table = h("tbody");
  const pickerList = h("div", { class: "picker" });
  const pickerStatus = h("div");
  const grid = h("div", { class: "charts" });
  const panels = PANELS.map((panel) => {
    const { card, canvas } = chartCard(h, panel.title, null);
    card.id = `compare-${panel.key}`;
    grid.append(card);
    const chart = lineChart(canvas, { percent: panel.percent });
    charts.push(chart);
    return { ...panel, chart };
  });

  function setIds(next) {
    location.hash = `#/compare${next.length ? `?ids=${next.join(",")}` : ""}`;
  }

  async function load(id) {
    try {
      const [job, metrics] = await Promise.all([
        getJSON(`/v1/jobs/${id}`), getJSON(`/v1/jobs/${id}/metrics`)]);
      entries.set(id, { job, metrics: metrics.items, error: null });
    } catch (error) {
      if (error.status === 401) throw error;
      entries.set(id, { job: null, metrics: [], error });
    }
  }

  function draw() {
    const shown = ids.map((id) => [id, entries.get(id)]).filter(([, entry]) => entry?.job);
    for (const panel of panels) {
      setDatasets(panel.chart, shown.map(([id, { job, metrics }], index) => {
        const data = metrics
          .filter((row) => typeof row[panel.key] === "number")
          .map((row) => ({ x: row.epoch, y: row[panel.key] }));
        return dataset(labelOf(job), data, index, { borderDash: dashFor(job.method), jobId: id });
      }));
    }
    clear(table, ids.map((id) => {
      const entry = entries.get(id);
      const remove = h("button", { class: "small", onclick: () => setIds(ids.filter((other) => other !== id)) }, "Remove");
      if (!entry?.job) {
        return h("tr", {}, h("td", {}, ""), h("td", { class: "mono" }, shortId(id)),
          h("td", { colspan: 5 }, entry?.error ? errorBox(entry.error) : "…"), h("td", {}, remove));
      }
      const { job, metrics } = entry;
      return h("tr", { dataset: { jobId: id } },
        h("td", {}, h("span", { class: "swatch", style: { color: panels[0].chart.data.datasets.find((d) => d.jobId === id)?.borderColor } }, "■")),
        h("td", {}, h("a", { class: "mono", href: `#/jobs/${id}` }, shortId(id))),
        h("td", {}, statusBadge(job)),
        h("td", {}, labelOf(job)),
        h("td", {}, `${job.dataset} · ${job.architecture}`),
        h("td", { class: "num" }, `${metrics.length}/${job.progress?.epochs ?? "?"}`),
        h("td", { class: "num" }, accuracyCell(job)),
        h("td", {}, remove));
    }));
  }

  async function refresh() {
    const running = ids.filter((id) => {
      const entry = entries.get(id);
      return !entry || (entry.job && !FINAL.has(entry.job.status));
    });
    if (!running.length) return;
    await Promise.all(running.map(load));
    draw();
  }

  async function loadPicker() {
    try {
      const page = await getJSON(`/v1/jobs${query({ limit: 50 })}`);
      clear(pickerList, h("table", { id: "compare-picker" }, h("tbody", {}, page.items.map((job) =>
        h("tr", {},
          h("td", {}, h("input", {
            type: "checkbox",
            value: job.id,
            checked: ids.includes(job.id),
            disabled: !ids.includes(job.id) && ids.length >= MAX_JOBS,
            onchange: (event) => setIds(event.target.checked
              ? [...ids, job.id]
              : ids.filter((id) => id !== job.id)),
          })),
          h("td", { class: "mono" }, shortId(job.id)),
          h("td", {}, statusBadge(job)),
          h("td", {}, labelOf(job)),
          h("td", {}, `${job.dataset} · ${job.architecture}`),
          h("td", { class: "num" }, accuracyCell(job)),
          h("td", {}, when(job.created_at)))))));
    } catch (error) {
      if (error.status === 401) throw error;
      clear(pickerStatus, errorBox(error));
    }
  }

  await Promise.all([...ids.map(load), loadPicker()]);
  clear(container,
    h("div", { class: "title-row" }, h("h1", {}, "Compare"),
      h("span", { class: "muted" }, `${ids.length} of at most ${MAX_JOBS} jobs; dropout dashed, jumpout solid, no dropout dotted`)),
    ids.length
      ? h("section", { class: "card" }, h("table", { id: "compare-table" },
        h("thead", {}, h("tr", {}, h("th", {}, ""), h("th", {}, "Job"), h("th", {}, "Status"), h("th", {}, "Label"),
          h("th", {}, "Data · model"), h("th", { class: "num" }, "Epochs"), h("th", { class: "num" }, "Accuracy"), h("th", {}, ""))),
        table))
      : h("p", { class: "notice" }, "Pick jobs below (or tick them in the job list) to overlay their curves."),
    grid,
    h("details", { class: "card", open: ids.length === 0 }, h("summary", {}, "Add jobs (the 50 newest)"), pickerStatus, pickerList));
  draw();
  const stop = every(REFRESH_MS, refresh);
  return () => {
    stop();
    destroyAll(charts);
  };
}
