// Create a task: classes with their images (or one zip of class folders), a method, options.
// API validation errors (problem+json errors[].field) are shown next to the matching field.
import { api, randomId, normTask } from "../api.js";
import { h, clear, announce } from "../dom.js";
import { classesFromFolders, dropZone, loadMethods, RECOMMENDED_METHOD } from "../widgets.js";

// The draft survives navigating away and back (files stay in memory until the page reloads).
const draft = { mode: "classes", classes: [], archive: null, method: RECOMMENDED_METHOD, shots: "", epochs: "", seed: "", more: {}, idem: null };
// Shown when the chosen method takes them (zero-shot and Tip-Adapter take no epochs); its other options
// (GET /methods) are under "More options". Only the chosen method's options are sent: POST /tasks
// refuses one that the method does not use (a 422 naming it).
const BASIC = ["shots", "epochs", "seed"];

const FIELD_SLOTS = { class_names: "classes", labels: "images", files: "images", archive: "archive", method: "method", shots: "shots", epochs: "epochs", seed: "seed" };

export function createView(root) {
  const form = h("form", { class: "create-form", novalidate: true, "aria-labelledby": "create-title" });
  const topError = h("div", { class: "form-error", role: "alert", hidden: true, tabindex: "-1" });
  const errSlot = (name) => h("p", { class: "field-error", id: `err-${name}`, hidden: true });
  const FIXED_SLOTS = ["classes", "images", "archive", "method", ...BASIC];
  const slots = Object.fromEntries(FIXED_SLOTS.map((n) => [n, errSlot(n)]));

  // ---- classes ----
  const nameInput = h("input", { id: "class-name", type: "text", autocomplete: "off", placeholder: "e.g. sneaker", "aria-describedby": "class-name-hint err-classes" });
  const addBtn = h("button", { type: "button", class: "btn", onclick: addClass }, "Add class");
  nameInput.addEventListener("keydown", (e) => { if (e.key === "Enter") { e.preventDefault(); addClass(); } });
  const classList = h("ol", { class: "class-list", "aria-label": "Classes" });
  const folderZone = dropZone({
    label: "Or drop a folder of class folders", folders: true, describedBy: "err-classes",
    hint: "One class per sub-folder, named after it (pets/cat/1.png is a cat). Drop it here, or press Enter to choose it.",
    onFiles: addFolders,
  });
  folderZone.classList.add("folder-zone");
  const classesBox = h("div", { class: "mode-panel", id: "panel-classes" }, folderZone,
    h("div", { class: "field" },
      h("label", { for: "class-name" }, "Class name"),
      h("div", { class: "inline" }, nameInput, addBtn),
      h("p", { class: "hint", id: "class-name-hint" }, "Add each class by name (Enter adds it; commas add several), then drop a few images on each (a zero-shot task uses them to measure accuracy)."),
      slots.classes),
    classList, slots.images);

  // ---- archive ----
  const archiveInfo = h("p", { class: "archive-info", "aria-live": "polite" });
  const archiveZone = dropZone({
    label: "Drop one zip of class folders", hint: "Laid out as <class name>/<image> inside the zip. Drop it here, or press Enter to choose.",
    accept: ".zip,application/zip,application/x-zip-compressed", multiple: false, name: "archive", describedBy: "err-archive",
    onFiles: (files) => { draft.archive = files[0]; renderArchive(); clearErrors(); },
  });
  const archiveBox = h("div", { class: "mode-panel", id: "panel-archive" }, archiveZone, archiveInfo, slots.archive);

  const modeRadios = [["classes", "Images per class"], ["archive", "One zip file"]].map(([v, label]) =>
    h("label", { class: "seg" }, h("input", { type: "radio", name: "mode", value: v, checked: draft.mode === v, onchange: () => { draft.mode = v; renderMode(); } }), label));

  // ---- method: the cards come from GET /methods ----
  let methods = [];
  const methodStatus = h("p", { class: "muted method-status", role: "status" }, "Loading the methods…");
  const methodField = h("fieldset", { class: "methods", "aria-describedby": "err-method" },
    h("legend", {}, "Method"), methodStatus, slots.method);
  const chosen = () => methods.find((m) => m.name === draft.method);
  const optionSpec = (name) => (chosen()?.options || []).find((o) => o.name === name)
    || methods.flatMap((m) => m.options).find((o) => o.name === name);
  // Until the methods are loaded nothing says otherwise: the basic options are shown and sent.
  const takes = (name) => !chosen() || chosen().options.some((o) => o.name === name);
  const sentence = (text) => text.charAt(0).toUpperCase() + text.slice(1) + ".";

  function showMethods() {
    loadMethods().then((list) => {
      methods = list;
      if (!methods.some((m) => m.name === draft.method)) draft.method = methods[0]?.name;
      methodStatus.remove();
      methodField.insertBefore(h("div", { class: "method-cards", style: { display: "contents" } },
        methods.map((m) => h("label", { class: "method" },
          h("input", { type: "radio", name: "method", value: m.name, checked: draft.method === m.name, onchange: () => { draft.method = m.name; clearError("method"); renderMore(); } }),
          h("span", { class: "method-name" }, m.title, m.name === RECOMMENDED_METHOD ? h("span", { class: "tag" }, "recommended") : null),
          h("span", { class: "method-line" }, m.description)))), slots.method);
      for (const name of BASIC) {
        const spec = optionSpec(name);
        const input = form.querySelector(`#opt-${name}`);
        if (!spec || !input) continue;
        form.querySelector(`#hint-${name}`).textContent = sentence(spec.help);
        if (spec.minimum !== null) input.min = String(spec.minimum);
      }
      renderMore();
    }).catch((err) => {
      clear(methodStatus).append(`The methods could not be loaded (${err.message}). `,
        h("button", { type: "button", class: "btn btn-sm", onclick: () => { methodStatus.textContent = "Loading the methods…"; showMethods(); } }, "Retry"));
    });
  }

  // ---- options ----
  const numField = (name, label, hint, attrs) => {
    const input = h("input", { id: `opt-${name}`, name, type: "number", inputmode: "numeric", value: draft[name], "aria-describedby": `hint-${name} err-${name}`, ...attrs,
      oninput: (e) => { draft[name] = e.target.value; clearError(name); } });
    return h("div", { class: "field" }, h("label", { for: `opt-${name}` }, label), input, h("p", { class: "hint", id: `hint-${name}` }, hint), slots[name]);
  };
  const moreGrid = h("div", { class: "grid3" });
  const more = h("details", { class: "more-options" }, h("summary", {}, "More options for this method"), moreGrid);
  const options = h("fieldset", { class: "options" }, h("legend", {}, "Options ", h("span", { class: "muted" }, "(optional)")),
    h("div", { class: "grid3" },
      numField("shots", "Shots", "Images per class used for training (few-shot K). Default: all you gave.", { min: "1", step: "1", placeholder: "all" }),
      numField("epochs", "Epochs", "Passes over the shots. Default: the method's own.", { min: "1", step: "1", placeholder: "default" }),
      numField("seed", "Seed", "Fixes the sampling of shots and the initialisation.", { min: "0", step: "1", placeholder: "1" })),
    more);

  /** The chosen method's options: the BASIC fields it takes (the others hidden, and not sent), and its
   * options beyond BASIC, as GET /methods describes them (type, default, help). */
  function renderMore() {
    for (const name of BASIC) {
      form.querySelector(`#opt-${name}`).closest(".field").hidden = !takes(name);
      if (!takes(name)) clearError(name);
    }
    clear(moreGrid);
    for (const name of Object.keys(slots)) if (!FIXED_SLOTS.includes(name)) delete slots[name];
    const extra = (chosen()?.options || []).filter((o) => !BASIC.includes(o.name));
    more.hidden = !extra.length;
    for (const o of extra) {
      slots[o.name] = errSlot(o.name);
      const numeric = o.type !== "string";
      const input = h("input", { id: `opt-${o.name}`, name: o.name, type: numeric ? "number" : "text", value: draft.more[o.name] || "",
        placeholder: o.default === null ? "default" : String(o.default), step: o.type === "integer" ? "1" : "any",
        "aria-describedby": `hint-${o.name} err-${o.name}`,
        oninput: (e) => { draft.more[o.name] = e.target.value; clearError(o.name); } });
      if (numeric && o.minimum !== null) input.min = String(o.minimum);
      if (numeric && o.maximum !== null) input.max = String(o.maximum);
      moreGrid.append(h("div", { class: "field" }, h("label", { for: `opt-${o.name}` }, o.name.replace(/_/g, " ")), input,
        h("p", { class: "hint", id: `hint-${o.name}` }, sentence(o.help)), slots[o.name]));
    }
  }

  const submit = h("button", { type: "submit", class: "btn btn-primary btn-lg" }, "Create task");
  const status = h("p", { class: "submit-status", role: "status", "aria-live": "polite" });

  form.append(topError,
    h("fieldset", { class: "data" }, h("legend", {}, "Classes and images"),
      h("div", { class: "segmented", role: "radiogroup", "aria-label": "How to give images" }, modeRadios),
      classesBox, archiveBox),
    methodField, options,
    h("div", { class: "form-actions" }, submit, h("a", { href: "#/", class: "btn btn-ghost" }, "Cancel"), status));
  form.addEventListener("submit", onSubmit);

  root.append(h("section", { class: "view" },
    h("div", { class: "view-head" }, h("h1", { id: "create-title" }, "New task")),
    h("p", { class: "lead" }, "Adapt the frozen CLIP model to your own classes from a few labelled images per class."),
    form));

  renderMode(); renderClasses(); renderArchive(); showMethods();

  function renderMode() {
    classesBox.hidden = draft.mode !== "classes";
    archiveBox.hidden = draft.mode !== "archive";
  }

  function addClass() {
    const names = nameInput.value.split(",").map((s) => s.trim()).filter(Boolean);
    if (!names.length) { showError("classes", "Type a class name first."); nameInput.focus(); return; }
    const dup = names.find((n) => draft.classes.some((c) => c.name.toLowerCase() === n.toLowerCase()));
    if (dup) { showError("classes", `“${dup}” is already a class.`); nameInput.focus(); return; }
    for (const n of names) draft.classes.push({ name: n, files: [] });
    nameInput.value = "";
    clearErrors();
    renderClasses();
    announce(`Added ${names.join(", ")}. ${draft.classes.length} classes.`);
    nameInput.focus();
  }

  /** A dropped folder: one class per sub-folder; images of a class that exists already are added to it. */
  function addFolders(files) {
    const found = classesFromFolders(files);
    if (!found.length) { showError("classes", "No images in sub-folders there: put each class's images in a folder named after it."); return; }
    for (const [name, images] of found) {
      const known = draft.classes.find((c) => c.name.toLowerCase() === name.toLowerCase());
      if (known) known.files.push(...images); else draft.classes.push({ name, files: images });
    }
    clearErrors();
    renderClasses();
    const count = found.reduce((n, [, images]) => n + images.length, 0);
    announce(`${found.length} class${found.length > 1 ? "es" : ""} from the folder (${found.map(([n]) => n).join(", ")}), ${count} images.`);
  }

  function renderClasses() {
    clear(classList);
    if (!draft.classes.length) {
      classList.append(h("li", { class: "class-empty" }, "No classes yet."));
      return;
    }
    draft.classes.forEach((c, i) => {
      const zone = dropZone({
        label: `Images of “${c.name}”`, describedBy: "err-images",
        hint: c.files.length ? `${c.files.length} image${c.files.length > 1 ? "s" : ""}. Drop or press Enter to add more.` : "Drop images here, or press Enter to choose.",
        onFiles: (files) => {
          c.files.push(...files); renderClasses(); clearErrors();
          announce(`${files.length} image${files.length > 1 ? "s" : ""} added to ${c.name}; ${c.files.length} in all.`);
          classList.querySelectorAll(".dz-input")[i]?.focus();
        },
      });
      const thumbs = h("ul", { class: "thumbs", "aria-label": `Images of ${c.name}` },
        c.files.slice(0, 12).map((f) => {
          const img = h("img", { alt: f.name, src: URL.createObjectURL(f), loading: "lazy" });
          img.addEventListener("load", () => URL.revokeObjectURL(img.src), { once: true });
          return h("li", {}, img);
        }),
        c.files.length > 12 ? h("li", { class: "more" }, `+${c.files.length - 12}`) : null);
      classList.append(h("li", { class: "class-card", dataset: { className: c.name } },
        h("div", { class: "class-head" },
          h("h3", {}, c.name, h("span", { class: "count" }, `${c.files.length} image${c.files.length === 1 ? "" : "s"}`)),
          c.files.length ? h("button", { type: "button", class: "btn btn-ghost btn-sm", onclick: () => {
            c.files = []; renderClasses(); announce(`Removed the images of ${c.name}.`);
            classList.querySelectorAll(".dz-input")[i]?.focus();
          }, "aria-label": `Remove the images of ${c.name}` }, "Clear images") : null,
          h("button", { type: "button", class: "btn btn-ghost btn-sm", "aria-label": `Remove class ${c.name}`, onclick: () => {
            draft.classes.splice(i, 1); renderClasses(); announce(`Removed ${c.name}.`); nameInput.focus();
          } }, "Remove")),
        zone, c.files.length ? thumbs : null));
    });
  }

  function renderArchive() {
    archiveInfo.textContent = draft.archive ? `Chosen: ${draft.archive.name} (${(draft.archive.size / 1024).toFixed(0)} KiB)` : "No zip chosen.";
  }

  function showError(slot, message) {
    const el = slots[slot];
    el.textContent = message; el.hidden = false;
    const inputs = { classes: [nameInput], images: [...classList.querySelectorAll(".dz-input")], archive: [archiveZone.input], method: [...methodField.querySelectorAll("input")] }[slot] || [form.querySelector(`#opt-${slot}`)];
    if (moreGrid.contains(el)) more.open = true;
    inputs.forEach((x) => x?.setAttribute("aria-invalid", "true"));
    el.closest(".field, fieldset, .mode-panel")?.classList.add("has-error");
  }

  /** The user is fixing one field: drop its message, and the summary once no field is marked. */
  function clearError(slot) {
    const el = slots[slot];
    if (!el || el.hidden) return;
    el.hidden = true; el.textContent = "";
    el.closest(".has-error")?.classList.remove("has-error");
    form.querySelector(`#opt-${slot}`)?.removeAttribute("aria-invalid");
    if (!Object.values(slots).some((x) => !x.hidden)) { topError.hidden = true; clear(topError); }
  }

  function clearErrors() {
    topError.hidden = true; clear(topError);
    for (const el of Object.values(slots)) { el.hidden = true; el.textContent = ""; el.closest(".has-error")?.classList.remove("has-error"); }
    form.querySelectorAll("[aria-invalid]").forEach((x) => x.removeAttribute("aria-invalid"));
  }

  function showTop(title, lines) {
    clear(topError);
    topError.append(h("p", {}, h("strong", {}, title)));
    if (lines?.length) topError.append(h("ul", {}, lines.map((l) => h("li", {}, l))));
    topError.hidden = false;
    topError.focus();
  }

  function buildForm() {
    const fd = new FormData();
    if (draft.mode === "archive") {
      if (draft.archive) fd.append("archive", draft.archive, draft.archive.name);
    } else {
      for (const c of draft.classes) fd.append("class_names", c.name);
      for (const c of draft.classes) for (const f of c.files) { fd.append("files", f, f.name); fd.append("labels", c.name); }
    }
    fd.append("method", draft.method);
    for (const k of BASIC) if (takes(k) && String(draft[k]).trim() !== "") fd.append(k, String(draft[k]).trim());
    for (const o of chosen()?.options || []) {
      const v = String(draft.more[o.name] ?? "").trim();
      if (!BASIC.includes(o.name) && v !== "") fd.append(o.name, v);
    }
    return fd;
  }

  function localCheck() {
    const errs = [];
    if (draft.mode === "classes") {
      if (!draft.classes.length) errs.push(["classes", "Add at least one class."]);
      else if (draft.classes.length < 2) errs.push(["classes", "Add at least two classes."]);
      else {
        const empty = draft.classes.filter((c) => !c.files.length).map((c) => c.name);
        if (empty.length) errs.push(["images", `Drop at least one image on: ${empty.join(", ")}.`]);
      }
    } else if (!draft.archive) errs.push(["archive", "Choose a zip file."]);
    for (const k of BASIC.filter(takes)) {
      const v = String(draft[k]).trim();
      const minimum = optionSpec(k)?.minimum ?? (k === "seed" ? 0 : 1);
      if (v !== "" && !/^\d+$/.test(v)) errs.push([k, "Enter a whole number."]);
      else if (v !== "" && Number(v) < minimum) errs.push([k, `Must be at least ${minimum}.`]);
    }
    for (const o of (chosen()?.options || []).filter((x) => !BASIC.includes(x.name) && x.type !== "string")) {
      const v = String(draft.more[o.name] ?? "").trim();
      if (v !== "" && !(o.type === "integer" ? /^-?\d+$/.test(v) : Number.isFinite(Number(v)))) {
        errs.push([o.name, o.type === "integer" ? "Enter a whole number." : "Enter a number."]);
      }
    }
    return errs;
  }

  async function onSubmit(e) {
    e.preventDefault();
    clearErrors();
    const local = localCheck();
    if (local.length) {
      local.forEach(([slot, msg]) => showError(slot, msg));
      showTop("Please fix the highlighted fields.", local.map(([, m]) => m));
      return;
    }
    // One idempotency key per draft: a retried submit after a network error cannot create a twin task.
    draft.idem = draft.idem || randomId();
    submit.disabled = true; submit.classList.add("busy"); form.setAttribute("aria-busy", "true");
    const n = draft.classes.reduce((a, c) => a + c.files.length, 0);
    const what = draft.mode === "archive" ? "the zip" : `${n} image${n === 1 ? "" : "s"}`;
    const bar = h("progress", { max: "100", value: "0", "aria-label": "Upload progress" });
    clear(status).append(`Uploading ${what}… `, bar);
    try {
      const task = normTask(await api.createTask(buildForm(), draft.idem, (f) => {
        bar.value = Math.round(f * 100);
        if (f >= 1) { clear(status).append("Uploaded; the service is checking the images…"); }
      }));
      status.textContent = "Task created.";
      Object.assign(draft, { classes: [], archive: null, idem: null });
      announce("Task created. Opening it.");
      location.hash = task?.id ? `#/tasks/${encodeURIComponent(task.id)}` : "#/";
    } catch (err) {
      status.textContent = "";
      if (err.status === 0) { showTop("Could not reach the service.", [err.message]); return; }
      draft.idem = null; // the service answered: a corrected form is a new request
      const unmatched = [];
      for (const fe of err.fieldErrors) {
        const slot = FIELD_SLOTS[fe.field] || (slots[fe.field] ? fe.field : null);
        if (slot) showError(slot, fe.message); else unmatched.push(fe.field ? `${fe.field}: ${fe.message}` : fe.message);
      }
      if (!err.fieldErrors.length || unmatched.length) showTop(err.title && err.title !== err.message ? `${err.title}: ${err.message}` : err.message, unmatched);
      else showTop("The service refused the task: please fix the highlighted fields.", []);
      const firstBad = form.querySelector("[aria-invalid=true]");
      if (firstBad && err.fieldErrors.length && !unmatched.length) firstBad.focus();
    } finally {
      submit.disabled = false; submit.classList.remove("busy"); form.removeAttribute("aria-busy");
    }
  }

  return () => {};
}
