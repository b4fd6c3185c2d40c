// #/jobs/<id>: one job, live. Its status, progress and ETA, result and failure reason; the
// learning curves (the paper's Figure 4: train/test/validation loss and accuracy per epoch);
// per dropout slot the active fraction and realised rate (Figure 1) and the mean/variance
// drift (Figure 3) once stored; checkpoints with download; the spec and the environment
// record; the trainer's log, followed.
//
// Live: the job's event stream (GET /v1/jobs/{id}/events, read by api.openEventStream): a
// snapshot, then status / epoch / progress events, then end. Only a server without that route
// makes the page poll instead.

import { download, followLog, getJSON, openEventStream, postJSON } from "../api.js";
import { chartCard, dataset, destroyAll, lineChart, series, setDatasets } from "../charts.js";
import {
  FINAL, bytes, clear, confirmButton, duration, errorBox, every, h, keyValueTable, number,
  percent, progressBar, shortId, statusBadge, when,
} from "../dom.js";

const POLL_MS = 2000;
const LOG_LIMIT = 400_000;  // characters kept on the page; older output is dropped from the top

const CURVES = [
  { key: "loss", title: "Loss", sub: "per epoch: train, test (and validation with a split)", percent: false },
  { key: "accuracy", title: "Accuracy", sub: "per epoch (the paper's Figure 4)", percent: true },
];
const SLOT_CHARTS = [
  { key: "active_fraction", title: "Active fraction per dropout slot", sub: "mean fraction of positive inputs over the epoch's steps (Figure 1)" },
  { key: "rate", title: "Realised dropout rate per slot", sub: "mean p′ over the epoch's steps (Figure 1)" },
  { key: "mean_drift", title: "Mean drift per slot", sub: "train-mode / eval-mode mean of the slot's output on a fixed batch (Figure 3)" },
  { key: "var_drift", title: "Variance drift per slot", sub: "train-mode / eval-mode variance of the slot's output (Figure 3)" },
];

/** Metric rows sorted by epoch, one per epoch (a resumed run's repeated epoch replaces it). */
export class MetricStore {
  constructor() {
    this.byEpoch = new Map();
    this.rows = [];
  }

  replace(rows) {
    this.byEpoch = new Map(rows.map((row) => [row.epoch, row]));
    this.sort();
  }

  add(row) {
    const last = this.rows[this.rows.length - 1];
    this.byEpoch.set(row.epoch, row);
    if (!last || row.epoch > last.epoch) this.rows.push(row);
    else this.sort();
  }

  sort() {
    this.rows = [...this.byEpoch.values()].sort((a, b) => a.epoch - b.epoch);
  }

  /** Slot names in the order they first appear. */
  slots() {
    const names = [];
    const seen = new Set();
    for (const row of this.rows) {
      for (const layer of row.layers ?? []) {
        if (!seen.has(layer.name)) {
          seen.add(layer.name);
          names.push(layer.name);
        }
      }
    }
    return names;
  }
}

function curveDatasets(rows, key) {
  const parts = key === "loss"
    ? [["train", "train_loss"], ["test", "test_loss"], ["validation", "val_loss"]]
    : [["train", "train_accuracy"], ["test", "test_accuracy"], ["validation", "val_accuracy"]];
  return parts
    .map(([label, field], index) => dataset(label, series(rows, (row) => row[field]), index))
    .filter((item) => item.data.length);
}

function slotDatasets(store, field) {
  const names = store.slots();
  const index = new Map(names.map((name, i) => [name, i]));
  const points = names.map(() => []);
  for (const row of store.rows) {
    for (const layer of row.layers ?? []) {
      const y = layer[field];
      if (typeof y === "number" && Number.isFinite(y)) points[index.get(layer.name)].push({ x: row.epoch, y });
    }
  }
  return names.map((name, i) => dataset(name, points[i], i)).filter((item) => item.data.length);
}

export async function render(container, { params: [jobId] }) {
  const store = new MetricStore();
  const charts = [];
  const closers = [];
  let job = null;
  let live = null;  // the newest `progress` event: {epoch, step, steps, loss, fraction, eta_seconds}
  let painted = false;

  // --- the page's parts (filled by the draw functions below) ---
  const header = h("div", { class: "title-row" });
  const summary = h("section", { class: "card", id: "job-summary" });
  const failure = h("div");
  const liveState = h("span", { class: "live", id: "live-state" }, "connecting");
  const curveCharts = new Map();
  const slotCharts = new Map();
  const slotCards = new Map();
  const chartGrid = h("div", { class: "charts" });
  for (const curve of CURVES) {
    const { card, canvas } = chartCard(h, curve.title, curve.sub);
    card.id = `chart-${curve.key}`;
    chartGrid.append(card);
    const chart = lineChart(canvas, { percent: curve.percent, yMin: curve.percent ? undefined : 0 });
    curveCharts.set(curve.key, chart);
    charts.push(chart);
  }
  for (const slot of SLOT_CHARTS) {
    const { card, canvas } = chartCard(h, slot.title, slot.sub);
    card.id = `chart-${slot.key}`;
    card.hidden = true;  // shown once a value is stored
    chartGrid.append(card);
    const chart = lineChart(canvas, {});
    slotCharts.set(slot.key, chart);
    slotCards.set(slot.key, card);
    charts.push(chart);
  }
  const checkpointsBody = h("tbody");
  const checkpointsMessage = h("div");
  const specCard = h("section", { class: "card grow" });
  const environmentCard = h("section", { class: "card grow" });
  const logText = h("pre", { class: "log", id: "job-log" });
  const logState = h("span", { class: "muted" }, "");

  clear(container, header, summary, failure,
    h("div", { class: "title-row" }, h("h2", {}, "Curves"), liveState),
    chartGrid,
    h("section", { class: "card", id: "checkpoints" }, h("h2", {}, "Checkpoints"), checkpointsMessage,
      h("table", {}, h("thead", {}, h("tr", {}, h("th", { class: "num" }, "Epoch"), h("th", {}, "Best"),
        h("th", { class: "num" }, "Size"), h("th", {}, "SHA-256"), h("th", {}, "Written"), h("th", {}, ""))),
      checkpointsBody)),
    h("div", { class: "row" }, specCard, environmentCard),
    h("section", { class: "card" }, h("div", { class: "title-row" }, h("h2", {}, "Log"), logState), logText));

  // --- drawing ---
  function drawHeader() {
    const final = FINAL.has(job.status);
    const cancel = !final && !job.cancel_requested
      ? confirmButton("Cancel", async () => {
        try {
          job = await postJSON(`/v1/jobs/${jobId}/cancel`);
          drawJob();
        } catch (error) {
          clear(failure, errorBox(error));
        }
      }, { id: "cancel-job" })
      : null;
    clear(header,
      h("h1", {}, `Job ${shortId(jobId)}`),
      statusBadge(job),
      h("span", { class: "muted mono" }, jobId),
      h("span", { class: "actions" },
        h("a", { class: "button", href: `#/compare?ids=${jobId}` }, "Compare…"),
        cancel));
  }

  function drawSummary() {
    const progress = job.progress ?? {};
    const result = job.result ?? {};
    const final = FINAL.has(job.status);
    let fraction = progress.fraction;
    let detail = `${progress.epoch}/${progress.epochs} epochs`;
    let eta = progress.eta_seconds;
    if (!final && live && live.epoch >= (progress.epoch ?? 0)) {
      fraction = live.fraction ?? fraction;
      eta = live.eta_seconds ?? eta;
      detail = `epoch ${live.epoch}/${progress.epochs}, step ${live.step}/${live.steps}` +
        (live.loss !== null && live.loss !== undefined ? `, loss ${number(live.loss)}` : "");
    }
    const accuracy = result.final_accuracy !== null && result.final_accuracy !== undefined
      ? ["final test accuracy", percent(result.final_accuracy)]
      : ["latest test accuracy", percent(result.latest_accuracy ?? lastTestAccuracy())];
    const facts = [
      ["method", job.method], ["data · model", `${job.dataset} · ${job.architecture}`],
      ["owner", job.owner ?? "—"], ["attempt", `${job.attempt} of ${job.max_attempts}`],
      ["priority", job.priority], ["device", job.device ?? "—"], ["worker", job.worker ?? "—"],
      ["created", when(job.created_at)], ["started", when(job.started_at)], ["finished", when(job.finished_at)],
    ];
    if (job.experiment_id) {
      facts.push(["experiment", h("a", { href: `#/experiments/${job.experiment_id}` },
        `${shortId(job.experiment_id)}${job.row_label ? ` · ${job.row_label}` : ""}`)]);
    }
    clear(summary,
      h("div", { class: "row" },
        h("div", { class: "grow" },
          h("div", { class: "progress-cell" }, progressBar(fraction, job.status === "succeeded"),
            h("small", { id: "job-progress" }, `${detail}${!final && eta !== null && eta !== undefined ? ` · ETA ${duration(eta)}` : ""}`)),
          h("p", {}, h("strong", {}, `${accuracy[0]}: `), h("span", { id: "job-accuracy" }, accuracy[1]),
            result.best_epoch !== null && result.best_epoch !== undefined
              ? h("span", { class: "muted" }, ` · best validation ${percent(result.best_val_accuracy)} at epoch ${result.best_epoch} (test there ${percent(result.test_accuracy_at_best)})`)
              : null),
          job.queue ? h("p", { class: "notice" }, `Queued: position ${job.queue.position} (${job.queue.ahead} ahead). ${job.queue.reason}`) : null),
        h("div", { class: "grow" }, keyValueTable(Object.fromEntries(facts)))));
    clear(failure, job.error ? h("section", { class: "card" }, h("h2", {}, "Failure"), h("div", { class: "error-box", id: "job-error" }, job.error)) : null);
  }

  function lastTestAccuracy() {
    const last = store.rows[store.rows.length - 1];
    return last ? last.test_accuracy : null;
  }

  function drawSpec() {
    clear(specCard, h("h2", {}, "Spec"), keyValueTable(job.spec));
    clear(environmentCard, h("h2", {}, "Reproducibility"),
      job.environment ? keyValueTable(job.environment) : h("p", { class: "muted" }, "Recorded when the trainer starts."));
  }

  function drawJob() {
    drawHeader();
    drawSummary();
  }

  function drawCharts() {
    for (const curve of CURVES) setDatasets(curveCharts.get(curve.key), curveDatasets(store.rows, curve.key));
    for (const slot of SLOT_CHARTS) {
      const datasets = slotDatasets(store, slot.key);
      slotCards.get(slot.key).hidden = datasets.length === 0;
      setDatasets(slotCharts.get(slot.key), datasets);
    }
    container.dataset.epochs = String(store.rows.length);
    if (!painted) {
      painted = true;
      // For the browser test and benchmark: when the first full drawing is on screen.
      requestAnimationFrame(() => {
        performance.mark("jumpout:job-painted");
        container.dataset.painted = String(performance.now());
      });
    }
  }

  async function loadCheckpoints() {
    try {
      const page = await getJSON(`/v1/jobs/${jobId}/checkpoints`);
      clear(checkpointsMessage, page.items.length ? null : h("p", { class: "muted" }, "None yet."));
      clear(checkpointsBody, page.items.map((item) => h("tr", {},
        h("td", { class: "num" }, item.epoch),
        h("td", {}, item.is_best ? "best" : ""),
        h("td", { class: "num" }, bytes(item.size_bytes)),
        h("td", { class: "mono", title: item.sha256 }, item.sha256.slice(0, 16) + "…"),
        h("td", {}, when(item.created_at)),
        h("td", {}, h("button", {
          class: "small download",
          onclick: async (event) => {
            event.target.disabled = true;
            try {
              await download(`/v1/jobs/${jobId}/checkpoints/${item.id}/file`, `${jobId}-epoch${item.epoch}.pt`);
            } catch (error) {
              clear(checkpointsMessage, errorBox(error));
            } finally {
              event.target.disabled = false;
            }
          },
        }, "Download")))));
    } catch (error) {
      clear(checkpointsMessage, errorBox(error));
    }
  }

  // Checkpoints change with epochs: reload at most every few seconds while training.
  let checkpointsTimer = null;
  function checkpointsSoon() {
    if (checkpointsTimer) return;
    checkpointsTimer = setTimeout(() => {
      checkpointsTimer = null;
      loadCheckpoints();
    }, 2500);
  }
  closers.push(() => clearTimeout(checkpointsTimer));

  // --- live data ---
  function onEvent(type, data) {
    if (type === "snapshot") {
      job = data.job;
      store.replace(data.metrics ?? []);
      drawJob();
      drawSpec();
      drawCharts();
      loadCheckpoints();
    } else if (type === "epoch") {
      store.add(data);
      drawCharts();
      drawSummary();
      checkpointsSoon();
    } else if (type === "progress") {
      live = data;
      drawSummary();
    } else if (type === "status" || type === "end") {
      const hadEnvironment = Boolean(job?.environment);
      job = data;
      drawJob();
      if (!hadEnvironment && job.environment) drawSpec();
      if (type === "end") loadCheckpoints();
    }
  }

  function setLive(text, on) {
    liveState.textContent = text;
    liveState.classList.toggle("on", on);
  }

  // The first answer decides whether this page can paint at all (a 404 job shows an error).
  job = await getJSON(`/v1/jobs/${jobId}`);
  drawJob();
  drawSpec();

  let stream = null;
  const startPolling = () => {
    setLive("polling (this server has no event stream)", true);
    container.dataset.live = "polling";
    const poll = async () => {
      const [fresh, metrics] = await Promise.all([
        getJSON(`/v1/jobs/${jobId}`), getJSON(`/v1/jobs/${jobId}/metrics`)]);
      const grew = metrics.items.length !== store.rows.length;
      job = fresh;
      store.replace(metrics.items);
      drawJob();
      if (grew || !painted) {
        drawCharts();
        loadCheckpoints();
      }
      if (FINAL.has(job.status)) stopPolling();
    };
    const stopPolling = every(POLL_MS, poll);
    closers.push(stopPolling);
    return poll();
  };

  stream = openEventStream(`/v1/jobs/${jobId}/events`, {
    onEvent,
    onState: (state) => {
      if (state === "open") {
        container.dataset.live = "stream";
        setLive("live", true);
      } else if (state === "reconnecting") {
        setLive("reconnecting…", false);
      } else if (state === "closed" && container.dataset.live === "stream") {
        setLive(FINAL.has(job?.status) ? "finished" : "closed", false);
      }
    },
    onError: (error) => {
      if (error.routeMissing) startPolling();
      else setLive(error.message, false);
    },
  });
  closers.push(() => stream.close());

  // The log, followed.
  let logLength = 0;
  const log = followLog(jobId, {
    onText: (text) => {
      const atBottom = logText.scrollTop + logText.clientHeight >= logText.scrollHeight - 4;
      logText.append(text);
      logLength += text.length;
      if (logLength > LOG_LIMIT) {
        logText.textContent = logText.textContent.slice(-LOG_LIMIT / 2);
        logLength = logText.textContent.length;
      }
      if (atBottom) logText.scrollTop = logText.scrollHeight;
    },
    onComplete: () => { logState.textContent = "complete"; },
    onMissing: (error) => {
      logState.textContent = error.routeMissing ? "this server does not serve logs" : error.message;
    },
  });
  closers.push(() => log.close());

  return () => {
    for (const close of closers) close();
    destroyAll(charts);
  };
}
