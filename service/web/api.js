// The HTTP client: same-origin requests only, with the API key (if any) from local storage.
// Every error becomes an ApiError carrying the RFC 9457 problem (title, detail, errors[]).
// Polls send back the ETag they got (a 304 costs the service two columns and no body), and a task
// is followed live over EventSource where the browser has it.

const KEY_STORAGE = "upt.apiKey";

export function getApiKey() {
  try { return localStorage.getItem(KEY_STORAGE) || ""; } catch { return ""; }
}

export function setApiKey(key) {
  try {
    if (key) localStorage.setItem(KEY_STORAGE, key);
    else localStorage.removeItem(KEY_STORAGE);
  } catch { /* storage disabled: the key lasts for this page only */ }
  memoryKey = key || "";
}

let memoryKey = "";
const listeners = new Set();
/** Called with (error) whenever a request is refused for lack of a (valid) key. */
export function onAuthError(fn) { listeners.add(fn); return () => listeners.delete(fn); }

export class ApiError extends Error {
  constructor(status, problem) {
    const p = problem || {};
    super(p.detail || p.title || `Request failed (${status})`);
    this.status = status;
    this.problem = p;
    this.title = p.title || "";
    this.fieldErrors = normaliseFieldErrors(p);
  }
}

/** problem.errors may be [{field, message}], FastAPI's [{loc, msg}], or a {field: message} map. */
function normaliseFieldErrors(p) {
  const out = [];
  let errs = p.errors ?? p.invalid_params ?? null;
  if (!errs && Array.isArray(p.detail)) errs = p.detail; // FastAPI's default 422 body
  if (errs && !Array.isArray(errs) && typeof errs === "object") {
    errs = Object.entries(errs).map(([field, message]) => ({ field, message }));
  }
  for (const e of errs || []) {
    if (!e || typeof e !== "object") continue;
    let field = e.field ?? e.name ?? e.param ?? e.loc ?? "";
    if (Array.isArray(field)) field = field.filter((x) => typeof x === "string" && x !== "body").pop() || "";
    field = String(field).split(/[.\[\]]/).filter(Boolean).filter((x) => !/^\d+$/.test(x)).pop() || "";
    const message = e.message ?? e.msg ?? e.reason ?? e.detail ?? "is invalid";
    out.push({ field, message: Array.isArray(message) ? message.join("; ") : String(message) });
  }
  return out;
}

/** URL relative to the page, so the client also works when the service sits under a path prefix. */
export function apiUrl(path, params) {
  const url = new URL(path.replace(/^\//, ""), document.baseURI);
  for (const [k, v] of Object.entries(params || {})) {
    if (v === undefined || v === null || v === "") continue;
    if (Array.isArray(v)) v.forEach((x) => url.searchParams.append(k, x));
    else url.searchParams.set(k, v);
  }
  return url;
}

function headers(extra) {
  const h = new Headers(extra || {});
  const key = getApiKey() || memoryKey;
  if (key) h.set("X-API-Key", key);
  h.set("Accept", "application/json, application/problem+json");
  return h;
}

export async function request(method, path, { params, body, headers: extra, signal, raw } = {}) {
  let res;
  try {
    res = await fetch(apiUrl(path, params), { method, body, headers: headers(extra), signal, cache: "no-store" });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, { title: "Network error", detail: "The service cannot be reached. Is it running?" });
  }
  if (res.status === 304 && raw) return res;
  if (!res.ok) {
    let problem = null;
    const text = await res.text().catch(() => "");
    try { problem = JSON.parse(text); } catch { problem = { detail: text.slice(0, 300) || res.statusText }; }
    if (typeof problem !== "object" || problem === null) problem = { detail: String(problem) };
    if (typeof problem.detail !== "string" && !Array.isArray(problem.detail)) problem.detail = problem.detail ? JSON.stringify(problem.detail) : "";
    if (Array.isArray(problem.detail)) problem = { ...problem, errors: problem.errors || problem.detail, detail: "Some fields are invalid." };
    const err = new ApiError(res.status, { status: res.status, title: res.statusText, ...problem });
    if (res.status === 401 || res.status === 403) listeners.forEach((fn) => fn(err));
    throw err;
  }
  if (raw) return res;
  if (res.status === 204) return null;
  const type = res.headers.get("content-type") || "";
  if (type.includes("json")) return res.json();
  return res.text();
}

/**
 * A POST through XMLHttpRequest, for its upload progress events (fetch has none): onProgress(fraction).
 * Same result and errors as request().
 */
export function upload(path, body, { headers: extra, onProgress } = {}) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", apiUrl(path));
    headers(extra).forEach((v, k) => xhr.setRequestHeader(k, v));
    if (onProgress) xhr.upload.addEventListener("progress", (e) => { if (e.lengthComputable) onProgress(e.loaded / e.total); });
    xhr.addEventListener("error", () => reject(new ApiError(0, { title: "Network error", detail: "The service cannot be reached. Is it running?" })));
    xhr.addEventListener("load", () => {
      const text = xhr.responseText || "";
      let data = null;
      try { data = text ? JSON.parse(text) : null; } catch { data = null; }
      if (xhr.status >= 200 && xhr.status < 300) { resolve(data); return; }
      let problem = data && typeof data === "object" ? data : { detail: text.slice(0, 300) || xhr.statusText };
      if (Array.isArray(problem.detail)) problem = { ...problem, errors: problem.errors || problem.detail, detail: "Some fields are invalid." };
      else if (problem.detail && typeof problem.detail !== "string") problem.detail = JSON.stringify(problem.detail);
      const err = new ApiError(xhr.status, { status: xhr.status, title: xhr.statusText, ...problem });
      if (xhr.status === 401 || xhr.status === 403) listeners.forEach((fn) => fn(err));
      reject(err);
    });
    xhr.send(body);
  });
}

// ---- Cheap polling: each GET URL's last ETag and body; the ETag goes back as If-None-Match ----
const validated = new Map(); // url -> { etag, data }, oldest first
const VALIDATED_MAX = 200;

/** GET with If-None-Match: {data, changed}; an unchanged answer (304) gives the body seen last. */
export async function pollGet(path, { params, signal } = {}) {
  const url = apiUrl(path, params).toString();
  const known = validated.get(url);
  const res = await request("GET", path, { params, signal, raw: true, headers: known ? { "If-None-Match": known.etag } : undefined });
  if (res.status === 304 && known) return { data: known.data, changed: false };
  const data = await res.json();
  const etag = res.headers.get("ETag");
  validated.delete(url);
  if (etag) validated.set(url, { etag, data });
  if (validated.size > VALIDATED_MAX) validated.delete(validated.keys().next().value);
  return { data, changed: true };
}

/**
 * Follows a task live over server-sent events: handlers.progress(task), .epoch(event), .end(status),
 * and .lost() once the stream cannot go on (the caller then polls). EventSource cannot send the key,
 * so the stream's URL carries a short-lived token made for it. A token opens one stream: when the
 * connection drops, the browser's own reconnection (same URL) is refused, so a new token is made and
 * the stream resumes after the last event seen (`after`), up to RESUMES times without an event between.
 * Resolves to a function that closes the stream, or null where the browser has no EventSource (or the
 * service no stream): poll instead.
 */
const RESUMES = 3;

export async function followTask(id, handlers, signal) {
  if (typeof EventSource !== "function") return null;
  let source = null, closed = false, lastId = "", failures = 0;
  const open = async () => {
    let made;
    try { made = await request("POST", `tasks/${encodeURIComponent(id)}/events/token`, { signal }); }
    catch (err) { if (err.name === "AbortError") throw err; return false; }
    if (closed || !made || typeof made.url !== "string") return false;
    const sep = made.url.includes("?") ? "&" : "?";
    source = new EventSource(apiUrl(lastId ? `${made.url}${sep}after=${encodeURIComponent(lastId)}` : made.url));
    const on = (kind, fn) => source.addEventListener(kind, (e) => {
      if (e.lastEventId) lastId = e.lastEventId;
      failures = 0;
      let data;
      try { data = JSON.parse(e.data); } catch { return; }
      fn(data);
    });
    on("progress", handlers.progress);
    on("epoch", handlers.epoch);
    on("end", (d) => { closed = true; source.close(); handlers.end(d.status); });
    // CONNECTING: the browser reconnects by itself (refused: the token was used). CLOSED: make a new one.
    source.addEventListener("error", () => {
      if (source.readyState !== EventSource.CLOSED && !lastId) return;
      source.close();
      if (closed) return;
      if (++failures > RESUMES) { handlers.lost(); return; }
      open().then((ok) => { if (!ok && !closed) handlers.lost(); }, () => {});
    });
    return true;
  };
  if (!(await open())) return null;
  return () => { closed = true; if (source) source.close(); };
}

export const api = {
  listTasks: (params, signal) => request("GET", "tasks", { params, signal }),
  pollTasks: (params, signal) => pollGet("tasks", { params, signal }),
  getTask: async (id, signal) => (await pollGet(`tasks/${encodeURIComponent(id)}`, { signal })).data,
  events: (id, signal) => request("GET", `tasks/${encodeURIComponent(id)}/events`, { signal }),
  createTask: (form, idempotencyKey, onProgress) =>
    upload("tasks", form, { headers: idempotencyKey ? { "Idempotency-Key": idempotencyKey } : {}, onProgress }),
  cancelTask: (id) => request("POST", `tasks/${encodeURIComponent(id)}/cancel`),
  deleteTask: (id) => request("DELETE", `tasks/${encodeURIComponent(id)}`),
  artifact: (id) => request("GET", `tasks/${encodeURIComponent(id)}/artifact`, { raw: true }),
  classify: (form, signal) => request("POST", "classify", { body: form, signal }),
  readyz: (signal) => request("GET", "readyz", { signal }),
  methods: (signal) => request("GET", "methods", { signal }),
};

/** A random id for Idempotency-Key; crypto.randomUUID needs a secure context, getRandomValues does not. */
export function randomId() {
  if (crypto.randomUUID && window.isSecureContext) return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}

// ---- Normalising what the service sends (field names may differ a little between versions) ----

export const ACTIVE = new Set(["queued", "running", "cancelling", "pending", "started"]);

export function normTask(t) {
  if (!t || typeof t !== "object") return t;
  const cfg = t.config || t.settings || {};
  let progress = num(t.progress);
  if (progress !== null && progress > 1.0001) progress /= 100;
  const metrics = t.metrics || t.result || null;
  return {
    ...t,
    id: String(t.id ?? t.task_id ?? ""),
    status: String(t.status || t.state || "queued").toLowerCase(),
    method: t.method ?? cfg.method ?? "",
    class_names: t.class_names ?? cfg.class_names ?? metrics?.class_names ?? [],
    progress: progress ?? (t.status === "succeeded" ? 1 : 0),
    epoch: num(t.epoch),
    epochs: num(t.epochs ?? cfg.epochs),
    loss: num(t.loss),
    accuracy: num(t.accuracy ?? t.train_accuracy),
    eta_s: num(t.eta_s ?? t.eta_seconds ?? t.eta),
    metrics,
    error: t.error ?? t.error_message ?? null,
    created_at: t.created_at ?? t.created ?? null,
    config: cfg,
  };
}

export function normEvents(data) {
  let list = Array.isArray(data) ? data : data?.items ?? data?.events ?? data?.history ?? [];
  return list
    .filter((e) => !(e && (e.kind === "candidate" || e.kind === "handback"))) // auto's candidates, hand-backs: not epochs
    .map((e) => (e && typeof e.data === "object" && e.data ? { ...e, ...e.data } : e)) // {epoch, attempt, data: {...}}
    .filter((e) => e && typeof e === "object" && (e.epoch !== undefined || e.loss !== undefined))
    .map((e, i) => ({
      ...e,
      epoch: num(e.epoch) ?? i + 1,
      loss: num(e.loss ?? e.train_loss),
      accuracy: num(e.accuracy ?? e.train_accuracy ?? e.acc),
      val_accuracy: num(e.val_accuracy ?? e.val_acc),
    }));
}

export function normClassify(data, files) {
  let list = Array.isArray(data) ? data : data?.results ?? data?.predictions ?? data?.items ?? data?.images ?? [];
  if (!Array.isArray(list)) list = [list];
  return list.map((entry, i) => {
    let preds = Array.isArray(entry) ? entry
      : entry?.predictions ?? entry?.top ?? entry?.top_k ?? entry?.labels ?? entry?.probabilities ?? entry?.scores ?? [];
    if (!Array.isArray(preds) && typeof preds === "object") preds = Object.entries(preds).map(([label, p]) => ({ label, probability: p }));
    const top = preds.map((p) => Array.isArray(p)
      ? { label: String(p[0]), probability: num(p[1]) ?? 0 }
      : { label: String(p.label ?? p.class_name ?? p.class ?? p.name ?? "?"), probability: num(p.probability ?? p.prob ?? p.score ?? p.p) ?? 0 });
    top.sort((a, b) => b.probability - a.probability);
    return { filename: entry?.filename ?? entry?.file ?? entry?.name ?? files?.[i]?.name ?? `image ${i + 1}`, top, file: files?.[i] };
  });
}

function num(x) {
  if (x === null || x === undefined || x === "") return null;
  const n = Number(x);
  return Number.isFinite(n) ? n : null;
}
