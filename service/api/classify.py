"""/classify: top-k labels per image, from a finished task's artifact or zero-shot class names."""

from __future__ import annotations

import logging

import torch
from fastapi import APIRouter, Request
from sqlalchemy import select
from fastapi.concurrency import run_in_threadpool

from service.api.deps import (BatcherDep, InstantDep, MetricsDep, ServingDep, SessionDep, SettingsDep, StorageDep,
                              TenantDep)
from service.api.forms import CLASSIFY_FORM
from service.api.tasks import tenant_task
from service.db import release_connection
from service.errors import Problem, invalid, not_found
from service.instant import InstantStages, instant_key
from service.models import Task, TaskStatus
from service.schemas import ClassifyOut, ImagePrediction, Label
from service.task_input import check_class_names, check_known_fields
from service.uploads import (ImageLimits, UploadedFile, check_request_pixels, decode_upload, parse_form, remove,
                             scratch_dir, too_large)

router = APIRouter(tags=["classify"])
log = logging.getLogger("upt.service")
STAGES = ("instant", "tuned")
CLASSIFY_FIELDS = frozenset({"files", "task_id", "class_names", "top_k", "stage"})


@router.post("/classify", response_model=ClassifyOut, openapi_extra=CLASSIFY_FORM)
async def classify(request: Request, tenant: TenantDep, session: SessionDep, settings: SettingsDep,
                   serving: ServingDep, storage: StorageDep, metrics: MetricsDep,
                   batcher: BatcherDep, instant: InstantDep) -> ClassifyOut:
    """Multipart form: `files` (repeated), and `task_id` or `class_names` (repeated); optional `top_k`;
    optional `stage` (`instant` or `tuned`) with a task. The response says which `stage` answered."""
    scratch = scratch_dir(storage.root / "tmp")
    try:
        form = await parse_form(request, scratch, max_files=settings.max_classify_files,
                                max_file_bytes=settings.max_file_bytes, max_total_bytes=settings.max_upload_bytes,
                                max_files_setting="UPT_MAX_CLASSIFY_FILES")
        return await run_in_threadpool(_classify, form, tenant, session, settings, serving, storage, metrics,
                                       batcher, instant)
    finally:
        remove(scratch)


def _top_k(raw: str | None, maximum: int) -> int:
    if raw is None:
        return 5
    # isdigit() alone admits "²", which int() refuses; and int() refuses over 4300 digits.
    value = int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= 9 else 0
    if not 1 <= value <= maximum:
        raise invalid("top_k", f"must be a whole number from 1 to {maximum}.")
    return value


def _task_predictor(task: Task, stage: str | None, serving, storage, instant: InstantStages, session):
    """The best ready stage (tuned once the training succeeded, else instant), or the one pinned. A task
    deleted meanwhile (on another replica: its files go first, then nothing names them) is a 404."""
    tuned_ready = task.status == TaskStatus.succeeded.value and storage.has_artifact(task.id)
    if stage == "tuned" or (stage is None and tuned_ready):
        if not tuned_ready:
            _unless_gone(session, task)
            raise Problem(409, "Task not finished", f"Task {task.id} is {task.status}; its tuned stage answers once "
                          "it has succeeded (poll GET /tasks/{id}); its instant stage answers now.",
                          type="task-not-finished")
        try:
            return serving.tuned_predictor(task.id, storage.artifact_dir(task.id)), "tuned"
        except FileNotFoundError:
            _unless_gone(session, task)
            raise
    folder = instant.ensure(task.id)  # built right after creation; built here if that build was lost
    try:
        return serving.tuned_predictor(instant_key(task.id), folder), "instant"
    except FileNotFoundError:
        _unless_gone(session, task)
        raise


def _unless_gone(session, task: Task) -> None:
    """A 404 if the task's row is gone by now (deleted while this request looked at its files)."""
    if session.scalar(select(Task.id).where(Task.id == task.id)) is None:
        raise not_found(f"Task {task.id}")
    release_connection(session)


def _preprocessed(predictor, upload: UploadedFile, limits: ImageLimits) -> torch.Tensor:
    """One upload decoded and preprocessed (a batch of one), or the 4xx that says why it cannot be."""
    image = decode_upload(upload.path.read_bytes(), upload.filename, "files", limits)
    try:
        return predictor.preprocess([image])
    except MemoryError:
        raise too_large(f"{upload.filename}: preprocessing it needs more memory than this server has; send a "
                        "smaller image (UPT_MAX_IMAGE_PIXELS, UPT_MAX_IMAGE_ASPECT).") from None
    except Exception:  # the decoded image is the client's; whatever preprocessing refuses in it is a 4xx
        log.warning("preprocessing %r failed", upload.filename, exc_info=True)
        raise invalid("files", f"{upload.filename} cannot be preprocessed for the model (its size or "
                      "mode); re-encode it as an ordinary RGB image.") from None


def _classify(form, tenant, session, settings, serving, storage, metrics, batcher, instant) -> ClassifyOut:
    check_known_fields(form, CLASSIFY_FIELDS)
    task_id, names = form.one("task_id"), form.many("class_names")
    top_k = _top_k(form.one("top_k"), settings.max_top_k)
    files = form.files_of("files")
    if not files:
        raise invalid("files", "upload at least one image as `files`.")
    if task_id and names:
        raise invalid("task_id", "give either `task_id` (a finished task) or `class_names` (zero-shot), not both.")
    if not task_id and not names:
        raise invalid("task_id", "give `task_id` of a task, or `class_names` for zero-shot.")
    stage = form.one("stage")
    if stage is not None and (not task_id or stage not in STAGES):
        raise invalid("stage", f"with a `task_id`, one of {', '.join(STAGES)}.")
    task = None
    if task_id:
        task = tenant_task(session, tenant, task_id)
        release_connection(session)  # the rest (artifact, encoder pass) can take seconds under load
    # From the images' headers, before a predictor is built (a text-encoder pass, an instant build) or any
    # pixel is decoded: what the request would cost is known from them alone.
    limits = ImageLimits.of(settings, input_side=serving.backbone().image.size)
    check_request_pixels([(f.path, f.filename, "files") for f in files], limits)
    if task is not None:
        predictor, stage = _task_predictor(task, stage, serving, storage, instant, session)
    else:
        predictor, stage = serving.zero_shot_predictor(check_class_names(names, settings)), "zero-shot"
    # One image decoded at a time: 64 uploads of 40 MP each would be gigabytes of pixels at once,
    # while their preprocessed tensors are a few hundred KB each.
    batch = torch.cat([_preprocessed(predictor, upload, limits) for upload in files])
    metrics.classify_batch.observe(len(files))
    logits = batcher.logits(predictor, batch, tenant=tenant.id if tenant is not None else None)
    ranked = predictor.rank(logits, top_k)  # the same ranking as Predictor.predict, on micro-batched logits
    return ClassifyOut(
        task_id=task_id, stage=stage, class_names=list(predictor.class_names),
        predictions=[ImagePrediction(filename=f.filename,
                                     labels=[Label(label=p.label, probability=p.probability) for p in top])
                     for f, top in zip(files, ranked)],
    )
