// #/jobs: the job list, newest first, with filters (status, method, dataset, owner; kept in the
// hash so a filtered view can be bookmarked), progress and ETA, the headline accuracy, cancel,
// and a selection to compare. Refreshed every few seconds while the tab is visible.

import { getJSON, openapi, postJSON, query } from "../api.js";
import {
  FINAL, accuracyCell, clear, confirmButton, duration, every, errorBox, h, progressBar, shortId,
  statusBadge, when,
} from "../dom.js";

const STATUSES = ["queued", "running", "succeeded", "failed", "cancelled"];
const REFRESH_MS = 3000;
const PAGE = 50;

/** The choices of a JobCreate field in the schema (an enum, possibly inside anyOf). */
export function enumOf(schema, name) {
  const field = schema?.components?.schemas?.JobCreate?.properties?.[name];
  if (!field) return [];
  return field.enum ?? field.anyOf?.find((option) => option.enum)?.enum ?? [];
}

export async function render(container, { query: hashQuery }) {
  const filters = {
    status: hashQuery.getAll("status").filter((s) => STATUSES.includes(s)),
    method: hashQuery.get("method") ?? "",
    dataset: hashQuery.get("dataset") ?? "",
    owner: hashQuery.get("owner") ?? "",
  };
  let schema = null;
  try {
    schema = await openapi();
  } catch {
    // the filters fall back to free text
  }
  const selected = new Set();
  let items = [];
  let nextCursor = null;

  const tbody = h("tbody");
  const footer = h("div", { class: "row" });
  const message = h("div");
  const compareButton = h("button", {
    id: "compare-selected",
    disabled: true,
    onclick: () => { location.hash = `#/compare?ids=${[...selected].join(",")}`; },
  }, "Compare selected");

  function applyFilters() {
    const params = query(filters);
    const target = `#/jobs${params}`;
    if (location.hash !== target) location.hash = target;
  }

  const statusBoxes = STATUSES.map((status) => h("label", {},
    h("input", {
      type: "checkbox",
      name: "status",
      value: status,
      checked: filters.status.includes(status),
      onchange: (event) => {
        filters.status = event.target.checked
          ? [...filters.status, status]
          : filters.status.filter((s) => s !== status);
        applyFilters();
      },
    }), status));

  const choice = (name, choices) => h("label", {}, name,
    h("select", { name, onchange: (event) => { filters[name] = event.target.value; applyFilters(); } },
      h("option", { value: "" }, "any"),
      choices.map((value) => h("option", { value, selected: filters[name] === value }, value))));

  const ownerInput = h("input", {
    name: "owner", value: filters.owner, placeholder: "token name", size: 12,
    onchange: (event) => { filters.owner = event.target.value.trim(); applyFilters(); },
  });

  const filterBar = h("form", { class: "filters card", onsubmit: (event) => event.preventDefault() },
    h("div", { class: "statuses" }, h("strong", {}, "Status"), statusBoxes),
    choice("method", enumOf(schema, "method")),
    choice("dataset", enumOf(schema, "dataset")),
    h("label", {}, "owner", ownerInput),
    h("span", { class: "grow" }),
    compareButton,
    h("a", { class: "button primary", href: "#/submit" }, "New job"));

  function rowOf(job) {
    const progress = job.progress ?? {};
    const final = FINAL.has(job.status);
    const checkbox = h("input", {
      type: "checkbox",
      title: "select to compare",
      checked: selected.has(job.id),
      onchange: (event) => {
        if (event.target.checked) selected.add(job.id);
        else selected.delete(job.id);
        compareButton.disabled = selected.size === 0;
      },
    });
    const cancel = !final && !job.cancel_requested
      ? confirmButton("Cancel", async () => {
        try {
          await postJSON(`/v1/jobs/${job.id}/cancel`);
        } catch (error) {
          clear(message, errorBox(error));
        }
        await refresh();
      }, { class: "small cancel-job" })
      : null;
    const eta = job.status === "running" && progress.eta_seconds !== null ? `ETA ${duration(progress.eta_seconds)}` : "";
    return h("tr", { dataset: { jobId: job.id, status: job.status } },
      h("td", {}, checkbox),
      h("td", {}, h("a", { class: "mono job-link", href: `#/jobs/${job.id}` }, shortId(job.id)),
        job.row_label ? h("div", { class: "muted" }, job.row_label) : null),
      h("td", {}, statusBadge(job), job.error ? h("div", { class: "error", title: job.error }, job.error.slice(0, 60)) : null),
      h("td", {}, job.method),
      h("td", {}, `${job.dataset} · ${job.architecture}`),
      h("td", {}, job.owner ?? "—"),
      h("td", {}, h("div", { class: "progress-cell" },
        progressBar(progress.fraction, job.status === "succeeded"),
        h("small", {}, `${progress.epoch ?? 0}/${progress.epochs ?? "?"} epochs ${eta}`))),
      h("td", { class: "num" }, accuracyCell(job)),
      h("td", {}, when(job.created_at)),
      h("td", {}, cancel));
  }

  function draw() {
    clear(tbody, items.length
      ? items.map(rowOf)
      : h("tr", {}, h("td", { colspan: 10, class: "muted" }, "No jobs match.")));
    clear(footer, nextCursor
      ? h("button", { onclick: loadMore }, "Load older jobs")
      : h("span", { class: "muted" }, `${items.length} job${items.length === 1 ? "" : "s"}`));
  }

  async function fetchPage(limit, cursor) {
    return getJSON(`/v1/jobs${query({ ...filters, limit, cursor })}`);
  }

  async function refresh() {
    // The newest page again, as many rows as are shown (up to the API's page size).
    const page = await fetchPage(Math.min(100, Math.max(PAGE, items.length)));
    const older = items.slice(page.items.length);
    items = [...page.items, ...older.filter((job) => !page.items.some((j) => j.id === job.id))];
    if (items.length === page.items.length) nextCursor = page.next_cursor;
    clear(message);
    // Not while a cancel waits for its confirming click: redrawing would disarm it.
    if (!tbody.querySelector("button.armed")) draw();
  }

  async function loadMore() {
    const page = await fetchPage(PAGE, nextCursor);
    items = [...items, ...page.items];
    nextCursor = page.next_cursor;
    draw();
  }

  const first = await fetchPage(PAGE);
  items = first.items;
  nextCursor = first.next_cursor;

  clear(container,
    h("div", { class: "title-row" }, h("h1", {}, "Jobs"), h("span", { class: "muted" }, "newest first; updates every few seconds")),
    filterBar,
    message,
    h("div", { class: "card" },
      h("table", { id: "jobs-table" },
        h("thead", {}, h("tr", {},
          h("th", {}, ""), h("th", {}, "Job"), h("th", {}, "Status"), h("th", {}, "Method"),
          h("th", {}, "Data · model"), h("th", {}, "Owner"), h("th", {}, "Progress"),
          h("th", { class: "num" }, "Accuracy"), h("th", {}, "Created"), h("th", {}, ""))),
        tbody),
      footer));
  draw();
  return every(REFRESH_MS, refresh);
}
