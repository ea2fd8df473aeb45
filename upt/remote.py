"""`upt remote …`: the HTTP API from the command line, through `upt.client.Client`.

    upt remote create --data photos/ --method upt --shots 8 --wait
    upt remote status TASK
    upt remote wait TASK
    upt remote classify --task TASK a.jpg b.jpg
    upt remote export TASK --format onnx --out model.onnx

`--url` and `--api-key` default to $UPT_URL and $UPT_API_KEY. With `--json` every command prints the
API's JSON document on stdout, and an error answer's problem document as {"error": {...}}.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable

from .auto import CANDIDATES
from .client import API_KEY_ENV, DEFAULT_URL, URL_ENV, ApiError, Client, TaskFailedError
from .export import FORMATS as EXPORT_FORMATS
from .methods.registry import train_options
from .options import OptionSpec


def register(sub) -> None:
    """Add `upt remote` and its commands to the `upt` parser's sub-parsers."""
    remote = sub.add_parser("remote", help="talk to a running upt API: create, status, wait, classify, export")
    commands = remote.add_subparsers(metavar="COMMAND")

    def usage(args: argparse.Namespace) -> int:  # `upt remote` without a command
        remote.print_help()
        return 2

    remote.set_defaults(func=usage)
    _add_create(commands)
    _add_status(commands)
    _add_wait(commands)
    _add_classify(commands)
    _add_export(commands)


def _connection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=None, help=f"the API's URL (default: ${URL_ENV}, else {DEFAULT_URL})")
    parser.add_argument("--api-key", default=None, help=f"an API key (default: ${API_KEY_ENV})")
    parser.add_argument("--json", action="store_true", help="print the API's JSON on stdout")


def _command(run: Callable[[Client, argparse.Namespace], Any], text: Callable[[Any], str]):
    """A command's func: `run` with a client, its answer printed as JSON or `text`; an error answer
    printed with its problem document, exit status 1."""
    @functools.wraps(run)
    def func(args: argparse.Namespace) -> int:
        try:
            with Client(args.url, args.api_key) as client:
                answer = run(client, args)
        except ApiError as error:
            return _failed(args, {"problem": error.problem}, str(error))
        except TaskFailedError as error:
            return _failed(args, {"task": error.task}, str(error))
        print(json.dumps(answer, indent=2) if args.json else text(answer))
        return 0

    return func


def _failed(args: argparse.Namespace, document: dict[str, Any], message: str) -> int:
    if args.json:
        print(json.dumps({"error": document}, indent=2))
    print(f"upt remote: error: {message}", file=sys.stderr)
    return 1


# -- commands ---------------------------------------------------------------------------------------

def _add_create(commands) -> None:
    p = commands.add_parser("create", help="create a task from a folder of class folders or a zip of them")
    p.add_argument("--data", required=True, type=Path, help="DIR/<class>/<image> (ImageFolder), or a .zip of it")
    p.add_argument("--method", default="coop", help="a method of `upt methods`, or auto (default: %(default)s)")
    p.add_argument("--class-names", default=None, help="comma-separated display names, in class-folder order")
    for option in _create_options():  # sent as typed: the API checks them against the method, as `upt train` does
        p.add_argument(option.flag, dest=option.name, default=None, help=option.help)
    p.add_argument("--wait", action="store_true", help="wait until it has trained (a progress bar on stderr)")
    _connection(p)

    def run(client: Client, args: argparse.Namespace) -> dict[str, Any]:
        names = None if args.class_names is None else [n.strip() for n in args.class_names.split(",")]
        options = {option.name: getattr(args, option.name) for option in _create_options()}
        task = client.create_task(args.data, args.method, names, **options)
        return client.wait(task["id"], progress=not args.json) if args.wait else task

    p.set_defaults(func=_command(run, _task_text))


def _create_options() -> list[OptionSpec]:
    """The `POST /tasks` option fields: every method's options, and auto's candidates."""
    return [*train_options(), CANDIDATES]


def _add_status(commands) -> None:
    p = commands.add_parser("status", help="a task's status, progress and metrics")
    p.add_argument("task")
    _connection(p)
    p.set_defaults(func=_command(lambda client, args: client.task(args.task), _task_text))


def _add_wait(commands) -> None:
    p = commands.add_parser("wait", help="wait until a task has trained, with a progress bar")
    p.add_argument("task")
    p.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")
    _connection(p)
    p.set_defaults(func=_command(lambda client, args: client.wait(args.task, args.timeout, progress=not args.json),
                                 _task_text))


def _add_classify(commands) -> None:
    p = commands.add_parser("classify", help="top labels of images, by a task or zero-shot by class names")
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    p.add_argument("--task", default=None, help="the task's id")
    p.add_argument("--classes", default=None, help='zero-shot: comma-separated class names, "cat,dog,bird"')
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--stage", default=None, choices=("instant", "tuned"), help="pin the stage that answers")
    _connection(p)

    def run(client: Client, args: argparse.Namespace) -> dict[str, Any]:
        classes = None if args.classes is None else [n.strip() for n in args.classes.split(",")]
        return client.classify(args.images, args.task, classes, args.top_k, args.stage)

    p.set_defaults(func=_command(run, _classify_text))


def _add_export(commands) -> None:
    p = commands.add_parser("export", help="download a task's model as ONNX, or OpenVINO (a zip of its .xml, .bin)")
    p.add_argument("task")
    p.add_argument("--format", default="onnx", choices=EXPORT_FORMATS)
    p.add_argument("--out", required=True, type=Path)
    _connection(p)

    def run(client: Client, args: argparse.Namespace) -> dict[str, Any]:
        path = client.export(args.task, args.format, args.out)
        return {"task_id": args.task, "format": args.format, "file": str(path), "bytes": path.stat().st_size}

    p.set_defaults(func=_command(run, lambda d: f"wrote {d['format']} model of task {d['task_id']}: {d['file']}"))


# -- text output ------------------------------------------------------------------------------------


def _task_text(task: dict[str, Any]) -> str:
    lines = [f"task {task['id']}: {task['status']} ({task['method']}, {len(task['class_names'])} classes, "
             f"{task['num_images']} images), progress {round(100 * float(task.get('progress') or 0))} %"]
    accuracy = (task.get("metrics") or {}).get("val_accuracy")
    if accuracy is not None:
        lines.append(f"validation accuracy: {100 * accuracy:.1f} %")
    if task.get("error"):
        lines.append(f"error: {task['error']}")
    return "\n".join(lines)


def _classify_text(answer: dict[str, Any]) -> str:
    return "\n".join(f"{row['filename']}: " + ", ".join(f"{p['label']} {p['probability']:.3f}" for p in row["labels"])
                     for row in answer["predictions"]) + f"\n(answered by the {answer['stage']} stage)"
