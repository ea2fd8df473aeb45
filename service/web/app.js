// Entry point: hash router (#/, #/new, #/tasks/ID, #/try), API key dialog, readiness indicator.
import { api, getApiKey, setApiKey, onAuthError } from "./api.js";
import { h, clear, announce } from "./dom.js";
import { loadMethods } from "./widgets.js";
import { tasksView } from "./views/tasks.js";
import { createView } from "./views/create.js";
import { taskView } from "./views/task.js";
import { tryView } from "./views/try.js";

const main = document.getElementById("main");
let cleanup = null;

const routes = [
  { re: /^\/?$/, nav: "tasks", view: tasksView, title: "Tasks" },
  { re: /^\/tasks\/?$/, nav: "tasks", view: tasksView, title: "Tasks" },
  { re: /^\/new\/?$/, nav: "new", view: createView, title: "New task" },
  { re: /^\/tasks\/([^/?]+)\/?$/, nav: "tasks", view: taskView, title: "Task" },
  { re: /^\/try\/?$/, nav: "try", view: tryView, title: "Try it" },
];

function parseHash() {
  const raw = location.hash.replace(/^#/, "") || "/";
  const [path, query] = raw.split("?");
  return { path, query: new URLSearchParams(query || "") };
}

let firstRender = true;
function render() {
  if (cleanup) { try { cleanup(); } catch (e) { console.error(e); } cleanup = null; }
  const { path, query } = parseHash();
  const route = routes.find((r) => r.re.test(path));
  for (const a of document.querySelectorAll("[data-nav]")) {
    if (route && a.dataset.nav === route.nav) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  clear(main);
  if (!route) {
    document.title = "Not found · upt";
    main.append(h("section", { class: "view" }, h("h1", { tabindex: "-1" }, "Page not found"),
      h("p", {}, "There is nothing at this address. ", h("a", { href: "#/" }, "Back to the tasks"), ".")));
  } else {
    const m = path.match(route.re);
    document.title = `${route.title} · upt`;
    cleanup = route.view(main, { id: m[1] ? decodeURIComponent(m[1]) : undefined, query }) || null;
  }
  // Move focus to the new view's heading so screen-reader and keyboard users land on it.
  if (!firstRender) {
    const h1 = main.querySelector("h1");
    if (h1) { h1.setAttribute("tabindex", "-1"); h1.focus({ preventScroll: false }); }
  }
  firstRender = false;
}

window.addEventListener("hashchange", render);

// ---- API key ----
const dialog = document.getElementById("key-dialog");
const keyInput = document.getElementById("key-input");
const keyButton = document.getElementById("key-button");
const banner = document.getElementById("banner");

function refreshKeyButton() {
  const has = !!getApiKey();
  keyButton.textContent = has ? "API key ✓" : "API key";
  keyButton.setAttribute("aria-label", has ? "API key (set): change or forget it" : "API key (not set): enter one");
}

export function openKeyDialog() {
  keyInput.value = getApiKey();
  if (typeof dialog.showModal === "function") dialog.showModal();
  else dialog.setAttribute("open", "");
  keyInput.focus();
}

keyButton.addEventListener("click", openKeyDialog);
document.getElementById("key-show").addEventListener("change", (e) => { keyInput.type = e.target.checked ? "text" : "password"; });
dialog.addEventListener("close", () => {
  if (dialog.returnValue === "save") { setApiKey(keyInput.value.trim()); announce("API key saved in this browser."); hideBanner(); render(); }
  else if (dialog.returnValue === "clear") { setApiKey(""); announce("API key forgotten."); render(); }
  refreshKeyButton();
  keyButton.focus();
});

function hideBanner() { banner.hidden = true; clear(banner); }

let authPrompted = false;
onAuthError((err) => {
  clear(banner);
  banner.append(
    h("p", {}, getApiKey()
      ? `The service refused the API key (${err.status}). Check it and enter it again.`
      : "This service needs an API key. Enter it once; this browser keeps it."),
    h("button", { type: "button", class: "btn btn-primary", onclick: openKeyDialog }, "Enter API key"));
  banner.hidden = false;
  if (!authPrompted && !dialog.open) { authPrompted = true; openKeyDialog(); }
});

// ---- Readiness ----
const health = document.getElementById("health");
async function checkHealth() {
  let state = "down", text = "offline";
  try { await api.readyz(); state = "ok"; text = "ready"; }
  catch (e) {
    if (e.status === 401 || e.status === 403) { state = "ok"; text = "online"; }
    else if (e.status) { state = "warn"; text = "starting"; }
  }
  health.dataset.state = state;
  health.querySelector(".health-text").textContent = text;
  health.title = `Service ${text}`;
  setTimeout(checkHealth, state === "ok" ? 30000 : 5000);
}

refreshKeyButton();
// Method names in every view come from GET /methods: the first view waits for it (briefly; ids are
// shown if the service cannot be reached, and the create view retries).
loadMethods().catch(() => {}).finally(render);
checkHealth();
