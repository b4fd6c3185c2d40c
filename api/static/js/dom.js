// Building the page: h() makes elements (text is always set as text, never parsed as HTML, so a
// job's spec, error or log cannot inject markup), and the formatters every view shares.

/**
 * h("a", {href: "#/jobs", class: "x", onclick: fn, dataset: {id}}, "text", child, [more])
 * Attributes: `class`, `dataset`, `style` (an object), `on<event>` handlers; `value`,
 * `checked`, `disabled`, `selected`, `hidden` as properties; the rest as attributes.
 */
export function h(tag, attrs = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs ?? {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") element.className = value;
    else if (name === "dataset") Object.assign(element.dataset, value);
    else if (name === "style") Object.assign(element.style, value);
    else if (name.startsWith("on")) element.addEventListener(name.slice(2), value);
    else if (["value", "checked", "disabled", "selected", "hidden"].includes(name)) element[name] = value;
    else element.setAttribute(name, value === true ? "" : String(value));
  }
  append(element, children);
  return element;
}

function append(element, children) {
  for (const child of children) {
    if (child === undefined || child === null || child === false) continue;
    if (Array.isArray(child)) append(element, child);
    else element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export function clear(element, ...children) {
  element.replaceChildren();
  append(element, children);
  return element;
}

export const FINAL = new Set(["succeeded", "failed", "cancelled"]);

export function shortId(id) {
  return id ? id.slice(0, 8) : "";
}

/** An accuracy stored as a fraction (0..1), in percent. */
export function percent(fraction, digits = 2) {
  return fraction === null || fraction === undefined ? "—" : `${(fraction * 100).toFixed(digits)}%`;
}

export function number(value, digits = 4) {
  if (value === null || value === undefined) return "—";
  return Math.abs(value) >= 1000 ? value.toFixed(0) : Number(value.toPrecision(digits)).toString();
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s}s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m ${String(s % 60).padStart(2, "0")}s`;
  const hours = Math.floor(m / 60);
  if (hours < 48) return `${hours}h ${String(m % 60).padStart(2, "0")}m`;
  return `${Math.floor(hours / 24)}d ${hours % 24}h`;
}

export function when(iso) {
  if (!iso) return "—";
  const date = new Date(iso);
  const ago = (Date.now() - date.getTime()) / 1000;
  const text = date.toLocaleString(undefined, { dateStyle: "short", timeStyle: "medium" });
  return ago >= 0 && ago < 86400 ? `${text} (${duration(ago)} ago)` : text;
}

export function bytes(size) {
  if (size === null || size === undefined) return "—";
  const units = ["B", "kB", "MB", "GB"];
  let value = size;
  let unit = 0;
  while (value >= 1000 && unit < units.length - 1) {
    value /= 1000;
    unit += 1;
  }
  return `${value.toFixed(unit ? 1 : 0)} ${units[unit]}`;
}

/** The status badge; a running job asked to stop shows "cancelling". */
export function statusBadge(job) {
  const shown = job.cancel_requested && !FINAL.has(job.status) ? "cancelling" : job.status;
  return h("span", { class: `badge ${shown}`, dataset: { status: job.status } }, shown);
}

export function progressBar(fraction, done = false) {
  const width = `${Math.round(Math.max(0, Math.min(1, fraction || 0)) * 1000) / 10}%`;
  return h("div", { class: `progress${done ? " done" : ""}` }, h("span", { style: { width } }));
}

/** The job's headline accuracy: final once it succeeded, else the newest epoch's, marked. */
export function accuracyCell(job) {
  const result = job.result || {};
  if (result.final_accuracy !== null && result.final_accuracy !== undefined) {
    return h("span", { class: "final-accuracy" }, percent(result.final_accuracy));
  }
  if (result.latest_accuracy !== null && result.latest_accuracy !== undefined) {
    return h("span", { class: "muted", title: "test accuracy of the newest epoch" }, `${percent(result.latest_accuracy)} (latest)`);
  }
  return h("span", { class: "muted" }, "—");
}

/** A button that needs a second click within 3 s: no modal confirm(), no accidental cancel. */
export function confirmButton(label, onConfirm, attrs = {}) {
  let timer = null;
  const button = h("button", {
    ...attrs,
    class: `danger ${attrs.class ?? ""}`.trim(),
    onclick: async () => {
      if (!button.classList.contains("armed")) {
        button.classList.add("armed");
        button.textContent = `Confirm ${label.toLowerCase()}`;
        timer = setTimeout(() => {
          button.classList.remove("armed");
          button.textContent = label;
        }, 3000);
        return;
      }
      clearTimeout(timer);
      button.disabled = true;
      try {
        await onConfirm();
      } finally {
        button.disabled = false;
        button.classList.remove("armed");
        button.textContent = label;
      }
    },
  }, label);
  return button;
}

export function errorBox(error) {
  return h("div", { class: "error-box", role: "alert" }, error?.message ?? String(error));
}

/** A two-column table of an object (an element value as it is; nested values as JSON). */
export function keyValueTable(object) {
  const shown = (value) => {
    if (value instanceof Node) return value;
    return value !== null && typeof value === "object" ? JSON.stringify(value) : String(value);
  };
  const rows = Object.entries(object ?? {}).map(([key, value]) =>
    h("tr", {}, h("td", {}, key), h("td", { class: "mono" }, shown(value))));
  return h("table", { class: "kv" }, h("tbody", {}, rows));
}

/** Run `task` every `ms` while the page is visible (and once at once); returns a stop function. */
export function every(ms, task) {
  let stopped = false;
  let timer = null;
  const tick = async () => {
    if (stopped) return;
    if (!document.hidden) {
      try {
        await task();
      } catch (error) {
        console.warn("refresh failed", error);
      }
    }
    if (!stopped) timer = setTimeout(tick, ms);
  };
  timer = setTimeout(tick, ms);
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}
