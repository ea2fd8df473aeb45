"""GET /tasks/{id}/export: a finished task's model as one ONNX file or OpenVINO IR (zipped), which runs
without upt (see upt.export for what the graph holds and takes).

An export is written once per artifact and format, under the task's folder (exports/<artifact key>/,
removed with the task): a second GET streams the same file. The exports of an earlier artifact of the
task go once one of a new artifact is written.
"""

from __future__ import annotations

import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse

from service.api.deps import ServingDep, SessionDep, StorageDep, TenantDep
from service.api.tasks import tenant_task
from service.db import release_connection
from service.errors import Problem, disk_full, invalid, is_disk_full
from service.models import TaskStatus
from service.storage import Storage
from upt.artifact import load_serving_artifact
from upt.errors import ArtifactError
from upt.export import FORMATS, ExportUnavailableError, export_key, export_predictor, model_metadata

router = APIRouter(tags=["tasks"])
EXPORTS_FOLDER = "exports"
MEDIA_TYPES = {"onnx": "application/octet-stream", "openvino": "application/zip"}
SUFFIXES = {"onnx": ".onnx", "openvino": "-openvino.zip"}  # of the files kept and of the names downloaded


@router.get("/tasks/{task_id}/export", response_class=FileResponse,
            responses={200: {"description": "The model: an .onnx file, or a zip of OpenVINO's model.xml and "
                             "model.bin. Class names and preprocessing are in its metadata.",
                             "content": {media: {} for media in MEDIA_TYPES.values()}}})
def export_task(task_id: str, tenant: TenantDep, session: SessionDep, storage: StorageDep, serving: ServingDep,
                format: Annotated[str, Query(description=f"one of {', '.join(FORMATS)}")] = "onnx") -> FileResponse:
    """The task's trained model with its visual prompts and classifier folded in (CoCoOp: with the
    text encoder, which it runs per image), for ONNX Runtime or OpenVINO. 409 until the task has succeeded."""
    if format not in FORMATS:
        raise invalid("format", f"one of {', '.join(FORMATS)}, not {format!r}.")
    task = tenant_task(session, tenant, task_id)
    release_connection(session)  # an export takes seconds: no connection held meanwhile
    if task.status != TaskStatus.succeeded.value or not storage.has_artifact(task_id):
        raise Problem(409, "No artifact yet", f"Task {task_id} is {task.status}; it can be exported once it has "
                      "succeeded.", type="task-not-finished")
    path = _export(task_id, format, storage, serving)
    return FileResponse(path, media_type=MEDIA_TYPES[format], filename=f"upt-{task_id}{SUFFIXES[format]}")


def _export(task_id: str, format: str, storage: Storage, serving) -> Path:
    """The export of the task's current artifact, written now unless it was before."""
    artifact_dir = storage.artifact_dir(task_id)
    try:
        artifact = load_serving_artifact(artifact_dir)
    except ArtifactError as error:
        raise Problem(409, "Artifact unusable", str(error), type="artifact-unusable")
    exports = storage.task_dir(task_id) / EXPORTS_FOLDER
    path = exports / export_key(artifact) / f"model{SUFFIXES[format]}"
    if path.is_file():
        return path
    predictor = serving.tuned_predictor(task_id, artifact_dir)  # 503 while the backbone loads, 409 on a mismatch
    try:
        _write(predictor, artifact, format, path)
    except ExportUnavailableError as error:
        raise Problem(501, "Export unavailable", str(error), type="export-unavailable")
    except OSError as error:
        if is_disk_full(error):
            raise disk_full()
        raise
    for other in exports.iterdir():  # an earlier artifact's exports are never served again
        if other != path.parent:
            shutil.rmtree(other, ignore_errors=True)
    return path


def _write(predictor, artifact, format: str, path: Path) -> None:
    """Export into a scratch folder beside `path`, then rename the finished file into place: a
    concurrent GET sees the whole file or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=path.parent, prefix=".export-"))
    try:
        files = export_predictor(predictor, format, scratch / ("model.onnx" if format == "onnx" else "model.xml"),
                                 model_metadata(predictor, artifact))
        if format == "onnx":
            files[0].replace(path)
            return
        packed = scratch / "model.zip"
        with zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as archive:
            for file in files:
                archive.write(file, file.name)
        packed.replace(path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
