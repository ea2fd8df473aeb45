// Reusable pieces: drop zones (keyboard operable: a real file input sits behind each), methods,
// top-k result cards.
import { api } from "./api.js";
import { h, pct } from "./dom.js";

let dzCount = 0;

/**
 * A drop zone backed by a file input. onFiles(File[]) is called on drop or pick.
 * Keyboard users tab to the input (the zone shows the focus ring) and press Enter or Space.
 * With `folders`, it takes folders (dropped, or picked whole): each file then has `relativePath`,
 * e.g. "pets/cat/1.png".
 */
export function dropZone({ label, hint, accept = "image/*", multiple = true, onFiles, name, describedBy, folders = false }) {
  const id = `dz-${++dzCount}`;
  const input = h("input", {
    type: "file", id, class: "visually-hidden dz-input", accept, multiple, name, webkitdirectory: folders || undefined,
    "aria-describedby": [`${id}-hint`, describedBy].filter(Boolean).join(" "),
    onchange: () => {
      const files = Array.from(input.files);
      if (folders) files.forEach((f) => { f.relativePath = f.webkitRelativePath || f.name; });
      if (files.length) onFiles(files);
      input.value = "";
    },
  });
  const zone = h("label", { class: "dropzone", for: id },
    input,
    h("span", { class: "dz-icon", "aria-hidden": "true" }, "⇪"),
    h("span", { class: "dz-label" }, label),
    h("span", { class: "dz-hint", id: `${id}-hint` }, hint || "Drop files here, or press Enter to choose"));
  let depth = 0;
  zone.addEventListener("dragenter", (e) => { e.preventDefault(); depth++; zone.classList.add("over"); });
  zone.addEventListener("dragover", (e) => { e.preventDefault(); if (e.dataTransfer) e.dataTransfer.dropEffect = "copy"; });
  zone.addEventListener("dragleave", () => { if (--depth <= 0) { depth = 0; zone.classList.remove("over"); } });
  zone.addEventListener("drop", async (e) => {
    e.preventDefault(); depth = 0; zone.classList.remove("over");
    if (folders) { const files = await droppedTree(e.dataTransfer); if (files.length) onFiles(files); return; }
    let files = Array.from(e.dataTransfer?.files || []);
    if (accept === "image/*") files = files.filter((f) => !f.type || f.type.startsWith("image/"));
    if (!multiple) files = files.slice(0, 1);
    if (files.length) onFiles(files);
  });
  zone.input = input;
  return zone;
}

/** Every file under the dropped folders (and dropped files), each with its `relativePath`. */
async function droppedTree(dataTransfer) {
  // Entries must be taken during the drop event itself: the items are gone after it returns.
  const entries = Array.from(dataTransfer?.items || []).map((item) => item.webkitGetAsEntry?.()).filter(Boolean);
  const files = [];
  const read = (fn) => new Promise((resolve, reject) => fn(resolve, reject));
  async function walk(entry, prefix) {
    if (entry.isFile) {
      const file = await read((ok, no) => entry.file(ok, no));
      file.relativePath = prefix + file.name;
      files.push(file);
      return;
    }
    const reader = entry.createReader();
    for (let batch = await read((ok, no) => reader.readEntries(ok, no)); batch.length;
      batch = await read((ok, no) => reader.readEntries(ok, no))) {
      for (const child of batch) await walk(child, `${prefix}${entry.name}/`);
    }
  }
  for (const entry of entries) await walk(entry, "");
  return files;
}

/**
 * Classes from a folder tree: one class per sub-folder of the dropped folder ("pets/cat/1.png" is a cat),
 * or, when class folders were dropped themselves ("cat/1.png"), one per folder. Non-images are skipped.
 * Returns [[className, File[]], ...] in name order.
 */
export function classesFromFolders(files) {
  const isImage = (f) => (f.type ? f.type.startsWith("image/") : /\.(png|jpe?g|webp|bmp|gif|tiff?)$/i.test(f.name));
  const parts = (f) => String(f.relativePath || f.webkitRelativePath || f.name).split("/").filter(Boolean);
  const nested = files.some((f) => parts(f).length >= 3);
  const classes = new Map();
  for (const f of files) {
    const p = parts(f);
    const name = nested ? (p.length >= 3 ? p[1] : null) : (p.length >= 2 ? p[0] : null);
    if (!name || name.startsWith(".") || !isImage(f)) continue;
    if (!classes.has(name)) classes.set(name, []);
    classes.get(name).push(f);
  }
  return [...classes.entries()].sort(([a], [b]) => a.localeCompare(b));
}

// The methods and their options come from the service (GET /methods, its method registry), so the
// cards and option fields here say what POST /tasks accepts, in the service's own words.
let methods = [];
let loading = null;

/** The service's methods, auto first: [{name, title, description, options: [{name, type, default, minimum, maximum, help}]}]. */
export function loadMethods() {
  if (!loading) {
    loading = api.methods().then((body) => { methods = body.methods || []; return methods; })
      .catch((err) => { loading = null; throw err; });
  }
  return loading;
}

/** The web client's default and recommended choice. */
export const RECOMMENDED_METHOD = "auto";

export function methodName(id) { return methods.find((m) => m.name === id)?.title || id || "–"; }

/** One image's result: thumbnail and top-k labels with probability bars. */
export function resultCard(result) {
  const img = result.file ? h("img", { src: URL.createObjectURL(result.file), alt: `Image ${result.filename}`, class: "thumb-lg" }) : null;
  if (img) img.addEventListener("load", () => URL.revokeObjectURL(img.src), { once: true });
  const best = result.top[0];
  return h("article", { class: "result-card", "aria-label": `Result for ${result.filename}` },
    h("div", { class: "result-head" }, img,
      h("div", {},
        h("h3", { class: "result-file" }, result.filename),
        best ? h("p", { class: "result-best" }, h("strong", {}, best.label), ` · ${pct(best.probability, 1)}`) : h("p", {}, "No labels returned."))),
    h("ol", { class: "topk" },
      result.top.map((p) => h("li", {},
        h("span", { class: "topk-label" }, p.label),
        h("span", { class: "bar", role: "img", "aria-label": `${p.label}: ${pct(p.probability, 1)}` },
          h("span", { class: "bar-fill", style: { width: `${Math.max(0, Math.min(1, p.probability)) * 100}%` } })),
        h("span", { class: "topk-p" }, pct(p.probability, 1))))));
}
