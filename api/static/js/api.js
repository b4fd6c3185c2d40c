// Talking to /v1: the token, JSON requests and their uniform errors, the job's event stream,
// the followed log and checkpoint downloads.
//
// The token lives in sessionStorage (this tab only) and travels only in the Authorization
// header, never in a URL: the browser's EventSource cannot send that header, so the event
// stream is read with fetch() and parsed here (readEvents), and downloads go through fetch
// and a blob rather than a plain link.

const TOKEN_KEY = "jumpout.token";

export function getToken() {
  return sessionStorage.getItem(TOKEN_KEY);
}

export function setToken(token) {
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
  else sessionStorage.removeItem(TOKEN_KEY);
}

/** An error answer of the API: `{"error": {"code", "message", "fields"}}` (api/errors.py). */
export class ApiError extends Error {
  constructor(status, code, message, fields = []) {
    super(message);
    this.status = status;
    this.code = code;
    this.fields = fields;
  }

  static async from(response) {
    let error = null;
    try {
      error = (await response.json()).error;
    } catch {
      // not the uniform body (a proxy's page, say): the status line is all there is
    }
    return new ApiError(
      response.status,
      error?.code ?? "http_error",
      error?.message ?? `${response.status} ${response.statusText}`,
      error?.fields ?? [],
    );
  }

  /** The route itself is not on this server (an older API), as opposed to a missing job. */
  get routeMissing() {
    return (this.status === 404 && this.code === "not_found") || this.status === 405;
  }
}

/** fetch() with the token; resolves to the Response, throws ApiError for a 4xx/5xx. */
export async function request(path, { method = "GET", body, headers = {}, signal } = {}) {
  const sent = { Accept: "application/json", ...headers };
  const token = getToken();
  if (token) sent.Authorization = `Bearer ${token}`;
  let payload;
  if (body !== undefined) {
    sent["Content-Type"] = "application/json";
    payload = JSON.stringify(body);
  }
  const response = await fetch(path, { method, headers: sent, body: payload, signal, cache: "no-store" });
  if (!response.ok) {
    const error = await ApiError.from(response);
    if (error.status === 401) window.dispatchEvent(new CustomEvent("jumpout:unauthorized", { detail: error }));
    throw error;
  }
  return response;
}

export async function getJSON(path, options) {
  return (await request(path, options)).json();
}

export async function postJSON(path, body, options = {}) {
  return (await request(path, { ...options, method: "POST", body })).json();
}

/** A query string from {name: value | [values]}; empty values left out, lists repeated. */
export function query(params) {
  const search = new URLSearchParams();
  for (const [name, value] of Object.entries(params)) {
    for (const item of Array.isArray(value) ? value : [value]) {
      if (item !== undefined && item !== null && item !== "") search.append(name, item);
    }
  }
  const text = search.toString();
  return text ? `?${text}` : "";
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => { clearTimeout(timer); resolve(); }, { once: true });
  });
}

/**
 * Parse a text/event-stream body (the WHATWG rules: fields `event`, `data`, `id`, `retry`;
 * `:` starts a comment, which the server sends as a heartbeat; a blank line ends an event).
 * Yields {type, data, id, retry} per event, and {type: "comment"} per comment line.
 */
export async function* readEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let event = { type: "message", data: [], id: undefined, retry: undefined };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    for (;;) {
      const end = buffer.search(/[\r\n]/);
      // A lone "\r" at the end of the chunk may be the first half of "\r\n": wait for more.
      if (end < 0 || (buffer[end] === "\r" && end === buffer.length - 1)) break;
      const line = buffer.slice(0, end);
      buffer = buffer.slice(end + (buffer.startsWith("\r\n", end) ? 2 : 1));
      if (line === "") {
        if (event.data.length) yield { ...event, data: event.data.join("\n") };
        else if (event.id !== undefined) yield { ...event, type: "id", data: "" };
        event = { type: "message", data: [], id: undefined, retry: undefined };
        continue;
      }
      if (line.startsWith(":")) {
        yield { type: "comment", data: line.slice(1).trim() };
        continue;
      }
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let text = colon < 0 ? "" : line.slice(colon + 1);
      if (text.startsWith(" ")) text = text.slice(1);
      if (field === "event") event.type = text;
      else if (field === "data") event.data.push(text);
      else if (field === "id" && !text.includes("\0")) event.id = text;
      else if (field === "retry" && /^\d+$/.test(text)) event.retry = Number(text);
    }
  }
}

/**
 * Follow a server-sent event stream (GET `path`) with the token in the header. Reconnects after
 * a drop, sending `Last-Event-ID` so the server replays only what was missed; stops after an
 * `end` event, on close(), or on an error answer (4xx) which it hands to onError.
 * handlers: onEvent(type, parsedData, id), onState("open" | "reconnecting" | "closed"), onError(ApiError).
 */
export function openEventStream(path, handlers) {
  const controller = new AbortController();
  const { signal } = controller;
  let lastEventId = null;
  let baseRetryMs = 1000;  // the server's `retry:` when it sends one
  let retryMs = baseRetryMs;
  let ended = false;
  const state = (name) => handlers.onState?.(name);

  (async () => {
    while (!signal.aborted && !ended) {
      try {
        const headers = { Accept: "text/event-stream" };
        if (lastEventId !== null) headers["Last-Event-ID"] = lastEventId;
        const response = await request(path, { headers, signal });
        state("open");
        retryMs = baseRetryMs;
        for await (const event of readEvents(response.body)) {
          if (event.id !== undefined) lastEventId = event.id;
          if (event.retry !== undefined) retryMs = baseRetryMs = event.retry;
          if (event.type === "comment" || event.type === "id") continue;
          if (event.type === "end") ended = true;
          handlers.onEvent(event.type, event.data ? JSON.parse(event.data) : null, event.id);
        }
      } catch (error) {
        if (signal.aborted) break;
        if (error instanceof ApiError && error.status < 500 && error.status !== 429) {
          handlers.onError?.(error);
          break;
        }
        // A network error or a 5xx: the server restarts, or a proxy dropped us; try again.
      }
      if (!ended && !signal.aborted) {
        state("reconnecting");
        await sleep(retryMs, signal);
        retryMs = Math.min(retryMs * 2, 15000);
      }
    }
    state("closed");
  })();

  return { close: () => controller.abort() };
}

/**
 * Follow a job's log (GET /v1/jobs/{id}/log?offset=N&follow=true): hands each decoded piece to
 * onText; when the followed response ends (the job ended, the connection dropped, or the
 * server's stream limit) asks again from the byte offset reached, until the server says
 * `X-Log-Complete: true`. onMissing(error) when the server has no such route or log.
 */
export function followLog(jobId, { onText, onComplete, onMissing }) {
  const controller = new AbortController();
  const { signal } = controller;
  let offset = 0;
  let delay = 1000;

  (async () => {
    while (!signal.aborted) {
      let complete = false;
      try {
        const path = `/v1/jobs/${encodeURIComponent(jobId)}/log${query({ offset, follow: "true" })}`;
        const response = await request(path, { headers: { Accept: "text/plain" }, signal });
        complete = response.headers.get("X-Log-Complete") === "true";
        // The body starts at X-Log-Offset: past our offset when the server dropped that range
        // to bound the file (the body then opens with a marker line saying so).
        offset = Number(response.headers.get("X-Log-Offset") ?? offset);
        const decoder = new TextDecoder();
        const reader = response.body.getReader();
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          offset += value.byteLength;
          onText(decoder.decode(value, { stream: true }));
        }
        const rest = decoder.decode();
        if (rest) onText(rest);
        delay = 1000;
      } catch (error) {
        if (signal.aborted) return;
        if (error instanceof ApiError && error.status < 500) {
          onMissing?.(error);
          return;
        }
      }
      if (complete) {
        onComplete?.();
        return;
      }
      // The followed response ended (the job finished, or the connection dropped): ask again
      // from where we are; the server then answers what is left and whether that is all.
      await sleep(delay, signal);
      delay = Math.min(delay * 2, 10000);
    }
  })();

  return { close: () => controller.abort() };
}

/** Download a file with the token in the header (a plain link could not send it). */
export async function download(path, fallbackName) {
  const response = await request(path, { headers: { Accept: "application/octet-stream" } });
  const disposition = response.headers.get("Content-Disposition") || "";
  const match = /filename\*?=(?:UTF-8'')?"?([^";]+)"?/i.exec(disposition);
  const name = match ? decodeURIComponent(match[1]) : fallbackName;
  const url = URL.createObjectURL(await response.blob());
  const link = document.createElement("a");
  link.href = url;
  link.download = name;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60000);
  return name;
}

let schemaPromise = null;

/** The OpenAPI schema (the one spec the submit form is built from), fetched once. */
export function openapi() {
  schemaPromise ??= getJSON("/openapi.json").catch((error) => {
    schemaPromise = null;
    throw error;
  });
  return schemaPromise;
}
