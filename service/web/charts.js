// SVG plot of loss and accuracy per epoch, a confusion matrix and per-class bars. Plain DOM, no library.
import { h, pct, fmtNum } from "./dom.js";

const PAD = { l: 48, r: 48, t: 16, b: 36 };

/** Loss (left axis) and accuracy (right axis, 0–100%) per epoch; drawn at the container's width so text stays legible. */
export function lossAccChart(events, { epochs, width } = {}) {
  const W = Math.round(Math.min(640, Math.max(280, width || 640)));
  const H = W < 480 ? 220 : 260;
  const pts = events.filter((e) => e.epoch !== null);
  const maxEpoch = Math.max(epochs || 0, ...pts.map((e) => e.epoch), 1);
  const minEpoch = Math.min(1, ...pts.map((e) => e.epoch));
  const losses = pts.map((e) => e.loss).filter((x) => x !== null);
  const maxLoss = niceCeil(Math.max(...losses, 0.1));
  const x = (ep) => PAD.l + ((ep - minEpoch) / Math.max(1, maxEpoch - minEpoch)) * (W - PAD.l - PAD.r);
  const yL = (v) => PAD.t + (1 - v / maxLoss) * (H - PAD.t - PAD.b);
  const yA = (v) => PAD.t + (1 - v) * (H - PAD.t - PAD.b);

  const g = [];
  for (let i = 0; i <= 4; i++) {
    const y = PAD.t + (i / 4) * (H - PAD.t - PAD.b);
    g.push(h("svg:line", { x1: PAD.l, x2: W - PAD.r, y1: y, y2: y, class: "grid" }));
    g.push(h("svg:text", { x: PAD.l - 6, y: y + 4, "text-anchor": "end", class: "tick loss-tick" }, fmtNum(maxLoss * (1 - i / 4), 2)));
    g.push(h("svg:text", { x: W - PAD.r + 6, y: y + 4, "text-anchor": "start", class: "tick acc-tick" }, `${100 - i * 25}%`));
  }
  const step = Math.max(1, Math.ceil((maxEpoch - minEpoch + 1) / Math.max(2, Math.floor(W / 60))));
  for (let ep = minEpoch; ep <= maxEpoch; ep += step) {
    g.push(h("svg:text", { x: x(ep), y: H - PAD.b + 16, "text-anchor": "middle", class: "tick" }, String(ep)));
  }
  g.push(h("svg:text", { x: (W + PAD.l - PAD.r) / 2, y: H - 4, "text-anchor": "middle", class: "axis-title" }, "epoch"));

  const series = (key, y, cls) => {
    const s = pts.filter((e) => e[key] !== null);
    if (!s.length) return [];
    const d = s.map((e, i) => `${i ? "L" : "M"}${x(e.epoch).toFixed(1)},${y(e[key]).toFixed(1)}`).join("");
    return [h("svg:path", { d, class: ["line", cls] }),
      ...s.map((e) => h("svg:circle", { cx: x(e.epoch), cy: y(e[key]), r: 3.5, class: ["pt", cls] },
        h("svg:title", {}, `epoch ${e.epoch}: ${key.replace("_", " ")} ${key === "loss" ? fmtNum(e[key]) : pct(e[key], 1)}`)))];
  };

  const last = pts[pts.length - 1];
  const summary = pts.length
    ? `Training curve over ${pts.length} epoch${pts.length > 1 ? "s" : ""}. Latest epoch ${last.epoch}: loss ${fmtNum(last.loss)}, accuracy ${pct(last.accuracy, 1)}.`
    : "No epochs recorded yet.";
  const hasVal = pts.some((e) => e.val_accuracy !== null);
  const figure = h("figure", { class: "chart" },
    h("svg:svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": summary, class: "chart-svg", preserveAspectRatio: "xMidYMid meet" },
      ...g,
      ...series("loss", yL, "loss"),
      ...series("accuracy", yA, "acc"),
      ...series("val_accuracy", yA, "val")),
    h("figcaption", { class: "legend" },
      h("span", { class: "key loss" }, "loss (left axis)"),
      h("span", { class: "key acc" }, "training accuracy (right axis)"),
      hasVal ? h("span", { class: "key val" }, "validation accuracy") : null),
    pts.length ? h("details", { class: "chart-data" },
      h("summary", {}, "Show the numbers"),
      h("table", { class: "data-table" },
        h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Epoch"), h("th", { scope: "col" }, "Loss"), h("th", { scope: "col" }, "Accuracy"),
          hasVal ? h("th", { scope: "col" }, "Val. accuracy") : null, h("th", { scope: "col" }, "LR"))),
        h("tbody", {}, pts.map((e) => h("tr", {}, h("td", {}, e.epoch), h("td", {}, fmtNum(e.loss)), h("td", {}, pct(e.accuracy, 1)),
          hasVal ? h("td", {}, pct(e.val_accuracy, 1)) : null, h("td", {}, e.lr !== undefined && e.lr !== null ? Number(e.lr).toExponential(2) : "–")))))) : null);
  return figure;
}

function niceCeil(v) {
  if (!(v > 0)) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 4, 6, 8, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

/** Confusion matrix as a table: rows are true classes, columns predicted; shade by row share. */
export function confusionMatrix(matrix, names) {
  if (!Array.isArray(matrix) || !matrix.length) return null;
  const n = matrix.length;
  names = names && names.length === n ? names : matrix.map((_, i) => `class ${i}`);
  const rows = matrix.map((r) => r.map((v) => Number(v) || 0));
  return h("div", { class: "cm-wrap", tabindex: "0", role: "region", "aria-label": "Confusion matrix (scrollable)" },
    h("table", { class: "cm" },
      h("caption", {}, "Confusion matrix: rows are the true class, columns the predicted class. Darker cells hold a larger share of the row."),
      h("thead", {}, h("tr", {}, h("th", { scope: "col", class: "cm-corner" }, "true ╲ predicted"),
        names.map((nm) => h("th", { scope: "col", class: "cm-col" }, h("span", {}, nm))))),
      h("tbody", {}, rows.map((r, i) => {
        const total = r.reduce((a, b) => a + b, 0) || 1;
        return h("tr", {}, h("th", { scope: "row" }, names[i]),
          r.map((v, j) => {
            const share = v / total;
            return h("td", {
              class: [i === j ? "diag" : "off", share > 0.5 && "dark"],
              style: { "--share": share.toFixed(3) },
              title: `true ${names[i]}, predicted ${names[j]}: ${fmtCount(v)} (${pct(share)})`,
            }, fmtCount(v));
          }));
      }))));
}

function fmtCount(v) { return Number.isInteger(v) ? String(v) : v.toFixed(2); }

/** Horizontal bars of per-class accuracy. */
/** method=auto's leaderboard: validation accuracy per candidate, the winner marked. */
export function leaderboardBars(auto) {
  const rows = Array.isArray(auto?.leaderboard) ? auto.leaderboard : [];
  if (!rows.length) return null;
  return h("div", { class: "leaderboard", "data-role": "leaderboard" },
    h("ul", { class: "per-class" }, rows.map((r) => {
      const v = r.val_accuracy === null || r.val_accuracy === undefined ? null : Number(r.val_accuracy);
      const won = r.method === auto.winner;
      return h("li", { class: won ? "winner" : "", "data-method": r.method },
        h("span", { class: "pc-name" }, won ? `★ ${r.method}` : r.method),
        h("span", { class: "bar", role: "img", "aria-label": `${r.method}: ${v === null ? "no validation images" : pct(v, 1)}${won ? ", chosen" : ""}` },
          h("span", { class: "bar-fill", style: { width: `${Math.max(0, Math.min(1, v ?? 0)) * 100}%` } })),
        h("span", { class: "pc-val" }, v === null ? "n/a" : pct(v, 1) + (r.val_stderr ? ` ± ${pct(r.val_stderr, 1)}` : "")));
    })),
    h("p", { class: "muted small", "data-role": "val-count" },
      `Chosen: ${auto.winner}, the cheapest candidate that no other beats by more than one standard error, on ${auto.val_count} held-out image${auto.val_count === 1 ? "" : "s"}.`));
}

export function perClassBars(per, names) {
  let entries;
  const val = (v) => (v === null || v === undefined || !Number.isFinite(Number(v)) ? null : Number(v));
  if (Array.isArray(per)) entries = per.map((v, i) => [names?.[i] ?? `class ${i}`, val(v)]);
  else if (per && typeof per === "object") entries = Object.entries(per).map(([k, v]) => [k, val(v)]);
  else return null;
  return h("ul", { class: "per-class" }, entries.map(([name, v]) => h("li", {},
    h("span", { class: "pc-name" }, name),
    h("span", { class: "bar", role: "img", "aria-label": v === null ? `${name}: no validation images` : `${name}: ${pct(v, 1)}` },
      h("span", { class: "bar-fill", style: { width: `${Math.max(0, Math.min(1, v ?? 0)) * 100}%` } })),
    h("span", { class: "pc-val" }, v === null ? "n/a" : pct(v, 1)))));
}
