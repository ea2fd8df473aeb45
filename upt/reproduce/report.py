"""results.csv and a Markdown report in the shapes of the paper's Table 1 and Table 2.

Cells are mean ± std over seeds (np.std, as CoOp's parse_test_res.py) of the accuracy in %, with the
paper's number beside in brackets, read from `paper_results.json` in this package.
"""

from __future__ import annotations

import csv
import json
import statistics
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..datasets import DATASETS, FEW_SHOT_DATASETS, IMAGENET_VARIANTS
from ..methods.config import ZERO_SHOT

CSV_COLUMNS = ("dataset", "method", "shots", "seed", "test_set", "accuracy", "val_accuracy", "train_count", "epochs",
               "train_seconds")
METHOD_TITLES = {ZERO_SHOT: "Zero-shot CLIP", "coop": "CoOp", "cocoop": "CoCoOp", "vpt-shallow": "VPT-shallow",
                 "vpt-deep": "VPT-deep", "joint": "Joint Training", "shared": "Shared", "mlp": "MLP", "upt": "UPT"}
TABLE1_TITLES = {"imagenet": "ImageNet", "imagenetv2": "-V2", "imagenet_sketch": "-S", "imagenet_a": "-A",
                 "imagenet_r": "-R"}
PAPER_BACKBONE = ("ViT-B-16", "openai")


def paper_results() -> dict[str, dict[str, dict[str, float]]]:
    """{"table1"|"table2": {method: {column: accuracy %}}}, the paper's numbers."""
    raw = json.loads(resources.files(__package__).joinpath("paper_results.json").read_text())
    return {table: {method: dict(zip(raw[table]["columns"], values)) for method, values in raw[table]["rows"].items()}
            for table in ("table1", "table2")}


@dataclass(frozen=True)
class Cell:
    values: tuple[float, ...]  # accuracy in % per seed

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        return statistics.pstdev(self.values)

    def text(self, paper: float | None) -> str:
        ours = f"{self.mean:.2f} ± {self.std:.2f}" if self.values else "—"
        return ours if paper is None else f"{ours} ({paper:.2f})"


def rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per run and test set."""
    out = []
    for result in results:
        for test_set, accuracy in result["accuracy"].items():
            out.append({"dataset": result["dataset"], "method": result["method"], "shots": result["shots"],
                        "seed": result["seed"], "test_set": test_set, "accuracy": accuracy,
                        **{key: result.get(key) for key in ("val_accuracy", "train_count", "epochs", "train_seconds")}})
    return out


def write_csv(results: list[dict[str, Any]], path: Path) -> Path:
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows(results))
    return path


def cells(results: list[dict[str, Any]]) -> dict[tuple[str, str, int, str], Cell]:
    """(training data set, method, shots, test set) -> accuracies in % over seeds."""
    grouped: dict[tuple[str, str, int, str], list[float]] = {}
    for row in rows(results):
        key = (row["dataset"], row["method"], row["shots"], row["test_set"])
        grouped.setdefault(key, []).append(100 * row["accuracy"])
    return {key: Cell(tuple(values)) for key, values in grouped.items()}


def write_report(results: list[dict[str, Any]], path: Path, plots: dict[str, Path] | None = None) -> Path:
    table = cells(results)
    backbone = results[0]["backbone"] if results else {"model": "?", "pretrained": "?", "weights_sha256": "?"}
    lines = ["# upt reproduce: report", "",
             f"Backbone `{backbone['model']}` with weights `{Path(str(backbone['pretrained'])).name}` "
             f"(sha256 `{str(backbone['weights_sha256'])[:12]}`). Accuracy (%) on each test split, mean ± std over "
             f"seeds; the paper's number in brackets.", ""]
    if (backbone["model"], backbone["pretrained"]) != PAPER_BACKBONE:
        lines += [f"> These numbers come from `{backbone['model']}`, not the paper's ViT-B/16 with OpenAI's weights: "
                  "they are not comparable with the bracketed ones.", ""]
    links = {name: str(Path(png).relative_to(path.parent)) for name, png in (plots or {}).items()}
    lines += _table1(table) + _table2(table) + _by_shots(table, links)
    path.write_text("\n".join(lines) + "\n")
    return path


def _table1(table: dict[tuple[str, str, int, str], Cell]) -> list[str]:
    dg = {key: cell for key, cell in table.items() if key[0] == "imagenet" and key[2] == 16}
    if not any(key[3] in IMAGENET_VARIANTS for key in dg):
        return []
    paper = paper_results()["table1"]
    methods = _ordered(paper, {key[1] for key in dg if key[3] in IMAGENET_VARIANTS})
    header = ["#", "Method", *TABLE1_TITLES.values(), "Average", "OOD Average"]
    out = ["## Table 1: domain generalisation (trained on ImageNet, 16 shots)", "", _row(header),
           _row(["---"] * len(header))]
    for number, method in enumerate(methods, 1):
        got = {test: dg.get(("imagenet", method, 16, test), Cell(())) for test in TABLE1_TITLES}
        means = [cell.mean for cell in got.values() if cell.values]
        full = len(means) == len(TABLE1_TITLES)
        ood = [got[test].mean for test in IMAGENET_VARIANTS] if full else []
        marks = paper.get(method, {})
        out.append(_row([str(number), METHOD_TITLES.get(method, method),
                         *(got[test].text(marks.get(test)) for test in TABLE1_TITLES),
                         _average(means if full else [], marks.get("average")),
                         _average(ood, marks.get("ood_average"))]))
    return out + [""]


def _table2(table: dict[tuple[str, str, int, str], Cell]) -> list[str]:
    own = {key: cell for key, cell in table.items() if key[0] == key[3] and key[1] != ZERO_SHOT}
    if not own:
        return []
    shots = 16 if any(key[2] == 16 for key in own) else max(key[2] for key in own)
    paper = paper_results()["table2"] if shots == 16 else {}
    datasets = [name for name in FEW_SHOT_DATASETS if any(key[0] == name for key in own)]
    datasets += sorted({key[0] for key in own} - set(datasets))
    methods = _ordered(paper, {key[1] for key in own if key[2] == shots})
    title = "16 shots" if shots == 16 else f"{shots} shots (the paper's are at 16: no numbers beside)"
    header = ["#", "Method", *(DATASETS[name].title if name in DATASETS else name for name in datasets), "Average"]
    out = [f"## Table 2: few-shot accuracy, {title}", "", _row(header), _row(["---"] * len(header))]
    for number, method in enumerate(methods, 1):
        got = [own.get((name, method, shots, name), Cell(())) for name in datasets]
        means = [cell.mean for cell in got if cell.values]
        complete = len(means) == len(FEW_SHOT_DATASETS)  # the paper's average is over its 11 data sets
        marks = paper.get(method, {})
        average = _average(means, marks.get("average") if complete else None)
        if means and not complete:
            average += f" over {len(means)} of {len(FEW_SHOT_DATASETS)}"
        out.append(_row([str(number), METHOD_TITLES.get(method, method),
                         *(cell.text(marks.get(name)) for name, cell in zip(datasets, got)), average]))
    return out + [""]


def _by_shots(table: dict[tuple[str, str, int, str], Cell], plots: dict[str, str]) -> list[str]:
    own = {key: cell for key, cell in table.items() if key[0] == key[3]}
    if not own:
        return []
    out = ["## Accuracy by shots (the paper's Figure 4)", ""]
    for name in sorted({key[0] for key in own}, key=_dataset_order):
        shots = sorted({key[2] for key in own if key[0] == name and key[2] > 0})
        methods = _ordered({}, {key[1] for key in own if key[0] == name})
        header = ["Method", *(f"{k} shot{'s' if k > 1 else ''}" for k in shots)]
        out += [f"### {DATASETS[name].title if name in DATASETS else name}", ""]
        if name in plots:
            out += [f"![{name}: accuracy by shots]({plots[name]})", ""]
        out += [_row(header), _row(["---"] * len(header))]
        for method in methods:
            if method == ZERO_SHOT:  # trains nothing: the same number at every shot count
                cell = own[(name, method, 0, name)]
                out.append(_row([METHOD_TITLES[method], *(cell.text(None) for _ in shots)]))
                continue
            out.append(_row([METHOD_TITLES.get(method, method),
                             *(own.get((name, method, k, name), Cell(())).text(None) for k in shots)]))
        out.append("")
    return out


def _ordered(paper: dict[str, Any], methods: set[str]) -> list[str]:
    """The paper's rows first, in its order, then any other method run."""
    order = list(METHOD_TITLES)
    return sorted(set(paper) | methods, key=lambda m: (m not in paper, order.index(m) if m in order else len(order), m))


def _dataset_order(name: str) -> tuple[int, str]:
    return (FEW_SHOT_DATASETS.index(name) if name in FEW_SHOT_DATASETS else len(FEW_SHOT_DATASETS), name)


def _average(means: list[float], paper: float | None) -> str:
    ours = f"{statistics.fmean(means):.2f}" if means else "—"
    return ours if paper is None else f"{ours} ({paper:.2f})"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"
