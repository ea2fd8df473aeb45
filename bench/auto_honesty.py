"""Is a candidate's reported validation accuracy honest, and does `auto` choose well? Prints the table.

    nice -n 5 .venv/bin/python bench/auto_honesty.py --seeds 12 --jobs 2

Data: a data set in CoOp's layout made from Debian's Fashion-MNIST test split, which the tiny CLIP
never saw (`apt-get install dataset-fashion-mnist`), every image rotated (scripts/fashion_mnist.py's
visual shift: zero-shot is weak there, so adapting matters): per class 100 train, 100 val and 500 test
images, 10 classes, each image's split drawn at random. Each seed draws 16 shots per class and min(16, 4) = 4 validation images per class
(40 a seed) as CoOp does, trains every method, and scores it on the 5,000 test images.

Printed per method: the mean validation and test accuracy over the seeds and the mean of their
difference (reported − test) with its standard error over seeds. A method whose hyper-parameters were
chosen on the validation images would show a positive bias there; the candidates that search nothing
(zero-shot, CoOp, VPT-deep) show what the same 40 images give without a search. Then `auto`'s rule
(upt.auto.pick_winner) applied to the candidates' runs of each seed: its mean test accuracy against
the best candidate's on mean, its picks and its mean regret per seed (best test − its winner's test).

Backbone: the shipped tiny CLIP (upt/weights). The prompt methods use a short schedule
(--epochs 20 --lr 0.05 --batch-size 16), as the README's method table on the tiny CLIP.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

PER_CLASS = {"train": 100, "val": 100, "test": 500}
SEARCHED = ("tip-adapter", "tip-adapter-f", "gda")
UNSEARCHED = ("zero-shot", "coop", "vpt-deep")
PROMPT_OPTIONS = dict(epochs=20, lr=0.05, batch_size=16)
SHOTS = 16


def build_dataset(root: Path) -> Path:
    """Writes the rotated test-split images as PNGs in class folders, and the split as JSON."""
    from PIL import Image

    from fashion_mnist import LABELS, read_split, visual_shift

    images, labels = read_split("test")
    split: dict[str, list] = {"train": [], "val": [], "test": []}
    # Each image's place in its class drawn at random (seeded by the class), so that the three splits are
    # exchangeable whatever the order of the file.
    position_of: dict[int, int] = {}
    for label in range(len(LABELS)):
        members = [index for index, value in enumerate(labels.tolist()) if value == label]
        order = list(range(len(members)))
        random.Random(label).shuffle(order)
        position_of.update(zip(members, order))
    for index, (image, label) in enumerate(zip(images, labels.tolist())):
        position = position_of[index]
        bounds = (PER_CLASS["train"], PER_CLASS["train"] + PER_CLASS["val"], sum(PER_CLASS.values()))
        name = "train" if position < bounds[0] else "val" if position < bounds[1] else "test"
        if position >= bounds[2]:
            continue
        relative = f"{LABELS[label]}/{index:05d}.png"
        (root / "images" / LABELS[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(visual_shift(image, index)).save(root / "images" / relative)
        split[name].append([relative, label, LABELS[label]])
    (root / "split.json").write_text(json.dumps(split))
    return root


def load_source(root: Path):
    from upt.data import LabelledImage
    from upt.datasets import DataSource

    from fashion_mnist import LABELS

    split = json.loads((root / "split.json").read_text())
    lists = {name: [LabelledImage(root / "images" / path, label) for path, label, _ in rows]
             for name, rows in split.items()}
    return DataSource("rotated-fashion-mnist", root, list(LABELS), lists["train"], lists["val"], lists["test"])


def run_seed(args: tuple[Path, int, tuple[str, ...]]) -> dict:
    """Every method on one seed: its leaderboard row (reported validation) and its test accuracy."""
    import torch

    from upt.auto import candidate_config, leaderboard_row
    from upt.backbone import load_backbone
    from upt.predict import Predictor
    from upt.tiny import PRETRAINED_TINY, TINY_MODEL
    from upt.training import TrainConfig, train

    root, seed, methods = args
    torch.set_num_threads(1)
    backbone = load_backbone(TINY_MODEL, str(PRETRAINED_TINY), "cpu")
    source = load_source(root)
    rows, test = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            config = candidate_config(TrainConfig.holding(method, shots=SHOTS, seed=seed, **PROMPT_OPTIONS), method)
            began = time.perf_counter()
            result = train(backbone, source, config, Path(tmp) / method)
            rows[method] = leaderboard_row(method, result.metrics, time.perf_counter() - began)
            test[method] = Predictor.from_artifact(backbone, result.artifact_dir).evaluate(source.test)["accuracy"]
            print(f"seed {seed} {method}: val {100 * rows[method].val_accuracy:.1f}% test {100 * test[method]:.1f}%",
                  file=sys.stderr, flush=True)
    return {"seed": seed, "rows": rows, "test": test}


def mean_se(values: list[float]) -> str:
    se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):+.1f} ± {100 * se:.1f}"


def report(runs: list[dict], methods: tuple[str, ...], candidates: tuple[str, ...]) -> None:
    from upt.auto import pick_winner

    print(f"{len(runs)} seeds, {SHOTS} shots, {runs[0]['rows'][methods[0]].val_count} validation images a seed, "
          f"{PER_CLASS['test'] * len(runs[0]['rows'][methods[0]].per_class_accuracy)} test images\n")
    print("| method | validation | test | validation − test (± SE over seeds) |")
    print("|---|---|---|---|")
    bias = {}
    for method in methods:
        val = [run["rows"][method].val_accuracy for run in runs]
        test = [run["test"][method] for run in runs]
        bias[method] = [v - t for v, t in zip(val, test)]
        print(f"| {method} | {100 * statistics.mean(val):.1f}% | {100 * statistics.mean(test):.1f}% | "
              f"{mean_se(bias[method])} |")
    plain = [m for m in UNSEARCHED if m in methods]
    if plain:
        baseline = statistics.mean(statistics.mean(bias[m]) for m in plain)
        for method in (m for m in SEARCHED if m in methods):
            excess = statistics.mean(bias[method]) - baseline
            print(f"\n{method}: bias {100 * excess:+.1f} points above the unsearched candidates' mean "
                  f"({', '.join(plain)}; goal ≤ 1.5)", end="")
        print()
    winners = [pick_winner([run["rows"][m] for m in candidates]) for run in runs]
    auto = [run["test"][winner.method] for run, winner in zip(runs, winners)]
    best_on_mean = max(candidates, key=lambda m: statistics.mean(run["test"][m] for run in runs))
    best_mean = statistics.mean(run["test"][best_on_mean] for run in runs)
    regret = [max(run["test"][m] for m in candidates) - a for run, a in zip(runs, auto)]
    picks = {m: sum(w.method == m for w in winners) for m in candidates}
    print(f"\nauto over {', '.join(candidates)}: test {100 * statistics.mean(auto):.1f}% against "
          f"{best_on_mean}'s {100 * best_mean:.1f}% (the best on mean): {100 * (statistics.mean(auto) - best_mean):+.1f} "
          f"points (goal ≥ −1); regret per seed {100 * statistics.mean(regret):.1f} points on mean, "
          f"{100 * max(regret):.1f} at most; picks {picks}")
    if "gda" in methods and "tip-adapter" in methods:
        gda, tip = ([run["test"][m] for run in runs] for m in ("gda", "tip-adapter"))
        print(f"GDA − Tip-Adapter on test: {mean_se([g - t for g, t in zip(gda, tip)])} points (goal ≥ 0)")



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=12)
    parser.add_argument("--first-seed", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=2, help="processes, one seed at a time each")
    parser.add_argument("--methods", default=",".join(UNSEARCHED + SEARCHED))
    parser.add_argument("--candidates", default=None, help="auto's candidates (default: upt.auto's defaults)")
    parser.add_argument("--json", type=Path, default=None, help="also write every seed's rows and test accuracies here")
    parser.add_argument("--from-json", type=Path, nargs="+", default=None,
                        help="report on the seeds these --json files hold instead of training")
    args = parser.parse_args()
    from upt.auto import DEFAULT_CANDIDATES, parse_candidates

    candidates = parse_candidates(args.candidates) if args.candidates else DEFAULT_CANDIDATES
    methods = tuple(dict.fromkeys((*args.methods.split(","), *candidates)))
    runs = read_runs(args.from_json) if args.from_json else train_seeds(args, methods)
    report(runs, methods, candidates)
    if args.json:
        args.json.write_text(json.dumps([{"seed": run["seed"], "test": run["test"],
                                          "rows": {m: row.as_dict() for m, row in run["rows"].items()}}
                                         for run in runs], indent=1))


def train_seeds(args: argparse.Namespace, methods: tuple[str, ...]) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        root = build_dataset(Path(tmp))
        jobs = [(root, seed, methods) for seed in range(args.first_seed, args.first_seed + args.seeds)]
        with ProcessPoolExecutor(args.jobs) as pool:
            return list(pool.map(run_seed, jobs))


def read_runs(paths: list[Path]) -> list[dict]:
    from upt.auto import LeaderboardRow

    runs = [run for path in paths for run in json.loads(path.read_text())]
    if len({run["seed"] for run in runs}) != len(runs):
        raise SystemExit("a seed appears twice in the --from-json files")
    return [run | {"rows": {m: LeaderboardRow.from_dict(row) for m, row in run["rows"].items()}} for run in runs]


if __name__ == "__main__":
    main()
