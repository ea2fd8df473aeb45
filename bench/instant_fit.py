"""What the instant stage's two training-free methods cost beyond their shared encoder passes.

    .venv/bin/python bench/instant_fit.py --classes 10,100 --repeats 3

GDA and Tip-Adapter are fitted on the same features: `--views` augmented views of every shot, which the
API's serving encoder computes once per task (service/instant.py); those passes cost the same whichever
method the stage uses (bench/instant_stage.py times them). What differs is the fit from the features:
GDA's class means, KS precision and α cross-fitted over folds of the shots (upt.methods.gda.fit);
Tip-Adapter's keys and its α, β leave-one-out search over 200 × 20 grid points
(upt.methods.tip_adapter.leave_one_out_search). Timed here on random unit features of ViT-B-16's width
(512), for tasks of each size in `--classes`, interleaved, the median of `--repeats`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from _timing import machine


def features(classes: int, shots: int, views: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(classes, width, generator=generator), dim=-1)
    labels = torch.arange(classes).repeat_interleave(shots)
    noise = torch.randn(views, len(labels), width, generator=generator)
    return centres[labels].unsqueeze(0) + 0.05 * noise, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", default="10,100")
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--views", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from upt.methods.gda import GdaOptions
    from upt.methods.gda import fit as fit_gda
    from upt.methods.tip_adapter import CacheOptions, build_keys, leave_one_out_search, one_hot_values

    print(machine())
    print(f"{args.shots} shots, {args.views} views, width 512, median of {args.repeats}\n")
    print("| classes | GDA fit | Tip-Adapter fit | ratio (Tip-Adapter / GDA) |")
    print("|---|---|---|---|")
    for classes in (int(c) for c in args.classes.split(",")):
        views, labels = features(classes, args.shots, args.views, 512, seed=classes)
        classifier = F.normalize(torch.randn(classes, 512, generator=torch.Generator().manual_seed(1)), dim=-1)
        options = CacheOptions(augment_views=args.views)

        def gda() -> None:
            fit_gda(views, labels, classifier, 100.0, GdaOptions())

        def tip() -> None:
            keys = build_keys(views)
            leave_one_out_search(labels, keys, one_hot_values(labels, classes), classifier, 100.0, options)

        times: dict[str, list[float]] = {"gda": [], "tip": []}
        for _ in range(args.repeats):
            for name, run in (("gda", gda), ("tip", tip)):
                began = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - began)
        g, t = statistics.median(times["gda"]), statistics.median(times["tip"])
        print(f"| {classes} | {g:.3f} s | {t:.3f} s | {t / g:.1f}× |", flush=True)


if __name__ == "__main__":
    main()
