"""OpenAPI descriptions of the multipart forms the routes parse themselves (to stream with limits)."""

from __future__ import annotations

from upt.auto import AUTO, CANDIDATES
from upt.methods import METHODS
from upt.methods.registry import takers_text, train_options


def _multipart(properties: dict, required: list[str], any_of: list[list[str]] | None = None) -> dict:
    """`required` always; `any_of`: one of these sets of fields as well (e.g. files + labels, or archive)."""
    schema = {"type": "object", "properties": properties, "required": required}
    if any_of:
        schema["anyOf"] = [{"required": fields} for fields in any_of]
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


_text = {"type": "string"}
_texts = {"type": "array", "items": {"type": "string"}}
_files = {"type": "array", "items": {"type": "string", "format": "binary"}}



def _option_property(option) -> dict:
    """A training option of `POST /tasks` as the registry states it, with the methods that take it."""
    schema = option.json_schema()
    if takers := takers_text(option.name):
        schema["description"] += f" ({takers}; auto takes it when one of its candidates does)"
    return schema


TASK_FORM = _multipart({
    "class_names": {**_texts, "description": "one field per class (optional with `archive`: its folders)"},
    "files": {**_files, "description": "images, with `labels` in the same order"},
    "labels": {**_texts, "description": "the class of each file"},
    "archive": {"type": "string", "format": "binary", "description": "a zip of <class name>/<image> folders"},
    "method": {**_text, "enum": [*METHODS, AUTO],
               "description": "a method (`GET /methods` lists them with their options), or auto: train "
                              "`candidates` on one split, keep the best on validation"},
    CANDIDATES.name: CANDIDATES.json_schema(),
    **{option.name: _option_property(option) for option in train_options()},
}, ["method"], any_of=[["class_names", "files", "labels"], ["archive"]])

CLASSIFY_FORM = _multipart({
    "files": _files,
    "task_id": {**_text, "description": "a task: answered by its training-free stage until it has trained"},
    "class_names": {**_texts, "description": "zero-shot classes, instead of task_id"},
    "top_k": {"type": "integer", "minimum": 1, "default": 5},
    "stage": {**_text, "enum": ["instant", "tuned"],
              "description": "with task_id: pin a stage (default: tuned once succeeded, else instant)"},
}, ["files"], any_of=[["task_id"], ["class_names"]])
