// Try a model: drop images, see the top-5 labels. With a finished task, or zero-shot with typed class names.
import { api, normTask, normClassify } from "../api.js";
import { h, clear, announce, loading, errorBox } from "../dom.js";
import { dropZone, resultCard, methodName } from "../widgets.js";
import { short } from "./tasks.js";

const TOP_K = 5;

/**
 * The classify widget. With taskId it classifies against that task; otherwise the caller passes
 * getSource() returning {task_id} or {class_names} (or an error string).
 */
export function classifyPanel({ taskId, getSource, idPrefix = "try" }) {
  let files = [];
  const results = h("div", { class: "results", "aria-live": "polite", "aria-busy": "false" });
  const errorSlot = h("p", { class: "field-error", id: `${idPrefix}-err`, hidden: true });
  const chosen = h("p", { class: "chosen muted" });
  const btn = h("button", { type: "submit", class: "btn btn-primary" }, "Classify");
  const clearBtn = h("button", { type: "button", class: "btn btn-ghost", onclick: () => { files = []; renderChosen(); clear(results); } }, "Clear");
  const zone = dropZone({
    label: "Drop one or more images to classify", describedBy: `${idPrefix}-err`,
    onFiles: (fs) => { files = fs; renderChosen(); run(); },
  });
  const form = h("form", { class: "classify", novalidate: true, onsubmit: (e) => { e.preventDefault(); run(); } },
    zone, chosen, errorSlot, h("div", { class: "form-actions" }, btn, clearBtn), results);

  function renderChosen() {
    chosen.textContent = files.length ? `${files.length} image${files.length > 1 ? "s" : ""}: ${files.map((f) => f.name).slice(0, 5).join(", ")}${files.length > 5 ? ", …" : ""}` : "No images chosen.";
    btn.disabled = !files.length;
  }

  async function run() {
    errorSlot.hidden = true;
    if (!files.length) { errorSlot.textContent = "Choose at least one image."; errorSlot.hidden = false; zone.input.focus(); return; }
    const src = taskId ? { task_id: taskId } : getSource();
    if (typeof src === "string") { errorSlot.textContent = src; errorSlot.hidden = false; return; }
    const fd = new FormData();
    for (const f of files) fd.append("files", f, f.name);
    if (src.task_id) fd.append("task_id", src.task_id);
    for (const c of src.class_names || []) fd.append("class_names", c);
    fd.append("top_k", String(TOP_K));
    clear(results).append(loading(`Classifying ${files.length} image${files.length > 1 ? "s" : ""}…`));
    results.setAttribute("aria-busy", "true"); btn.disabled = true;
    try {
      const raw = await api.classify(fd);
      const out = normClassify(raw, files);
      clear(results);
      const stageNames = { instant: "the training-free stage", tuned: "the trained model", "zero-shot": "zero-shot CLIP" };
      if (raw?.stage) results.append(h("p", { class: "muted small", "data-role": "stage", "data-stage": raw.stage }, `Answered by ${stageNames[raw.stage] || raw.stage}.`));
      if (!out.length) results.append(h("p", { class: "muted" }, "The service returned no predictions."));
      out.forEach((r) => results.append(resultCard({ ...r, top: r.top.slice(0, TOP_K) })));
      announce(out.length ? `Top label for ${out[0].filename}: ${out[0].top[0]?.label ?? "none"}.` : "No predictions.");
    } catch (err) {
      clear(results);
      const fe = err.fieldErrors?.[0];
      results.append(errorBox(fe && fe.field ? { title: err.title, message: `${fe.field}: ${fe.message}` } : err, run));
    } finally { results.setAttribute("aria-busy", "false"); btn.disabled = !files.length; }
  }

  renderChosen();
  return form;
}

export function tryView(root, { query }) {
  const preset = query.get("task") || "";
  const ctrl = new AbortController();
  let mode = "task"; // switched to zero-shot below when there is no finished task
  const select = h("select", { id: "try-task", "aria-describedby": "try-task-hint try-err" }, h("option", { value: "" }, "Loading tasks…"));
  const names = h("input", { id: "try-names", type: "text", autocomplete: "off", placeholder: "cat, dog, bird", "aria-describedby": "try-names-hint try-err" });
  const taskBox = h("div", { class: "field" }, h("label", { for: "try-task" }, "Finished task"), select,
    h("p", { class: "hint", id: "try-task-hint" }, "Tasks that finished training. Their tuned prompts classify the images."));
  const namesBox = h("div", { class: "field" }, h("label", { for: "try-names" }, "Class names"), names,
    h("p", { class: "hint", id: "try-names-hint" }, "Comma-separated. The frozen CLIP model compares each image with “a photo of a …” for each name."));
  const radios = [["task", "A finished task"], ["zero", "Zero-shot class names"]].map(([v, l]) =>
    h("label", { class: "seg" }, h("input", { type: "radio", name: "try-mode", value: v, checked: mode === v, onchange: () => { mode = v; sync(); } }), l));

  const panel = classifyPanel({
    idPrefix: "try",
    getSource: () => {
      if (mode === "task") return select.value ? { task_id: select.value } : "Choose a finished task, or switch to zero-shot class names.";
      const list = names.value.split(",").map((s) => s.trim()).filter(Boolean);
      if (list.length < 2) { names.setAttribute("aria-invalid", "true"); return "Type at least two class names, separated by commas."; }
      names.removeAttribute("aria-invalid");
      return { class_names: [...new Set(list)] };
    },
  });

  root.append(h("section", { class: "view", "aria-labelledby": "try-title" },
    h("div", { class: "view-head" }, h("h1", { id: "try-title" }, "Try it")),
    h("p", { class: "lead" }, "Classify images with a task (trained, or already answering from its training-free stage), or zero-shot with any class names you type."),
    h("div", { class: "card" },
      h("fieldset", { class: "source" }, h("legend", {}, "Classify with"),
        h("div", { class: "segmented" }, radios), taskBox, namesBox),
      panel)));

  function sync() { taskBox.hidden = mode !== "task"; namesBox.hidden = mode !== "zero"; }
  sync();

  (async () => {
    try {
      const items = [];
      let cursor;
      for (let page = 0; page < 5; page++) {
        // Every task that can answer: trained, or its training-free stage ready while it still trains
        // (or after its training failed or was cancelled, which keeps that stage).
        const data = await api.listTasks({ limit: 100, cursor }, ctrl.signal);
        const list = (Array.isArray(data) ? data : data.items || []).map(normTask).filter(canAnswer);
        items.push(...list);
        cursor = Array.isArray(data) ? null : data.next_cursor;
        if (!cursor) break;
      }
      clear(select);
      if (!items.length) {
        select.append(h("option", { value: "" }, "No task can answer yet"));
        select.disabled = true;
        if (!preset) { mode = "zero"; root.querySelector('input[name="try-mode"][value="zero"]').checked = true; sync(); }
      } else {
        select.append(h("option", { value: "" }, "Choose a task…"));
        for (const t of items) select.append(h("option", { value: t.id, selected: t.id === preset },
          `${t.name || methodName(t.method)} #${short(t.id)} · ${(t.class_names || []).slice(0, 4).join(", ")}${(t.class_names || []).length > 4 ? ", …" : ""}`));
      }
      if (preset && !items.some((t) => t.id === preset)) select.append(h("option", { value: preset, selected: true }, `Task #${short(preset)}`));
    } catch (err) {
      if (err.name === "AbortError") return;
      clear(select).append(h("option", { value: preset }, preset ? `Task #${short(preset)}` : "Could not load tasks"));
      taskBox.append(errorBox(err));
    }
  })();

  return () => ctrl.abort();
}

function canAnswer(task) {
  return task.status === "succeeded" || task.stages?.instant?.state === "ready";
}
