// One task: settings, live loss/accuracy plot from /events, results, the paper's data variances, try it.
// While it trains the task is followed over server-sent events where the browser can, else polled.
import { api, followTask, normTask, normEvents, ACTIVE } from "../api.js";
import { h, clear, announce, statusBadge, progressBar, fmtTime, fmtNum, pct, loading, errorBox, keepProgress } from "../dom.js";
import { lossAccChart, confusionMatrix, perClassBars, leaderboardBars } from "../charts.js";
import { methodName } from "../widgets.js";
import { classifyPanel } from "./try.js";
import { short } from "./tasks.js";

const POLL_MS = 1500;

export function taskView(root, { id }) {
  let task = null, events = [], timer = null, dead = false, tryPanel = null;
  let closeStream = null, streamTried = false; // one stream per view; once it is lost, polling takes over
  const ctrl = new AbortController();

  const title = h("h1", { id: "task-title" }, `Task #${short(id)}`);
  const head = h("div", { class: "view-head" }, title, h("div", { class: "head-actions" }));
  // Not a live region: it changes every poll. Status changes are announced once, through the announcer.
  const statusLine = h("div", { class: "status-line" });
  // What answers /classify now: the training-free stage, then the tuned one (GET /tasks/{id} `stages`).
  const stagesLine = h("ul", { class: "stages", "data-role": "stages" });
  const notice = h("p", { class: "notice-line", role: "status" });
  const content = h("div", { class: "task-content", "aria-busy": "true" }, loading("Loading the task…"));
  root.append(h("section", { class: "view", "aria-labelledby": "task-title" },
    h("p", { class: "crumbs" }, h("a", { href: "#/" }, "← All tasks")), head, statusLine, stagesLine, notice, content));

  const sections = {
    settings: h("section", { class: "card", "aria-labelledby": "s-settings" }),
    training: h("section", { class: "card", "aria-labelledby": "s-training" }),
    results: h("section", { class: "card", "aria-labelledby": "s-results" }),
    variances: h("section", { class: "card", "aria-labelledby": "s-variances" }),
    tryit: h("section", { class: "card", "aria-labelledby": "s-try" }),
  };

  async function load(first) {
    try {
      const [t, ev] = await Promise.all([
        api.getTask(id, ctrl.signal),
        api.events(id, ctrl.signal).catch((e) => (e.name === "AbortError" ? Promise.reject(e) : null)),
      ]);
      const prev = task;
      task = normTask(t);
      if (ev) events = normEvents(ev);
      if (first) {
        clear(content);
        content.append(h("div", { class: "detail-grid" }, sections.settings, sections.training), sections.results, sections.variances, sections.tryit);
      }
      if (notice.textContent.startsWith("Lost contact")) notice.textContent = "";
      render(prev);
      if (prev && prev.status !== task.status) announce(`Task ${short(id)} is now ${task.status}.`);
      content.setAttribute("aria-busy", "false");
      if (ACTIVE.has(task.status) && !dead && !closeStream && !(await follow())) {
        content.dataset.updates = "poll";
        timer = setTimeout(() => load(false), POLL_MS);
      }
    } catch (err) {
      if (err.name === "AbortError") return;
      content.setAttribute("aria-busy", "false");
      if (first || err.status === 404) {
        clear(content);
        content.append(errorBox(err.status === 404 ? { title: "Not found", message: `There is no task ${id}. It may have been deleted.` } : err, () => { clear(content); content.append(loading()); load(true); }));
      } else if (!dead) {
        notice.textContent = `Lost contact with the service (${err.message}); retrying…`;
        timer = setTimeout(() => load(false), POLL_MS * 3);
      }
    }
  }

  /** Live updates over EventSource; false where there is none (or it was lost): poll instead. */
  async function follow() {
    if (streamTried) return false;
    streamTried = true;
    const close = await followTask(id, {
      progress: (t) => {
        const prev = task;
        task = normTask(t);
        render(prev);
        if (prev.status !== task.status) announce(`Task ${short(id)} is now ${task.status}.`);
      },
      epoch: (e) => {
        const [event] = normEvents([e]);
        if (!event) return;
        events = events.filter((x) => x.epoch !== event.epoch).concat(event).sort((a, b) => a.epoch - b.epoch);
        renderTraining();
      },
      end: () => { closeStream = null; if (!dead) load(false); }, // the final state, with its history
      lost: () => { closeStream = null; if (!dead) load(false); },
    }, ctrl.signal).catch(() => null);
    if (!close) return false;
    if (dead) { close(); return true; }
    closeStream = close;
    content.dataset.updates = "stream";
    return true;
  }

  function render(prev) {
    const t = task;
    title.textContent = `${t.name || t.config?.name || methodName(t.method)} `;
    title.append(h("span", { class: "tr-id" }, `#${short(t.id)}`));
    renderActions();
    keepProgress(statusLine, () => {
      clear(statusLine);
      statusLine.append(statusBadge(t.status), " ",
        t.status === "failed" ? h("span", { class: "tr-error" }, t.error || "Training failed.")
          : t.status === "cancelled" ? h("span", {}, "Training was cancelled.")
          : t.status === "succeeded" ? h("span", {}, "Training finished.")
          : progressBar(t));
    });

    if (!prev || prev.status !== t.status) renderSettings();
    renderStages();
    renderTraining();
    renderResults();
    renderVariances();
    if (!prev || prev.status !== t.status || answersNow(prev) !== answersNow(t)) renderTry();
  }

  function answersNow(t) {
    return t.status === "succeeded" || t.stages?.instant?.state === "ready";
  }

  function renderStages() {
    const st = task.stages;
    clear(stagesLine);
    if (!st) return;
    const i = st.instant || {}, tu = st.tuned || {};
    const acc = (v) => (v === null || v === undefined ? "" : `, ${pct(v, 0)} on validation`);
    const running = [].concat(task.metrics?.auto?.running || []).map(methodName).join(", "); // auto: candidates training now
    const instantText = {
      ready: `Answers now: ${methodName(i.method)}${acc(i.val_accuracy)}`,
      failed: `Training-free stage failed: ${i.error || "unknown error"}`,
    }[i.state] || "Preparing a training-free answer…";
    const name = methodName(tu.method) + (running ? ` (now ${running})` : "");
    const tunedText = {
      queued: `${name}: waiting for a worker`,
      training: `Training ${name}: epoch ${task.epoch ?? 0}/${task.epochs ?? "?"}`,
      ready: `Trained ${methodName(task.metrics?.auto?.winner || tu.method)}${acc(tu.val_accuracy)}: answers from now on`,
      failed: `Training ${name} failed; the training-free stage still answers`,
      cancelled: `Training ${name} was cancelled; the training-free stage still answers`,
    }[tu.state] || tu.state;
    stagesLine.append(h("li", { "data-stage": "instant", "data-state": i.state || "pending" }, instantText),
      h("li", { "data-stage": "tuned", "data-state": tu.state || "" }, tunedText));
  }

  function renderActions() {
    const box = head.querySelector(".head-actions");
    const focused = box.contains(document.activeElement) ? document.activeElement.dataset.role : null;
    clear(box);
    if (ACTIVE.has(task.status) && task.status !== "cancelling") box.append(h("button", { type: "button", class: "btn", "data-role": "cancel", onclick: cancel }, "Cancel training"));
    if (task.status === "succeeded") box.append(h("button", { type: "button", class: "btn btn-primary", "data-role": "download", onclick: download }, "Download artifact"));
    box.append(h("button", { type: "button", class: "btn btn-danger", "data-role": "delete", onclick: del }, "Delete"));
    if (focused) (box.querySelector(`[data-role="${focused}"]`) || title).focus();
  }

  function renderSettings() {
    const t = task, c = t.config || {};
    const rows = [
      ["Method", methodName(t.method)],
      ["Classes", (t.class_names || []).join(", ") || "–"],
      ["Shots", c.shots ?? t.shots ?? "all"],
      ["Epochs", t.epochs ?? c.epochs ?? "default"],
      ["Seed", c.seed ?? t.seed ?? "–"],
      ["Images", t.num_images ?? "–"],
      ["Backbone", [t.model, t.pretrained && String(t.pretrained).split("/").pop()].filter(Boolean).join(" · ") || "–"],
      ["Created", fmtTime(t.created_at) || "–"],
    ];
    if (t.finished_at) rows.push(["Finished", fmtTime(t.finished_at)]);
    const known = new Set(["method", "class_names", "shots", "epochs", "seed", "name"]);
    const extra = [];
    for (const [k, v] of Object.entries(c)) {
      if (known.has(k) || v === null || v === undefined || typeof v === "object") continue;
      extra.push([k, String(v)]);
    }
    const dl = (list) => h("dl", { class: "kv" }, list.map(([k, v]) => [h("dt", {}, k), h("dd", {}, String(v))]));
    clear(sections.settings).append(h("h2", { id: "s-settings" }, "Settings"), dl(rows));
    if (extra.length) sections.settings.append(h("details", { class: "kv-more" }, h("summary", {}, `All training options (${extra.length})`), dl(extra)));
  }

  function renderTraining() {
    const s = sections.training;
    const wasOpen = s.querySelector("details")?.open;
    clear(s).append(h("h2", { id: "s-training" }, "Training"));
    if (task.method === "zero-shot") { s.append(h("p", { class: "muted" }, "Zero-shot does not train: no curve to draw.")); return; }
    if (!events.length) {
      s.append(ACTIVE.has(task.status) ? loading(task.status === "queued" ? "Waiting for a worker to start…" : "Waiting for the first epoch…")
        : h("p", { class: "muted" }, "No epochs were recorded."));
      return;
    }
    s.append(lossAccChart(events, { epochs: task.epochs, width: s.clientWidth - 40 }));
    if (wasOpen) s.querySelector("details").open = true;
  }

  function renderResults() {
    const s = sections.results, m = task.metrics;
    const has = m && (m.val_accuracy !== undefined || m.confusion_matrix || m.per_class_accuracy);
    s.hidden = !has && task.status !== "succeeded";
    if (s.hidden || s.dataset.rendered === "1") return;
    clear(s).append(h("h2", { id: "s-results" }, "Results"));
    if (!has) { s.append(h("p", { class: "muted" }, "The service reported no metrics for this task.")); return; }
    const names = m.class_names || task.class_names;
    const valAcc = m.val_accuracy ?? m.accuracy;
    if (m.auto) s.append(h("div", { class: "auto-box" }, h("h3", {}, "Methods compared"), leaderboardBars(m.auto)));
    s.append(h("div", { class: "results-grid" },
      h("div", {},
        h("div", { class: "big-metric" }, h("span", { class: "big" }, pct(valAcc, 1)), h("span", { class: "muted" }, "validation accuracy"),
          m.val_count ? h("span", { class: "muted small" }, `on ${m.val_count} held-out image${m.val_count === 1 ? "" : "s"}${m.train_count ? `, trained on ${m.train_count}` : ""}`) : null),
        m.per_class_accuracy ? h("div", { class: "per-class-box" }, h("h3", {}, "Per class"), perClassBars(m.per_class_accuracy, names)) : null),
      m.confusion_matrix ? h("div", { class: "cm-box" }, h("h3", {}, "Confusion matrix"), confusionMatrix(m.confusion_matrix, names)) : null));
    s.dataset.rendered = task.status === "succeeded" ? "1" : "";
  }

  function renderVariances() {
    const s = sections.variances;
    const m = task.metrics || {};
    const v = m.variances || m.variance || m.data_variances || m.analysis || task.variances;
    s.hidden = !v && task.status !== "succeeded";
    if (s.hidden || s.dataset.rendered === "1") return;
    if (!v) {
      clear(s).append(h("h2", { id: "s-variances" }, "Your data, as the paper measures it"),
        h("p", { class: "muted" }, "This service did not report the two data variances of the paper (intra-class visual, ",
          "inter-class text) for this task. ", h("code", {}, "upt analyze --data DIR"), " computes them from the same images."));
      return;
    }
    const intra = Number(v.intra_class_visual ?? v.intra_class_visual_variance ?? v.intra);
    const inter = Number(v.inter_class_text ?? v.inter_class_text_variance ?? v.inter);
    clear(s).append(h("h2", { id: "s-variances" }, "Your data, as the paper measures it"),
      h("div", { class: "variance-pair" },
        h("div", { class: "vbox" }, h("span", { class: "big" }, fmtNum(intra, 3)), h("span", {}, "intra-class visual variance"),
          h("span", { class: "muted small" }, "how much pictures of the same class differ")),
        h("div", { class: "vbox" }, h("span", { class: "big" }, fmtNum(inter, 3)), h("span", {}, "inter-class text variance"),
          h("span", { class: "muted small" }, "how far apart the class names are for CLIP's text encoder"))),
      h("p", { class: "advice" }, v.advice || v.suggestion || v.interpretation || varianceAdvice(intra, inter)));
    const perClass = v.per_class_visual && typeof v.per_class_visual === "object" ? Object.entries(v.per_class_visual) : [];
    if (perClass.length) {
      s.append(h("details", { class: "kv-more" }, h("summary", {}, "Visual variance per class"),
        h("dl", { class: "kv" }, perClass.map(([k, x]) => [h("dt", {}, k), h("dd", {}, fmtNum(x, 3))]))));
    }
    s.dataset.rendered = "1";
  }

  function renderTry() {
    const s = sections.tryit;
    s.hidden = !answersNow(task);
    if (s.hidden) return;
    clear(s).append(h("h2", { id: "s-try" }, "Try it"));
    if (task.status !== "succeeded") s.append(h("p", { class: "muted small" }, "The training-free stage answers until the training has finished."));
    tryPanel = classifyPanel({ taskId: task.id, idPrefix: "detail" });
    s.append(tryPanel);
  }

  async function cancel() {
    try {
      const r = await api.cancelTask(id); if (r && r.id) task = normTask(r); else task = { ...task, status: "cancelling" };
      render(null); announce("Cancelling.");
      if (!closeStream) { clearTimeout(timer); timer = setTimeout(() => load(false), POLL_MS); } // a stream says when it ends
    }
    catch (err) { notice.textContent = `Could not cancel: ${err.message}`; }
  }

  async function del() {
    if (!window.confirm(`Delete task ${short(id)} and its artifact?`)) return;
    try { await api.deleteTask(id); announce("Task deleted."); location.hash = "#/"; }
    catch (err) { notice.textContent = `Could not delete: ${err.message}`; }
  }

  async function download(e) {
    const btn = e.currentTarget;
    btn.disabled = true; const label = btn.textContent; btn.textContent = "Preparing…";
    try {
      const res = await api.artifact(id);
      const blob = await res.blob();
      const cd = res.headers.get("content-disposition") || "";
      const name = /filename\*?=(?:UTF-8'')?"?([^";]+)"?/i.exec(cd)?.[1] || `upt-task-${short(id)}.zip`;
      const url = URL.createObjectURL(blob);
      const a = h("a", { href: url, download: decodeURIComponent(name), hidden: true });
      document.body.append(a); a.click(); a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 10000);
      announce("Artifact downloaded.");
    } catch (err) { notice.textContent = `Could not download: ${err.message}`; }
    finally { btn.disabled = false; btn.textContent = label; }
  }

  let resizeTimer = null, lastWidth = 0;
  const onResize = () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => {
      const w = sections.training.clientWidth;
      if (task && Math.abs(w - lastWidth) > 30) { lastWidth = w; renderTraining(); }
    }, 200);
  };
  window.addEventListener("resize", onResize);
  const onVisible = () => { if (!document.hidden && task && ACTIVE.has(task.status) && !closeStream) { clearTimeout(timer); load(false); } };
  document.addEventListener("visibilitychange", onVisible);
  load(true);
  return () => {
    dead = true; clearTimeout(timer); clearTimeout(resizeTimer); ctrl.abort(); closeStream?.();
    document.removeEventListener("visibilitychange", onVisible); window.removeEventListener("resize", onResize);
  };
}

/**
 * The paper (UPT, appendix A) finds that text prompts (CoOp) struggle when pictures of a class vary a lot
 * (high intra-class visual variance) and visual prompts (VPT) struggle when class names are close for the
 * text encoder (low inter-class text variance). The two are on different feature spaces, so this compares
 * them loosely and hedges.
 */
export function varianceAdvice(intra, inter) {
  if (!Number.isFinite(intra) || !Number.isFinite(inter)) return "The service did not report both variances.";
  const ratio = intra / Math.max(inter, 1e-9);
  if (ratio > 1.25) return "Pictures within a class vary more than the class names differ: the paper finds text-only prompts (CoOp) struggle on such data, so a visual or unified prompt (VPT, UPT) is the safer choice.";
  if (ratio < 0.8) return "The class names are well apart compared with how much each class's pictures vary: text prompts (CoOp) should do well here, while visual prompts alone (VPT) gain little; UPT covers both.";
  return "The two variances are of a similar size: neither kind of prompt alone has a clear edge, which is where UPT, tuning text and image together, helps most.";
}
