"""A Python client of upt's HTTP API: create a task from a folder or a zip, wait for it, classify,
download its artifact, export it.

    from upt.client import Client

    with Client("http://127.0.0.1:8000", api_key="...") as client:
        task = client.create_task("photos/", method="upt", shots=8)   # photos/<class>/<image>
        task = client.wait(task["id"])                                 # a progress bar on stderr
        result = client.classify(["a.jpg", "b.jpg"], task_id=task["id"])
        client.export(task["id"], "onnx", out="model.onnx")

Answers are the API's JSON documents as dicts (a task as `GET /tasks/{id}` gives it, a
classification as `POST /classify` does). Every error answer raises `ApiError`, which carries the
problem document (RFC 9457: type, title, status, detail, and `errors` per field where given).
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import httpx

from .errors import UptError

if TYPE_CHECKING:
    from PIL import Image

# How long to wait between two polls of a task when the API names no Retry-After.
POLL_S = 1.0
# A Retry-After is followed, but never for longer than this: the bar should still move.
MAX_POLL_S = 10.0
FINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
URL_ENV, API_KEY_ENV = "UPT_URL", "UPT_API_KEY"
DEFAULT_URL = "http://127.0.0.1:8000"
PROBLEM_MEDIA_TYPE = "application/problem+json"

ImageInput = Union[str, os.PathLike, bytes, "Image.Image"]


class ApiError(UptError):
    """An error answer of the API, with its problem document (`problem`) and its fields as attributes."""

    def __init__(self, problem: dict[str, Any]) -> None:
        self.problem = problem
        self.type: str = str(problem.get("type", "about:blank"))
        self.title: str = str(problem.get("title", "HTTP error"))
        self.status: int = int(problem.get("status", 0))
        self.detail: str = str(problem.get("detail", ""))
        self.errors: list[dict[str, str]] = list(problem.get("errors") or [])
        super().__init__(f"{self.status} {self.title}: {self.detail}" if self.detail else f"{self.status} {self.title}")

    @classmethod
    def of(cls, response: httpx.Response) -> "ApiError":
        """From an error response: its problem document, or one made of its status and body text (a
        proxy's HTML error page is no problem document, and says what happened all the same)."""
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict) or "status" not in body:
            body = {"type": "about:blank", "title": response.reason_phrase or "HTTP error",
                    "status": response.status_code, "detail": response.text[:500]}
        return cls(body)


class TaskFailedError(UptError):
    """`wait` saw the task end as failed or cancelled; `task` is its last state."""

    def __init__(self, task: dict[str, Any]) -> None:
        self.task = task
        error = task.get("error")
        super().__init__(f"Task {task.get('id')} {task.get('status')}" + (f": {error}" if error else "."))


class Client:
    """The API at `url` (default: $UPT_URL, else http://127.0.0.1:8000) with `api_key` (default:
    $UPT_API_KEY; none for an API that requires no keys). `transport`: an httpx transport (tests)."""

    def __init__(self, url: str | None = None, api_key: str | None = None, timeout: float = 300.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        url = url or os.environ.get(URL_ENV) or DEFAULT_URL
        api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- tasks ------------------------------------------------------------------------------------

    def create_task(self, data: str | os.PathLike, method: str = "coop", class_names: list[str] | None = None,
                    idempotency_key: str | None = None, **options: Any) -> dict[str, Any]:
        """A task trained on `data`: a folder in ImageFolder layout (`data/<class>/<image>`, with an
        optional classnames.txt of display names) or a zip of class folders. `options` are the
        method's (shots, epochs, seed, n_ctx, depth, ...: `GET /methods` lists them). Returns the
        queued task."""
        path = Path(data)
        form: list[tuple[str, str]] = [("method", method)]
        form += [(name, str(value)) for name, value in options.items() if value is not None]
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        if path.is_dir():
            names, files, labels = _folder_upload(path)
            form += [("class_names", name) for name in (class_names or names)]
            form += [("labels", label) for label in labels]
            return self._json("POST", "/tasks", data=_fields(form), files=files, headers=headers)
        if not path.is_file():
            raise UptError(f"{path} is neither a folder of class folders nor a zip of them.")
        form += [("class_names", name) for name in class_names or []]
        files = [("archive", (path.name, path.read_bytes(), "application/zip"))]
        return self._json("POST", "/tasks", data=_fields(form), files=files, headers=headers)

    def task(self, task_id: str) -> dict[str, Any]:
        return self._json("GET", f"/tasks/{task_id}")

    def tasks(self, status: Iterable[str] = (), limit: int = 20) -> Iterator[dict[str, Any]]:
        """Every task of this key's tenant, newest first (page after page), optionally of some statuses."""
        cursor = None
        while True:
            params: list[tuple[str, str]] = [("limit", str(limit))] + [("status", s) for s in status]
            if cursor:
                params.append(("cursor", cursor))
            page = self._json("GET", "/tasks", params=params)
            yield from page["items"]
            cursor = page.get("next_cursor")
            if not cursor:
                return

    def cancel(self, task_id: str) -> dict[str, Any]:
        return self._json("POST", f"/tasks/{task_id}/cancel")

    def delete(self, task_id: str) -> None:
        self._request("DELETE", f"/tasks/{task_id}")

    def wait(self, task_id: str, timeout: float | None = None, progress: bool = True) -> dict[str, Any]:
        """The task once it has succeeded, following `GET /tasks/{id}` (with its ETag, so an unchanged
        task costs a bodiless 304, and at the pace its Retry-After asks) with a progress bar on stderr.
        TaskFailedError if it failed or was cancelled; TimeoutError after `timeout` seconds."""
        from tqdm.auto import tqdm

        deadline = None if timeout is None else time.monotonic() + timeout
        response = self._request("GET", f"/tasks/{task_id}")
        task, etag = response.json(), response.headers.get("ETag")
        with tqdm(total=100, unit="%", desc=f"task {task_id[:8]}", disable=not progress, leave=True) as bar:
            while True:
                _show(bar, task)
                if task["status"] in FINAL_STATUSES:
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"Task {task_id} is still {task['status']} after {timeout} s.")
                time.sleep(_poll_delay(response, deadline))
                response = self._request("GET", f"/tasks/{task_id}", headers={"If-None-Match": etag} if etag else {})
                if response.status_code != 304:  # 304: unchanged since the ETag, no body sent
                    task = response.json()
                etag = response.headers.get("ETag", etag)
        if task["status"] != "succeeded":
            raise TaskFailedError(task)
        return task

    # -- serving ----------------------------------------------------------------------------------

    def classify(self, images: ImageInput | Iterable[ImageInput], task_id: str | None = None,
                 class_names: list[str] | None = None, top_k: int | None = None,
                 stage: str | None = None) -> dict[str, Any]:
        """`POST /classify` of image files (paths), PIL images or encoded image bytes, by a task or
        zero-shot by `class_names`; `stage` pins `instant` or `tuned`. The API's answer: per image its
        `filename` and top `labels` with probabilities, and the `stage` that answered."""
        files = [("files", upload) for upload in _image_uploads(images)]
        form: list[tuple[str, str]] = []
        if task_id is not None:
            form.append(("task_id", task_id))
        form += [("class_names", name) for name in class_names or []]
        if top_k is not None:
            form.append(("top_k", str(top_k)))
        if stage is not None:
            form.append(("stage", stage))
        return self._json("POST", "/classify", data=_fields(form), files=files)

    def artifact(self, task_id: str, out: str | os.PathLike | None = None) -> bytes | Path:
        """The task's artifact as a zip: its bytes, or written to `out` (returned)."""
        return _keep(self._request("GET", f"/tasks/{task_id}/artifact").content, out)

    def export(self, task_id: str, format: str = "onnx", out: str | os.PathLike | None = None) -> bytes | Path:
        """The task's model exported to run without upt: ONNX (one .onnx file) or OpenVINO (a zip of
        model.xml and model.bin); its bytes, or written to `out` (returned)."""
        return _keep(self._request("GET", f"/tasks/{task_id}/export", params={"format": format}).content, out)

    def methods(self) -> list[dict[str, Any]]:
        return self._json("GET", "/methods")

    # -- transport --------------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as error:
            raise UptError(f"Cannot reach the upt API at {self.url}: {error}") from error
        if response.status_code >= 400:
            raise ApiError.of(response)
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._request(method, path, **kwargs).json()


def _show(bar, task: dict[str, Any]) -> None:
    bar.n = round(100 * float(task.get("progress") or 0.0))
    epoch, epochs = task.get("epoch"), task.get("epochs")
    bar.set_postfix_str(task["status"] + (f", epoch {epoch}/{epochs}" if epoch and epochs else ""), refresh=False)
    bar.refresh()


def _poll_delay(response: httpx.Response, deadline: float | None) -> float:
    raw = response.headers.get("Retry-After", "")
    delay = min(float(raw), MAX_POLL_S) if raw.isdigit() else POLL_S
    return delay if deadline is None else max(0.0, min(delay, deadline - time.monotonic()))


def _folder_upload(root: Path) -> tuple[list[str], list[tuple[str, tuple[str, bytes, str]]], list[str]]:
    """(class names, `files` uploads, their labels) of an ImageFolder, as `upt train --data` reads it."""
    from .data import scan_image_folder

    folder = scan_image_folder(root)
    files = [("files", (sample.path.name, sample.path.read_bytes(), "application/octet-stream"))
             for sample in folder.samples]
    return folder.class_names, files, [folder.class_names[sample.label] for sample in folder.samples]


def _image_uploads(images: ImageInput | Iterable[ImageInput]) -> list[tuple[str, bytes, str]]:
    """(filename, bytes, media type) per image: a path's own file, bytes as given, a PIL image as PNG."""
    if isinstance(images, (str, os.PathLike, bytes)) or hasattr(images, "save"):
        images = [images]
    uploads = []
    for index, image in enumerate(images, 1):
        if isinstance(image, (str, os.PathLike)):
            path = Path(image)
            uploads.append((path.name, path.read_bytes(), "application/octet-stream"))
        elif isinstance(image, bytes):
            uploads.append((f"image-{index}", image, "application/octet-stream"))
        elif hasattr(image, "save"):  # a PIL image
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            uploads.append((f"image-{index}.png", buffer.getvalue(), "image/png"))
        else:
            raise TypeError(f"image {index} is a {type(image).__name__}: give a path, bytes or a PIL image.")
    if not uploads:
        raise UptError("Give at least one image to classify.")
    return uploads


def _keep(content: bytes, out: str | os.PathLike | None) -> bytes | Path:
    if out is None:
        return content
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def _fields(pairs: list[tuple[str, str]]) -> dict[str, list[str]]:
    """Form fields for httpx, a repeated field as one list in its order (labels follow the files')."""
    fields: dict[str, list[str]] = {}
    for name, value in pairs:
        fields.setdefault(name, []).append(value)
    return fields
