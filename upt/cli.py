"""The `upt` command line: train, evaluate, predict and analyse without starting the service.

Every command accepts --json for machine-readable output on stdout; training shows a progress bar on
stderr. Other packages add commands through the `upt.commands` entry-point group (the service's
serve, worker, migrate and keys): this module names none of them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from importlib.metadata import EntryPoint, PackageNotFoundError, distribution, entry_points
from pathlib import Path
from typing import Any, Callable

from .errors import UptError
from .methods.registry import SPECS, takers_text, train_options
from .auto import CANDIDATES
from .options import OPTIONS, OptionSpec, UnusedOptionError

COMMANDS_GROUP = "upt.commands"
DEFAULT_MODEL = os.environ.get("UPT_MODEL", "ViT-B-16")
DEFAULT_PRETRAINED = os.environ.get("UPT_PRETRAINED", "openai")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except UnusedOptionError as error:  # a flag the method does not use: refused as argparse refuses a bad one
        args.command_parser.error(f"argument {OPTIONS[error.field].flag}: {error.describe(lambda o: o.flag)}")
    except UptError as error:
        return _fail(args, error)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="upt", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(metavar="COMMAND")
    _add_train(sub)
    _add_eval(sub)
    _add_predict(sub)
    _add_zero_shot(sub)
    _add_analyze(sub)
    _add_reproduce(sub)
    _add_tiny_checkpoint(sub)
    _add_methods(sub)
    _add_export(sub)
    _add_remote(sub)
    _register_service_commands(sub)
    return parser


# -- commands -------------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    from .datasets import load_data
    from .progress import EpochProgressBar
    from .training import train

    if args.method == "auto":
        return cmd_train_auto(args)
    if args.candidates is not None:
        raise UptError("--candidates applies to --method auto only.")
    source = load_data(args.data, args.dataset)
    config = _train_config(args, args.method, source).validate()  # before the backbone loads: fail fast
    backbone = _backbone(args)
    planned = dataclasses.replace(config, class_names=source.class_names)  # CLIP-LoRA's epochs depend on them
    with EpochProgressBar(total=planned.total_epochs, enabled=not args.quiet) as progress:
        result = train(backbone, source, config, args.out, progress, args.checkpoint_dir)
    payload = {"artifact": str(result.artifact_dir), "method": config.method, "backbone": backbone.describe(),
               "trainable_parameters": result.metrics["trainable_parameters"], "metrics": result.metrics}
    if args.eval_data:
        payload["eval"] = _evaluate(_predictor(args, result.artifact_dir, backbone), args.eval_data, None)
    return _emit(args, payload, _summarise_training)


def cmd_train_auto(args: argparse.Namespace) -> int:
    """Train every candidate on the same split and seed; keep the best on validation (upt.auto)."""
    import tempfile

    from .auto import base_config, candidate_config, parse_candidates, train_auto
    from .progress import EpochProgressBar

    from .datasets import load_data

    candidates = parse_candidates(args.candidates)
    source = load_data(args.data, args.dataset)
    base = base_config(candidates, **_given_options(args), templates=_templates(args, source))
    for method in candidates:
        candidate_config(base, method)  # every candidate's options checked before the backbone loads
    if args.checkpoint_dir is not None:
        raise UptError("--checkpoint-dir is not supported with --method auto.")
    backbone = _backbone(args)
    bars: list[EpochProgressBar] = []

    def progress_bar(method: str) -> EpochProgressBar:
        for bar in bars:  # the previous candidate's bar is finished
            bar.close()
        bars.append(EpochProgressBar(total=candidate_config(base, method).total_epochs, enabled=not args.quiet,
                                     description=method))
        return bars[-1]

    args.out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(dir=args.out.parent, prefix=f".{args.out.name}.candidates-") as work:
            result = train_auto(backbone, source, base, candidates, args.out, work, progress_bar)
    finally:
        for bar in bars:
            bar.close()
    metrics = result.winner.metrics
    payload = {"artifact": str(result.artifact_dir), "method": "auto", "winner": result.choice["winner"],
               "backbone": backbone.describe(), "trainable_parameters": metrics["trainable_parameters"],
               "metrics": metrics, "auto": result.choice}
    if args.eval_data:
        payload["eval"] = _evaluate(_predictor(args, result.artifact_dir, backbone), args.eval_data, None)
    return _emit(args, payload, _summarise_auto)


def _train_config(args: argparse.Namespace, method: str, source):
    from .training import TrainConfig

    return TrainConfig.of(method, **_given_options(args), templates=_templates(args, source))


def _given_options(args: argparse.Namespace) -> dict[str, Any]:
    """The registry's options given on the command line (an omitted one keeps the method's default)."""
    return {option.name: getattr(args, option.name) for option in train_options()
            if getattr(args, option.name) is not None}


def cmd_eval(args: argparse.Namespace) -> int:
    return _emit(args, _evaluate(_predictor(args, args.artifact), args.data, args.dataset), _summarise_eval)


def cmd_predict(args: argparse.Namespace) -> int:
    return _emit_predictions(args, _predictor(args, args.artifact))


def cmd_zero_shot(args: argparse.Namespace) -> int:
    from .predict import Predictor

    classes = [name.strip() for name in args.classes.split(",") if name.strip()]
    if len(classes) < 2 or len(set(classes)) != len(classes):
        raise UptError("--classes needs at least two distinct, comma-separated class names.")
    return _emit_predictions(args, Predictor.zero_shot(_backbone(args), classes, _templates(args, None)))


def cmd_analyze(args: argparse.Namespace) -> int:
    from .analysis import analyze_samples
    from .datasets import load_data

    source = load_data(args.data, args.dataset)
    report = analyze_samples(_backbone(args), source.class_names, source.train or source.test,
                             _templates(args, source))
    return _emit(args, report.as_dict(), lambda d: (
        f"intra-class visual variance: {d['intra_class_visual']:.4f}\n"
        f"inter-class text variance:   {d['inter_class_text']:.4f}\n{d['interpretation']}"))


def cmd_reproduce(args: argparse.Namespace) -> int:
    from .reproduce import GridSpec, RunOptions, plan, reproduce

    grid = GridSpec(args.grid, _names(args.datasets), _names(args.methods), _numbers(args.shots),
                    _numbers(args.seeds))
    runs = grid.runs()
    if args.dry_run:
        payload = plan(runs, args.root, args.out).as_dict() | {"grid": args.grid,
                                                                "not_implemented": list(grid.unavailable_methods())}
        return _emit(args, payload, _summarise_plan)
    options = RunOptions(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr)
    payload = reproduce(_backbone(args), grid, args.root, args.out, options, show_progress=not args.quiet)
    return _emit(args, payload, lambda d: f"{d['runs']} runs: {d['report']}, {d['results_csv']}, "
                                          f"{len(d['plots'])} plot(s) in {args.out / 'plots'}")


def cmd_tiny_checkpoint(args: argparse.Namespace) -> int:
    from .tiny import TINY_MODEL, write_tiny_checkpoint

    path = write_tiny_checkpoint(args.path, seed=args.seed)
    return _emit(args, {"path": str(path), "model": TINY_MODEL, "seed": args.seed}, lambda d: (
        f"wrote random weights for {d['model']} to {d['path']} (use: --model {d['model']} --pretrained {d['path']})"))


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_artifact

    files = export_artifact(args.artifact, args.format, args.out, pretrained=args.pretrained, device=args.device)
    return _emit(args, {"format": args.format, "files": [str(path) for path in files]},
                 lambda d: f"wrote {d['format']} model: {', '.join(d['files'])}")


def cmd_methods(args: argparse.Namespace) -> int:
    from .auto import method_listing

    rows = method_listing()
    if args.model:
        from .parameters import parameters_per_cached_image, trainable_parameters_by_method

        counts = trainable_parameters_by_method(args.model, args.cached_images)
        per_image = parameters_per_cached_image(args.model)
        for row in rows:
            if row["name"] not in counts:  # auto: its winner's count
                continue
            row["trainable_parameters"] = counts[row["name"]]
            if row["trainable_parameters"] is None:  # Tip-Adapter-F's count depends on the data: a key per image
                row["trainable_parameters_per_cached_image"] = per_image
    return _emit(args, {"methods": rows, "model": args.model}, _summarise_methods)


def _summarise_methods(d: dict[str, Any]) -> str:
    lines = []
    for row in d["methods"]:
        lines.append(f"{row['name']:<13} {_count(row):>12}  {row['description']}")
        flags = " ".join(f"--{o['name'].replace('_', '-')}" + (f"={o['default']}" if o["default"] is not None else "")
                         for o in row["options"])
        lines.append(f"{'':<13} {'':>12}  options: {flags}")
    return "\n".join(lines)


def _count(row: dict[str, Any]) -> str:
    if "trainable_parameters_per_cached_image" in row:
        return f"{row['trainable_parameters_per_cached_image']}×images"
    return str(row.get("trainable_parameters", ""))


# -- parsers --------------------------------------------------------------------------------------


def _common(parser: argparse.ArgumentParser, backbone: bool = True) -> None:
    if backbone:
        parser.add_argument("--model", default=DEFAULT_MODEL, help="open_clip model name (default: %(default)s)")
        parser.add_argument("--pretrained", default=DEFAULT_PRETRAINED,
                            help="open_clip pretrained tag or checkpoint file (default: %(default)s)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")


def _template_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--template", default=None,
                        help="hand-written template, '{}' for the class name (default: the data set's own, "
                             "as CoOp's, else 'a photo of a {}.')")
    parser.add_argument("--ensemble", action="store_true",
                        help="average CLIP's 7 ImageNet templates and, as CoOp, the data set's (or --template)")


def _dataset_option(parser: argparse.ArgumentParser) -> None:
    from .datasets import DATASETS

    parser.add_argument("--dataset", default=None, choices=list(DATASETS), metavar="NAME",
                        help="read --data as this data set of CoOp's benchmark (CoOp's layout: --data is the root "
                             "holding its folder, or the folder); one of: " + ", ".join(DATASETS))


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="learn prompts on a few-shot split of an image folder")
    p.add_argument("--data", required=True, type=Path,
                   help="ImageFolder DIR/<class name>/<image> (optional DIR/classnames.txt), or a data set in "
                        "CoOp's layout (DIR/split_zhou_<Name>.json, or ImageNet's classnames.txt and images/)")
    _dataset_option(p)
    p.add_argument("--method", required=True, choices=(*(spec.name for spec in SPECS), "auto"),
                   help="a method (see `upt methods`), or auto: train --candidates and keep the best on validation")
    p.add_argument(CANDIDATES.flag, default=None, help=CANDIDATES.help)
    p.add_argument("--out", required=True, type=Path, help="artifact folder to write")
    for option in train_options():
        _add_option(p, option)
    p.add_argument("--checkpoint-dir", type=Path, default=None, help="save each epoch here and resume from it")
    p.add_argument("--eval-data", type=Path, default=None,
                   help="also evaluate the artifact on this image folder (or the test split of a CoOp data set)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _template_options(p)
    _common(p)
    p.set_defaults(func=cmd_train, command_parser=p)


def _add_option(parser: argparse.ArgumentParser, option: OptionSpec) -> None:
    """A flag from the registry: omitted, it is None and the method's own default applies."""
    applies = f"; {takers}" if (takers := takers_text(option.name)) else ""
    default = "" if option.default is None or "(default" in option.help else f" (default: {option.default})"
    parser.add_argument(option.flag, dest=option.name, type=option.type, default=None,
                        metavar=option.name.upper(), help=f"{option.help}{default}{applies}")


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="accuracy, per-class accuracy and confusion matrix of an artifact")
    p.add_argument("--artifact", required=True, type=Path)
    p.add_argument("--data", required=True, type=Path,
                   help="image folder, or a CoOp data set (its test split; ImageNet-A/-R: the artifact's rows "
                        "for their 200 classes)")
    _dataset_option(p)
    _artifact_backbone_options(p)
    p.set_defaults(func=cmd_eval)


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="top-k labels of images with a trained artifact")
    p.add_argument("--artifact", required=True, type=Path)
    p.add_argument("--top-k", type=_positive_int, default=5)
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    _artifact_backbone_options(p)
    p.set_defaults(func=cmd_predict)


def _add_zero_shot(sub) -> None:
    p = sub.add_parser("zero-shot", help="top-k labels of images for class names, without training")
    p.add_argument("--classes", required=True, help='comma-separated class names: "cat,dog,bird"')
    p.add_argument("--top-k", type=_positive_int, default=5)
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    _template_options(p)
    _common(p)
    p.set_defaults(func=cmd_zero_shot)


def _add_analyze(sub) -> None:
    p = sub.add_parser("analyze", help="the paper's intra-class visual and inter-class text variances")
    p.add_argument("--data", required=True, type=Path)
    _dataset_option(p)
    _template_options(p)
    _common(p)
    p.set_defaults(func=cmd_analyze)


def _add_reproduce(sub) -> None:
    p = sub.add_parser("reproduce", help="run the paper's experiment grid (resumable) and write its tables and plots")
    p.add_argument("--grid", required=True, choices=("few-shot", "dg"),
                   help="few-shot: 11 data sets x 1/2/4/8/16 shots x seeds 1-3 (Table 2, Figure 4); "
                        "dg: ImageNet at 16 shots, evaluated on -V2, -Sketch, -A, -R (Table 1)")
    p.add_argument("--root", required=True, type=Path, help="the folder holding the data sets in CoOp's layout")
    p.add_argument("--out", required=True, type=Path,
                   help="results folder: runs/, results.csv, report.md, plots/ (finished runs here are skipped)")
    p.add_argument("--datasets", default=None, help="comma-separated, to narrow the grid (default: the paper's)")
    p.add_argument("--methods", default=None, help="comma-separated, to narrow the grid (default: the paper's)")
    p.add_argument("--shots", default=None, help="comma-separated, e.g. 16 (default: the paper's)")
    p.add_argument("--seeds", default=None, help="comma-separated (default: 1,2,3)")
    p.add_argument("--epochs", type=int, default=None, help="default: the paper's schedule")
    p.add_argument("--batch-size", type=int, default=None, help="default: each method's (32 for the prompt methods)")
    p.add_argument("--lr", type=float, default=None, help="default: each method's (0.002)")
    p.add_argument("--dry-run", action="store_true", help="list the runs, those finished, and the data sets missing")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _common(p)
    p.set_defaults(func=cmd_reproduce)


def _names(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else tuple(part.strip() for part in text.split(",") if part.strip())


def _numbers(text: str | None) -> tuple[int, ...] | None:
    try:
        return None if text is None else tuple(int(part) for part in _names(text))
    except ValueError:
        raise UptError(f"Expected comma-separated whole numbers, not {text!r}.") from None


def _summarise_plan(d: dict[str, Any]) -> str:
    lines = [f"{d['grid']}: {d['runs']} runs, {len(d['done'])} finished, {len(d['todo'])} to run"]
    lines += [f"  to run: {key}" for key in d["todo"]]
    lines += [f"  missing data set: {name} (expected at {path})" for name, path in d["missing"].items()]
    lines += [f"  left out, not implemented in this version: {m}" for m in d["not_implemented"]]
    return "\n".join(lines)


def _add_tiny_checkpoint(sub) -> None:
    p = sub.add_parser("tiny-checkpoint", help="write random weights for the project's tiny test model")
    p.add_argument("path", type=Path)
    p.add_argument("--seed", type=int, default=0)
    _common(p, backbone=False)
    p.set_defaults(func=cmd_tiny_checkpoint)


def _add_methods(sub) -> None:
    p = sub.add_parser("methods", help="list the methods (with trainable parameter counts for --model)")
    p.add_argument("--model", default=None, help="count parameters for this architecture (no weights needed)")
    p.add_argument("--cached-images", type=_positive_int, default=None,
                   help="classes × shots, for tip-adapter-f's count (one trainable key per training image)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_methods)


def _add_export(sub) -> None:
    from .export import FORMATS

    p = sub.add_parser("export", help="write a trained artifact as one ONNX or OpenVINO model that runs without upt")
    p.add_argument("--artifact", required=True, type=Path)
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, type=Path,
                   help="the model file: model.onnx, or model.xml for OpenVINO (its .bin is written beside it)")
    _artifact_backbone_options(p)
    p.set_defaults(func=cmd_export)


def _add_remote(sub) -> None:
    from .remote import register  # `upt remote`: the HTTP API's commands, in their own module

    register(sub)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _artifact_backbone_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pretrained", default=None,
                        help="weights to load (default: those recorded in the artifact); must be the same weights")
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", action="store_true")


def _register_service_commands(sub) -> None:
    """Add the commands of the `upt.commands` entry-point group (pyproject.toml). An entry point is a
    function taking `sub`; one whose extra is not fully installed is listed, and says how to install it."""
    missing_by_extras: dict[tuple[str, ...], list[str]] = {}  # the commands share an extra: look once
    for entry in sorted(entry_points(group=COMMANDS_GROUP), key=lambda entry: entry.name):
        extras = tuple(entry.extras)
        if extras not in missing_by_extras:
            missing_by_extras[extras] = _missing_extra_requirements(entry)
        missing = missing_by_extras[extras]
        if missing:
            _add_uninstalled_command(sub, entry, missing)
        else:
            entry.load()(sub)


def _missing_extra_requirements(entry: EntryPoint) -> list[str]:
    """The distributions that the extras named by `entry` (`module:function [extra]`) require but that
    are not installed. Names only, no versions: a wrong version fails loudly when the command runs."""
    if not entry.extras or entry.dist is None:
        return []
    extra_marker = re.compile(r"""extra\s*==\s*["'](%s)["']""" % "|".join(map(re.escape, entry.extras)))
    missing = []
    for requirement in entry.dist.requires or []:
        name, _, marker = requirement.partition(";")
        if not extra_marker.search(marker):
            continue
        name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", name).group(1)
        if name.lower() == entry.dist.name.lower():  # an extra naming another of this distribution's
            continue
        try:
            distribution(name)
        except PackageNotFoundError:
            missing.append(name)
    return missing


def _add_uninstalled_command(sub, entry: EntryPoint, missing: list[str]) -> None:
    extras = ",".join(entry.extras)
    install = f"pip install '{entry.dist.name}[{extras}]'"
    # No option prefix: whatever follows (--help included) is taken as is, and the command explains.
    parser = sub.add_parser(entry.name, help=f"(needs {install})", add_help=False, prefix_chars="\0")
    parser.add_argument("arguments", nargs="*")

    def explain(args: argparse.Namespace) -> int:
        raise UptError(f"`upt {entry.name}` needs the {extras} extra, which is not installed (missing: "
                       f"{', '.join(missing)}). Install it with: {install}")

    parser.set_defaults(func=explain)


# -- helpers --------------------------------------------------------------------------------------


def _backbone(args: argparse.Namespace):
    from .backbone import load_backbone

    return load_backbone(args.model, args.pretrained, args.device)


def _predictor(args: argparse.Namespace, artifact_dir: Path, backbone=None):
    from .artifact import load_serving_artifact
    from .backbone import load_backbone
    from .predict import Predictor

    artifact = load_serving_artifact(artifact_dir)  # read and checked once, also for the backbone it names
    if backbone is None:
        recorded = artifact.config["backbone"]
        backbone = load_backbone(recorded["model"], args.pretrained or recorded["pretrained"], args.device)
    return Predictor.from_artifact(backbone, artifact)


def _evaluate(predictor, data: Path, dataset: str | None) -> dict[str, Any]:
    """Accuracy on the test split of `data`, with the artifact's rows for the data's classes."""
    from .datasets import load_data

    source = load_data(data, dataset, class_names=predictor.class_names)
    return predictor.for_classes(source.class_names).evaluate(source.test)


def _templates(args: argparse.Namespace, source) -> tuple[str, ...]:
    from .datasets import resolve_templates

    return resolve_templates(args.template, args.ensemble, source)


def _emit_predictions(args: argparse.Namespace, predictor) -> int:
    from .data import read_image_file

    images = [read_image_file(path) for path in args.images]
    results = predictor.predict(images, top_k=args.top_k)
    payload = {"predictions": [{"image": str(path), "top": [p.as_dict() for p in top]}
                               for path, top in zip(args.images, results)]}
    return _emit(args, payload, lambda d: "\n".join(
        f"{row['image']}: " + ", ".join(f"{p['label']} {p['probability']:.3f}" for p in row["top"])
        for row in d["predictions"]))


def _emit(args: argparse.Namespace, payload: dict[str, Any], text: Callable[[dict[str, Any]], str]) -> int:
    print(json.dumps(payload, indent=2) if args.json else text(payload))
    return 0


def _fail(args: argparse.Namespace, error: UptError) -> int:
    if getattr(args, "json", False):
        print(json.dumps({"error": {"type": type(error).__name__, "message": str(error)}}))
    print(f"upt: error: {error}", file=sys.stderr)
    return 2


def _summarise_training(d: dict[str, Any]) -> str:
    m = d["metrics"]
    lines = [f"artifact: {d['artifact']}", f"method: {d['method']} ({d['trainable_parameters']} trainable parameters)",
             f"validation accuracy: {_percent(m['val_accuracy'])} on {m['val_count']} images"]
    if "eval" in d:
        lines.append(f"evaluation accuracy: {_percent(d['eval']['accuracy'])} on {d['eval']['count']} images")
    return "\n".join(lines)


def _summarise_auto(d: dict[str, Any]) -> str:
    choice = d["auto"]
    lines = [f"artifact: {d['artifact']}", f"auto chose {choice['winner']} on {choice['val_count']} validation images "
             f"({choice['rule']}):"]
    for row in choice["leaderboard"]:
        mark = "*" if row["method"] == choice["winner"] else " "
        spread = "" if row.get("val_stderr") is None else f" ± {100 * row['val_stderr']:.1f}"
        gap = "" if not row.get("gap_to_best") else (f"  {100 * row['gap_to_best']:.1f} below the best "
                                                      f"(± {100 * row['gap_stderr']:.1f} paired)")
        lines.append(f" {mark} {row['method']:<13} {_percent(row['val_accuracy']):>6}{spread:<7}  "
                     f"{row['trainable_parameters']:>9} parameters  {row['training_seconds']:.1f} s{gap}")
    if "eval" in d:
        lines.append(f"evaluation accuracy: {_percent(d['eval']['accuracy'])} on {d['eval']['count']} images")
    return "\n".join(lines)


def _summarise_eval(d: dict[str, Any]) -> str:
    per_class = ", ".join(f"{name} {_percent(acc)}" for name, acc in d["per_class_accuracy"].items())
    return f"accuracy: {_percent(d['accuracy'])} on {d['count']} images\nper class: {per_class}"


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"
