"""Local storage of uploads, checkpoints and artifacts: one folder per task, under UPT_DATA_DIR/storage.

    storage/tasks/<task id>/data/<class index>/<n>.png  uploaded images, re-encoded as PNG; the class
                        folder is the class's index as 00000, 00001, ... and <n> counts from 00001 (tasks
                        stored before had folders named by class: see `task_class_folders`)
    storage/tasks/<task id>/checkpoint/last.pt          the latest epoch checkpoint (a retry resumes from it;
                        the checkpoint folder is removed when the task succeeds or is cancelled)
    storage/tasks/<task id>/checkpoint/candidates/      method=auto, one set per candidate (each trained by a
                        job of its own): <method>.checkpoint/, <method>.partial-<lease>/ while it trains,
                        and <method>/, the finished candidate's artifact, renamed into place
    storage/tasks/<task id>/artifact/                   adapter_config.json + prompts.safetensors; written
                        as artifact.partial-<lease>/ and renamed into place when the task succeeds
    storage/tasks/<task id>/instant-<build>/            the training-free stage's artifact (same format),
                        written as instant.partial-<build>/ and renamed; the row names the build
    storage/tmp/upload-<owner>-<random>/                a request's uploads while it is parsed and checked
                        (service.scratch: its process holds tmp-owners/<owner>.lock while it lives)

In production the storage folder is a volume shared by the API replicas and the workers. The task
folders are removed with their rows; scratch and row-less folders left by killed requests are removed by
`service.recovery.sweep_storage`.
"""

from __future__ import annotations

import io
import json
import shutil
import zipfile
from pathlib import Path

from service.errors import shown_weights, without_paths
from service.settings import Settings


class Storage:
    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def from_settings(cls, settings: Settings) -> "Storage":
        return cls(settings.storage_dir.resolve())

    def task_dir(self, task_id: str) -> Path:
        if not task_id.isalnum():  # ids are uuid hex; never let one escape the folder
            raise ValueError(f"bad task id {task_id!r}")
        return self.root / "tasks" / task_id

    def data_dir(self, task_id: str) -> Path:
        return self.task_dir(task_id) / "data"

    @staticmethod
    def class_folders(class_count: int) -> list[str]:
        """A task's images are stored by class index: a class name may hold '/', start with '.' or be
        longer than a folder name may be; the names live in the database and the artifact."""
        return [f"{index:05d}" for index in range(class_count)]

    def task_class_folders(self, task_id: str, class_count: int) -> list[str] | None:
        """The folders of a task's classes: by index, or None (named by class) for a task stored before."""
        folders = self.class_folders(class_count)
        return folders if (self.data_dir(task_id) / folders[0]).is_dir() else None

    def checkpoint_dir(self, task_id: str) -> Path:
        return self.task_dir(task_id) / "checkpoint"

    def artifact_dir(self, task_id: str) -> Path:
        return self.task_dir(task_id) / "artifact"

    def has_artifact(self, task_id: str) -> bool:
        return (self.artifact_dir(task_id) / "adapter_config.json").is_file()

    def instant_dir(self, task_id: str, build: str | None = None) -> Path:
        """The instant stage published by `build` (the task row's `instant_build`); None: the folder of
        a stage published before builds were named."""
        if build is not None and not build.isalnum():
            raise ValueError(f"bad build id {build!r}")
        return self.task_dir(task_id) / ("instant" if build is None else f"instant-{build}")

    def has_instant(self, task_id: str, build: str | None = None) -> bool:
        return (self.instant_dir(task_id, build) / "adapter_config.json").is_file()

    def delete_task(self, task_id: str) -> None:
        shutil.rmtree(self.task_dir(task_id), ignore_errors=True)

    def delete_checkpoints(self, task_id: str) -> None:
        shutil.rmtree(self.checkpoint_dir(task_id), ignore_errors=True)

    def artifact_zip(self, task_id: str) -> bytes:
        """The artifact folder as a zip (a few hundred KB: prompts and a classifier matrix)."""
        buffer = io.BytesIO()
        folder = self.artifact_dir(task_id)
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(folder.rglob("*")):
                if path.name == CONFIG_FILE and path.parent == folder:
                    archive.writestr(str(Path(task_id) / CONFIG_FILE), shown_config(path.read_text(encoding="utf-8")))
                elif path.is_file():
                    archive.write(path, Path(task_id) / path.relative_to(folder))
        return buffer.getvalue()


CONFIG_FILE = "adapter_config.json"


def shown_config(text: str) -> str:
    """An artifact's adapter_config.json as a client may see it: the backbone's weights as their file
    name and sha256 prefix, and any other server path shortened to its last component (the server's
    layout is no client's business; loading checks the weights by sha256, not by path)."""
    def shown(value):
        if isinstance(value, dict):
            return {key: shown(item) for key, item in value.items()}
        if isinstance(value, list):
            return [shown(item) for item in value]
        return without_paths(value) if isinstance(value, str) else value

    config = json.loads(text)
    backbone = config.get("backbone")
    if isinstance(backbone, dict) and isinstance(backbone.get("pretrained"), str):
        backbone["pretrained"] = shown_weights(backbone["pretrained"], backbone.get("weights_sha256"))
    return json.dumps(shown(config), indent=2, ensure_ascii=False)
