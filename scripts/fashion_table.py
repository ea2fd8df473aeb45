"""Train every method on the pretrained tiny CLIP, on Fashion-MNIST and its two shifts; print the README's table.

    nice -n 5 .venv/bin/python scripts/fashion_table.py --jobs 3

Backbone: `upt-tiny` pretrained on Fashion-MNIST's training split (upt/weights, scripts/pretrain_tiny.py).
Data: the committed fixtures (4 classes; 16 images per class to train on, of which 4 are held out for
validation; 40 test images), in-domain and with the visual and text shifts. Each method is trained with
seeds 1, 2 and 3 as `upt train --shots 16 --epochs 30 --lr 0.05 --batch-size 16 --seed S` would (the
Tip-Adapter methods with their paper's recipe, as `upt.auto.candidate_config` gives them), in processes
that load the backbone once; the held-out accuracy is averaged over the seeds. `auto` is the rule of
`upt train --method auto` (upt.auto.pick_winner) applied to its default candidates' runs of the same
seed, which are the runs it would make. Beside each set, its two variances (appendix A) over its 40
test images.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
SETS = {"in-domain": "fashion_mnist", "visual shift": "fashion_mnist_visual_shift",
        "text shift": "fashion_mnist_text_shift"}
SEEDS = (1, 2, 3)
OPTIONS = dict(shots=16, epochs=30, lr=0.05, batch_size=16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1, help="processes, one set each (one torch thread each)")
    parser.add_argument("--methods", default=None, help="comma-separated subset of the methods (default: all)")
    args = parser.parse_args()
    from upt.auto import DEFAULT_CANDIDATES
    from upt.methods import METHODS

    methods = tuple(args.methods.split(",")) if args.methods else METHODS
    rows = (*methods, "auto") if set(DEFAULT_CANDIDATES) <= set(methods) else methods
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        results = dict(zip(SETS, pool.map(run_set, SETS.values(), [methods] * len(SETS))))
    print("| set | intra-class visual variance | inter-class text variance |")
    print("|---|---|---|")
    for title, result in results.items():
        print(f"| {title} | {result['intra_class_visual']:.3f} | {result['inter_class_text']:.3f} |")
    print()
    print("| method | " + " | ".join(SETS) + " |")
    print("|---|" + "---|" * len(SETS))
    for method in rows:
        cells = [cell(result["accuracy"][method]) for result in results.values()]
        print(f"| {method} | " + " | ".join(cells) + " |")
    for title, result in results.items():
        if result["auto_picks"]:
            print(f"auto's picks, {title}: {', '.join(result['auto_picks'])}")
    print(f"{time.perf_counter() - started:.0f} s with {args.jobs} process(es)", file=sys.stderr)


def cell(accuracies: list[float]) -> str:
    return f"{100 * statistics.mean(accuracies):.1f}% (±{100 * statistics.pstdev(accuracies):.1f})"


def run_set(folder: str, methods: tuple[str, ...]) -> dict:
    """Variances and each method's held-out accuracy per seed on one fixture set (and auto's, when
    `methods` holds its candidates)."""
    import torch

    from upt.analysis import analyze
    from upt.auto import DEFAULT_CANDIDATES, candidate_config, leaderboard_row, pick_winner
    from upt.backbone import load_backbone
    from upt.data import scan_image_folder
    from upt.predict import Predictor
    from upt.tiny import PRETRAINED_TINY, TINY_MODEL
    from upt.training import TrainConfig, train

    torch.set_num_threads(1)  # measured faster than two on a busy 2-core machine
    backbone = load_backbone(TINY_MODEL, str(PRETRAINED_TINY), "cpu")
    data = FIXTURES / folder
    report = analyze(backbone, data / "test")
    accuracy: dict[str, list[float]] = {method: [] for method in (*methods, "auto")}
    picks = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in SEEDS:
            rows, held_out = [], {}
            for method in methods:
                # OPTIONS go to the methods that use them, as auto passes its options to its candidates.
                config = candidate_config(TrainConfig.holding(method, seed=seed, **OPTIONS), method)
                began = time.perf_counter()
                result = train(backbone, data / "train", config, Path(tmp) / f"{method}-{seed}")
                rows.append(leaderboard_row(method, result.metrics, time.perf_counter() - began))
                samples = scan_image_folder(data / "test", result.metrics["class_names"]).samples
                held_out[method] = Predictor.from_artifact(backbone, result.artifact_dir).evaluate(samples)["accuracy"]
                accuracy[method].append(held_out[method])
                print(f"{folder} seed {seed} {method}: {100 * held_out[method]:.1f}%", file=sys.stderr, flush=True)
            if set(DEFAULT_CANDIDATES) <= set(methods):
                winner = pick_winner([next(row for row in rows if row.method == m) for m in DEFAULT_CANDIDATES])
                accuracy["auto"].append(held_out[winner.method])
                picks.append(winner.method)
    return {"intra_class_visual": report.intra_class_visual, "inter_class_text": report.inter_class_text,
            "accuracy": accuracy, "auto_picks": picks}


if __name__ == "__main__":
    main()
