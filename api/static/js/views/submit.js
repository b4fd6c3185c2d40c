// #/submit: the job form, built from the OpenAPI schema's `JobCreate` (the one spec: the same
// fields, bounds, choices and help the API checks). Enums become selects, bounds become min/max,
// descriptions become the help text; a field left empty is not sent (the recipe's default).
// A 422 puts each field's message next to the field. `GET /v1/datasets` marks the data sets this
// server does not have.

import { ApiError, getJSON, openapi, postJSON } from "../api.js";
import { clear, errorBox, h } from "../dom.js";

// Shown first; every other field of the schema follows under "More fields", in schema order.
const PRIMARY = [
  "dataset", "architecture", "method", "epochs", "seed", "dropout_rate", "sigma", "p_min",
  "p_max", "ablation", "priority",
];

/** {type, enum, minimum, ..., nullable} of a property, its `anyOf: [X, null]` unwrapped. */
export function describe(property) {
  const options = property.anyOf ?? [property];
  const nonNull = options.filter((option) => option.type !== "null");
  return {
    ...(nonNull[0] ?? {}),
    nullable: options.length !== nonNull.length,
    title: property.title,
    description: property.description,
  };
}

/** Turn one form control's text into the JSON value the schema wants; throws with a message. */
export function parseValue(field, text) {
  if (field.type === "integer" || field.type === "number") {
    const value = Number(text);
    if (!Number.isFinite(value)) throw new Error("must be a number");
    if (field.type === "integer" && !Number.isInteger(value)) throw new Error("must be an integer");
    if (field.exclusiveMinimum !== undefined && !(value > field.exclusiveMinimum)) throw new Error(`must be above ${field.exclusiveMinimum}`);
    if (field.exclusiveMaximum !== undefined && !(value < field.exclusiveMaximum)) throw new Error(`must be below ${field.exclusiveMaximum}`);
    if (field.minimum !== undefined && value < field.minimum) throw new Error(`must be at least ${field.minimum}`);
    if (field.maximum !== undefined && value > field.maximum) throw new Error(`must be at most ${field.maximum}`);
    return value;
  }
  if (field.type === "boolean") return text === "true";
  if (field.type === "array") {
    return text.split(/[\s,]+/).filter(Boolean).map((item) => {
      const value = Number(item);
      if (!Number.isInteger(value)) throw new Error(`"${item}" is not an integer`);
      return value;
    });
  }
  return text;
}

function control(name, field, datasets) {
  const attrs = { id: `field-${name}`, name };
  if (field.enum) {
    const available = name === "dataset" ? datasets : null;
    return h("select", attrs,
      h("option", { value: "" }, field.nullable || !field.enum ? "(default)" : "choose…"),
      field.enum.map((value) => {
        const info = available?.get(value);
        const missing = info && info.available === false;
        return h("option", { value, disabled: missing, title: missing ? info.reason ?? "not on this server" : null },
          missing ? `${value} (not on this server)` : value);
      }));
  }
  if (field.type === "boolean") {
    return h("select", attrs, h("option", { value: "" }, "(default)"),
      h("option", { value: "true" }, "true"), h("option", { value: "false" }, "false"));
  }
  if (field.type === "integer" || field.type === "number") {
    return h("input", {
      ...attrs,
      type: "number",
      // HTML bounds are inclusive: an exclusive bound is checked by parseValue instead.
      min: field.minimum, max: field.maximum,
      step: field.type === "integer" ? 1 : "any",
      inputmode: field.type === "integer" ? "numeric" : "decimal",
    });
  }
  if (field.type === "array") return h("input", { ...attrs, type: "text", placeholder: "e.g. 60, 120, 160" });
  return h("input", { ...attrs, type: "text", maxlength: field.maxLength });
}

export async function render(container) {
  const schema = await openapi();
  const properties = schema.components.schemas.JobCreate.properties;
  const required = new Set(schema.components.schemas.JobCreate.required ?? []);
  let datasets = null;
  try {
    const answer = await getJSON("/v1/datasets");
    datasets = new Map(answer.items.map((item) => [item.name, item]));
  } catch (error) {
    if (error.status === 401) throw error;
    // An older server without /v1/datasets: every data set is offered.
  }

  const fields = new Map();
  const cells = new Map();
  for (const [name, property] of Object.entries(properties)) {
    const field = describe(property);
    const input = control(name, field, datasets);
    const message = h("span", { class: "field-error", id: `error-${name}` });
    const cell = h("div", { class: "field", dataset: { field: name } },
      h("label", { for: input.id }, name, required.has(name) ? " *" : ""),
      input,
      h("span", { class: "help" }, field.description ?? ""),
      message);
    fields.set(name, { field, input, message, cell });
    cells.set(name, cell);
  }
  const primary = PRIMARY.filter((name) => cells.has(name));
  const rest = [...cells.keys()].filter((name) => !primary.includes(name));
  const status = h("div");
  const submitButton = h("button", { type: "submit", class: "primary", id: "submit-job" }, "Submit job");

  function showErrors(errors) {
    for (const { cell, message } of fields.values()) {
      cell.classList.remove("invalid");
      message.textContent = "";
    }
    const unplaced = [];
    for (const { field, message } of errors) {
      const entry = fields.get(String(field).split(".")[0]);
      if (entry) {
        entry.cell.classList.add("invalid");
        entry.message.textContent = message;
        // A field under "More fields" with an error: open the section so it shows.
        entry.cell.closest("details")?.setAttribute("open", "");
      } else {
        unplaced.push(`${field}: ${message}`);
      }
    }
    return unplaced;
  }

  async function onSubmit(event) {
    event.preventDefault();
    clear(status);
    const body = {};
    const errors = [];
    for (const [name, { field, input }] of fields) {
      const text = input.value.trim();
      if (text === "") {
        if (required.has(name)) errors.push({ field: name, message: "field required" });
        continue;
      }
      try {
        body[name] = parseValue(field, text);
      } catch (error) {
        errors.push({ field: name, message: error.message });
      }
    }
    if (errors.length) {
      showErrors(errors);
      clear(status, errorBox({ message: "Some fields need attention." }));
      return;
    }
    showErrors([]);
    submitButton.disabled = true;
    try {
      const job = await postJSON("/v1/jobs", body);
      location.hash = `#/jobs/${job.id}`;
    } catch (error) {
      if (!(error instanceof ApiError)) throw error;
      const unplaced = showErrors(error.fields ?? []);
      clear(status, errorBox({ message: [error.message, ...unplaced].join("\n") }));
    } finally {
      submitButton.disabled = false;
    }
  }

  clear(container,
    h("div", { class: "title-row" }, h("h1", {}, "New job")),
    h("form", { class: "card", id: "submit-form", method: "post", novalidate: true, onsubmit: onSubmit },
      h("p", { class: "muted" }, "Fields, bounds and choices come from the API's schema. Leave a field empty for the recipe's default for the (dataset, architecture) pair."),
      h("div", { class: "form-grid" }, primary.map((name) => cells.get(name))),
      rest.length ? h("details", {}, h("summary", {}, `More fields (${rest.length})`),
        h("div", { class: "form-grid" }, rest.map((name) => cells.get(name)))) : null,
      h("div", { class: "row", style: { marginTop: "14px" } }, submitButton),
      status));
  return null;
}
