// The task list: status, live progress with ETA, cancel, delete. It re-reads its page with the list's
// ETag (a 304 while nothing changed), so progress, and tasks made in another tab or through the API,
// show up without a manual refresh.
import { api, normTask, ACTIVE } from "../api.js";
import { h, clear, announce, statusBadge, progressBar, fmtTime, loading, errorBox, emptyState, keepProgress } from "../dom.js";
import { methodName } from "../widgets.js";

const POLL_MS = 1500;
const IDLE_POLL_MS = 4000; // nothing running: only new tasks from elsewhere to notice
const STATUSES = ["", "queued", "running", "succeeded", "failed", "cancelling", "cancelled"];

export function tasksView(root, { query }) {
  const status = query.get("status") || "";
  const tasks = new Map(); // id -> task, in display order
  const rows = new Map(); // id -> li
  let nextCursor = null;
  let timer = null;
  let dead = false;
  const ctrl = new AbortController();

  const list = h("ul", { class: "task-list", "aria-label": "Tasks" });
  const body = h("div", { class: "list-body", "aria-busy": "true" }, loading("Loading tasks…"));
  const liveNote = h("p", { class: "poll-note", role: "status", "aria-live": "polite" });
  const more = h("button", { type: "button", class: "btn", hidden: true, onclick: () => load(true) }, "Load more");
  const filter = h("select", { id: "status-filter", onchange: (e) => { location.hash = e.target.value ? `#/?status=${e.target.value}` : "#/"; } },
    STATUSES.map((s) => h("option", { value: s, selected: s === status }, s || "all")));

  root.append(h("section", { class: "view", "aria-labelledby": "tasks-title" },
    h("div", { class: "view-head" },
      h("h1", { id: "tasks-title" }, "Tasks"),
      h("div", { class: "head-actions" },
        h("label", { for: "status-filter", class: "inline-label" }, "Status"), filter,
        h("button", { type: "button", class: "btn", onclick: () => load(false) }, "Refresh"),
        h("a", { class: "btn btn-primary", href: "#/new" }, "New task"))),
    liveNote, body, more));

  async function load(append) {
    if (!append) { body.setAttribute("aria-busy", "true"); }
    try {
      const data = await api.listTasks({ status, cursor: append ? nextCursor : undefined, limit: 20 }, ctrl.signal);
      const items = (Array.isArray(data) ? data : data.items || data.tasks || []).map(normTask);
      nextCursor = Array.isArray(data) ? null : data.next_cursor ?? data.cursor ?? null;
      if (!append) { tasks.clear(); rows.clear(); clear(list); }
      for (const t of items) { tasks.set(t.id, t); const li = row(t); rows.set(t.id, li); list.append(li); }
      showBody();
      more.hidden = !nextCursor;
      schedule();
    } catch (err) {
      if (err.name === "AbortError") return;
      clear(body); body.append(errorBox(err, () => load(false)));
    } finally { body.setAttribute("aria-busy", "false"); }
  }

  function showBody() {
    if (tasks.size && list.isConnected) return;
    clear(body);
    if (!tasks.size) body.append(emptyState(status ? `No ${status} tasks` : "No tasks yet",
      status ? "Nothing matches this filter." : "Create a task: name your classes, drop a few images on each, pick a method.",
      h("a", { class: "btn btn-primary", href: "#/new" }, "Create a task")));
    else body.append(list);
  }

  function activeIds() { return [...tasks.values()].filter((t) => ACTIVE.has(t.status)).map((t) => t.id); }

  function schedule() {
    clearTimeout(timer);
    const ids = activeIds();
    liveNote.textContent = ids.length ? `${ids.length} task${ids.length > 1 ? "s" : ""} in progress · updating live` : "";
    if (!dead && !document.hidden) timer = setTimeout(poll, ids.length ? POLL_MS : IDLE_POLL_MS);
  }

  /** Re-reads the shown page (up to 100 tasks) with its ETag and applies what changed. */
  async function poll() {
    const limit = Math.min(100, Math.max(20, tasks.size));
    try {
      const { data, changed } = await api.pollTasks({ status, limit }, ctrl.signal);
      if (changed && !dead) merge((Array.isArray(data) ? data : data.items || []).map(normTask), limit,
        Array.isArray(data) ? null : data.next_cursor ?? null);
    } catch (err) {
      if (err.name === "AbortError") return;
    }
    if (!dead) schedule();
  }

  function merge(items, limit, cursor) {
    const covered = tasks.size <= limit; // the page holds every shown task: one missing was deleted
    const onPage = new Set(items.map((t) => t.id));
    if (covered) {
      for (const id of [...tasks.keys()]) if (!onPage.has(id)) { rows.get(id)?.remove(); rows.delete(id); tasks.delete(id); }
    }
    let previous = null;
    for (const t of items) {
      const old = tasks.get(t.id);
      tasks.set(t.id, t);
      if (old) {
        if (JSON.stringify(old) !== JSON.stringify(t)) {
          update(t);
          if (old.status !== t.status) announce(`Task ${short(t.id)} is now ${t.status}.`);
        }
      } else {
        const li = row(t);
        rows.set(t.id, li);
        if (previous) previous.after(li); else list.prepend(li);
        announce(`New task ${short(t.id)}, ${t.status}.`);
      }
      previous = rows.get(t.id);
    }
    if (covered) { nextCursor = cursor; more.hidden = !nextCursor; }
    showBody();
  }

  function row(t) {
    const li = h("li", { class: "task-row", dataset: { taskId: t.id } });
    fill(li, t);
    return li;
  }

  function update(t) {
    const li = rows.get(t.id);
    if (!li) return;
    const focused = document.activeElement && li.contains(document.activeElement) ? document.activeElement.dataset.role : null;
    keepProgress(li, () => fill(li, t));
    if (focused) li.querySelector(`[data-role="${focused}"]`)?.focus();
  }

  function fill(li, t) {
    clear(li);
    li.dataset.status = t.status;
    const names = t.class_names || [];
    const titleId = `task-${t.id}-title`;
    li.setAttribute("aria-labelledby", titleId);
    li.append(
      h("div", { class: "tr-main" },
        h("h2", { class: "tr-title", id: titleId },
          h("a", { href: `#/tasks/${encodeURIComponent(t.id)}`, "data-role": "open" }, t.name || t.config?.name || `${methodName(t.method)}`),
          " ", h("span", { class: "tr-id" }, `#${short(t.id)}`)),
        h("p", { class: "tr-meta" },
          statusBadge(t.status),
          h("span", {}, `${names.length} class${names.length === 1 ? "" : "es"}${names.length ? ": " + names.slice(0, 4).join(", ") + (names.length > 4 ? ", …" : "") : ""}`),
          t.created_at ? h("time", { datetime: String(t.created_at) }, fmtTime(t.created_at)) : null)),
      h("div", { class: "tr-progress" },
        t.status === "failed" ? h("p", { class: "tr-error" }, t.error ? String(t.error).slice(0, 160) : "Failed")
          : [progressBar(t, short(t.id)),
            t.status === "succeeded" && t.metrics?.val_accuracy !== undefined && t.metrics?.val_accuracy !== null
              ? h("p", { class: "tr-result" }, "Validation accuracy ", h("strong", {}, `${(Number(t.metrics.val_accuracy) * 100).toFixed(1)}%`)) : null]),
      h("div", { class: "tr-actions" },
        ACTIVE.has(t.status) && t.status !== "cancelling"
          ? h("button", { type: "button", class: "btn", "data-role": "cancel", "aria-label": `Cancel task ${short(t.id)}`, onclick: () => cancel(t.id) }, "Cancel") : null,
        t.status === "succeeded" ? h("a", { class: "btn", href: `#/try?task=${encodeURIComponent(t.id)}`, "data-role": "try", "aria-label": `Try task ${short(t.id)}` }, "Try") : null,
        h("button", { type: "button", class: "btn btn-danger", "data-role": "delete", "aria-label": `Delete task ${short(t.id)}`, onclick: () => del(t.id) }, "Delete")));
  }

  async function cancel(id) {
    try {
      const res = await api.cancelTask(id);
      const t = res && typeof res === "object" && res.id ? normTask(res) : { ...tasks.get(id), status: "cancelling" };
      tasks.set(id, t); update(t); announce(`Cancelling task ${short(id)}.`); schedule();
    } catch (err) { liveNote.textContent = `Could not cancel: ${err.message}`; }
  }

  async function del(id) {
    const t = tasks.get(id);
    const msg = ACTIVE.has(t?.status) ? `Task ${short(id)} is still ${t.status}. Delete it anyway?` : `Delete task ${short(id)} and its artifact?`;
    if (!window.confirm(msg)) return;
    try {
      await api.deleteTask(id);
      const li = rows.get(id);
      const next = li?.nextElementSibling || li?.previousElementSibling;
      li?.remove(); rows.delete(id); tasks.delete(id);
      announce(`Task ${short(id)} deleted.`);
      (next?.querySelector("a") || document.getElementById("tasks-title"))?.focus();
      if (!tasks.size) load(false);
      schedule();
    } catch (err) { liveNote.textContent = `Could not delete: ${err.message}`; }
  }

  const onVisible = () => { if (!document.hidden) schedule(); else clearTimeout(timer); };
  document.addEventListener("visibilitychange", onVisible);
  load(false);
  return () => { dead = true; clearTimeout(timer); ctrl.abort(); document.removeEventListener("visibilitychange", onVisible); };
}

export function short(id) { id = String(id); return id.length > 10 ? id.slice(0, 8) : id; }
