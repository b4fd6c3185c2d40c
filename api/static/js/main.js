// The dashboard's entry: hash routes -> views, and the token prompt.
//
// Routes: #/jobs (list, filters in the hash), #/submit, #/jobs/<id>, #/compare?ids=a,b,
// #/experiments, #/experiments/<id>. Each view is `render(container, {params, query}) ->
// cleanup`; the cleanup closes its streams and timers and destroys its charts when the route
// changes.

import { getJSON, getToken, setToken } from "./api.js";
import { clear, errorBox, h } from "./dom.js";
import * as compare from "./views/compare.js";
import * as experiments from "./views/experiments.js";
import * as job from "./views/job.js";
import * as jobs from "./views/jobs.js";
import * as submit from "./views/submit.js";

const ROUTES = [
  [/^\/?$/, jobs.render, "jobs"],
  [/^\/jobs$/, jobs.render, "jobs"],
  [/^\/submit$/, submit.render, "submit"],
  [/^\/jobs\/([0-9a-f]{32})$/, job.render, "jobs"],
  [/^\/compare$/, compare.render, "compare"],
  [/^\/experiments$/, experiments.renderList, "experiments"],
  [/^\/experiments\/([0-9a-f]{32})$/, experiments.renderOne, "experiments"],
];

const view = document.getElementById("view");
let cleanup = null;
let generation = 0;

function parseHash() {
  const hash = location.hash.replace(/^#/, "") || "/jobs";
  const [path, search = ""] = hash.split("?");
  return { path, query: new URLSearchParams(search) };
}

async function route() {
  const current = ++generation;
  if (cleanup) {
    try {
      cleanup();
    } catch (error) {
      console.warn("cleanup failed", error);
    }
    cleanup = null;
  }
  const { path, query } = parseHash();
  const match = ROUTES.find(([pattern]) => pattern.test(path));
  for (const link of document.querySelectorAll("[data-nav]")) {
    link.classList.toggle("active", Boolean(match) && link.dataset.nav === match[2]);
  }
  if (!match) {
    clear(view, h("h1", {}, "Not found"), h("p", {}, "No page at ", h("code", {}, location.hash), ". ",
      h("a", { href: "#/jobs" }, "Back to the jobs")));
    return;
  }
  const [pattern, render] = match;
  const params = path.match(pattern).slice(1);
  clear(view, h("p", { class: "muted" }, "Loading…"));
  try {
    const result = await render(view, { params, query });
    if (current !== generation) result?.();  // the route changed while this one loaded
    else cleanup = result ?? null;
  } catch (error) {
    if (current !== generation) return;
    if (error.status === 401) return;  // the token prompt is up; it re-renders
    clear(view, errorBox(error));
  }
}

// --- the token -----------------------------------------------------------------------------

const dialog = document.getElementById("token-dialog");
const form = document.getElementById("token-form");
const input = document.getElementById("token-input");
const tokenError = document.getElementById("token-error");
const session = document.getElementById("session");

function showSession() {
  clear(session);
  if (getToken()) {
    session.append("token set (this tab)", h("button", {
      class: "small",
      id: "sign-out",
      onclick: () => {
        setToken(null);
        showSession();
        route();
      },
    }, "Forget token"));
  }
}

window.addEventListener("jumpout:unauthorized", (event) => {
  const hadToken = Boolean(getToken());
  setToken(null);
  showSession();
  tokenError.hidden = !hadToken;
  tokenError.textContent = hadToken ? event.detail.message : "";
  if (!dialog.open) dialog.showModal();
  input.focus();
});

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const token = input.value.trim();
  if (!token) return;
  setToken(token);
  try {
    await getJSON("/v1/jobs?limit=1");
  } catch (error) {
    tokenError.hidden = false;
    tokenError.textContent = error.message;
    return;
  }
  input.value = "";
  tokenError.hidden = true;
  dialog.close();
  showSession();
  route();
});

// The prompt cannot be dismissed without a token: every page needs one when auth is on.
dialog.addEventListener("cancel", (event) => event.preventDefault());

window.addEventListener("hashchange", route);
showSession();
route();
