// Tiny DOM helpers: h("div", {class: "x", onclick}, child, ...). No framework, no build step.

export function h(tag, attrs, ...children) {
  const svg = tag.startsWith("svg:");
  const el = svg ? document.createElementNS("http://www.w3.org/2000/svg", tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2).toLowerCase(), v);
    else if (k === "class") el.setAttribute("class", Array.isArray(v) ? v.filter(Boolean).join(" ") : v);
    else if (k === "style" && typeof v === "object") for (const [sk, sv] of Object.entries(v)) el.style.setProperty(sk.replace(/[A-Z]/g, (c) => "-" + c.toLowerCase()), sv);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (!svg && (k === "value" || k === "checked" || k === "hidden" || k === "disabled" || k === "selected" || k === "multiple")) el[k] = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children) {
    if (c === null || c === undefined || c === false) continue;
    if (Array.isArray(c)) append(el, c);
    else el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

export function clear(el) { while (el.firstChild) el.firstChild.remove(); return el; }

export function announce(text) {
  const a = document.getElementById("announcer");
  if (!a) return;
  a.textContent = "";
  setTimeout(() => { a.textContent = text; }, 30);
}

export function pct(x, digits = 0) {
  if (x === null || x === undefined || !Number.isFinite(Number(x))) return "–";
  return `${(Number(x) * 100).toFixed(digits)}%`;
}

export function fmtNum(x, digits = 3) {
  if (x === null || x === undefined || !Number.isFinite(Number(x))) return "–";
  return Number(x).toFixed(digits);
}

export function fmtDuration(s) {
  if (s === null || s === undefined || !Number.isFinite(s) || s < 0) return "";
  s = Math.round(s);
  if (s < 60) return `${s} s`;
  const m = Math.floor(s / 60), r = s % 60;
  if (m < 60) return `${m} min ${String(r).padStart(2, "0")} s`;
  return `${Math.floor(m / 60)} h ${String(m % 60).padStart(2, "0")} min`;
}

export function fmtTime(t) {
  if (!t) return "";
  const d = new Date(typeof t === "number" && t < 1e12 ? t * 1000 : t);
  if (Number.isNaN(d.getTime())) return String(t);
  return d.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
}

export function statusBadge(status) {
  return h("span", { class: ["badge", `st-${status}`] }, status);
}

/** A labelled progress bar with ETA. */
export function progressBar(task, id) {
  const value = Math.max(0, Math.min(1, task.progress || 0));
  const label = progressLabel(task);
  return h("div", { class: "progress-wrap" },
    h("div", {
      class: ["progress", task.status === "running" && "live"], role: "progressbar",
      "aria-valuemin": "0", "aria-valuemax": "100", "aria-valuenow": String(Math.round(value * 100)),
      "aria-valuetext": label, "aria-label": `Progress of task ${id ?? task.id}`,
    }, h("div", { class: "progress-fill", style: { width: `${(value * 100).toFixed(1)}%` } })),
    h("span", { class: "progress-text" }, label));
}

/** Re-render `el` with `render()`, letting its progress bar slide from where it was instead of jumping. */
export function keepProgress(el, render) {
  const before = el.querySelector(".progress-fill")?.style.width;
  render();
  const fill = el.querySelector(".progress-fill");
  if (!before || !fill || fill.style.width === before) return;
  const target = fill.style.width;
  fill.style.width = before;
  requestAnimationFrame(() => requestAnimationFrame(() => { fill.style.width = target; }));
}

export function progressLabel(t) {
  const parts = [`${Math.round((t.progress || 0) * 100)}%`];
  if (t.epoch !== null && t.epoch !== undefined && t.epochs && t.status !== "succeeded") parts.push(`epoch ${t.epoch}/${t.epochs}`);
  if (t.status === "running" && t.eta_s !== null && t.eta_s !== undefined) parts.push(`ETA ${fmtDuration(t.eta_s)}`);
  if (t.status === "queued") parts.push("waiting for a worker");
  if (t.status === "succeeded") parts.push("done");
  if (t.status === "cancelled" || t.status === "cancelling") parts.push(t.status);
  return parts.join(" · ");
}

/** A visible spinner line for loading states. */
export function loading(text = "Loading…") {
  return h("p", { class: "loading", role: "status" }, h("span", { class: "spinner", "aria-hidden": "true" }), text);
}

export function errorBox(err, retry) {
  return h("div", { class: "error-box", role: "alert" },
    h("p", {}, h("strong", {}, err?.title && err.title !== err.message ? `${err.title}: ` : "Error: "), err?.message || String(err)),
    retry ? h("button", { type: "button", class: "btn", onclick: retry }, "Try again") : null);
}

export function emptyState(title, text, action) {
  return h("div", { class: "empty" }, h("h2", {}, title), h("p", {}, text), action || null);
}
