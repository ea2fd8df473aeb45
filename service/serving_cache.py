"""The API process's frozen backbone and its predictors, loaded once and cached.

The backbone loads once per process (seconds to minutes for a real CLIP). A failure to load is kept
for FAILURE_TTL_S so /readyz and /classify answer fast instead of retrying a download on every call.
Tuned predictors (one per artifact) and zero-shot predictors (one per class list) sit in LRU caches
bounded by bytes: building one costs a text-encoder pass (zero-shot) or reading the artifact's serving
tensors (tuned), serving from one only an image-encoder pass.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

from service.errors import Problem, shown_weights, without_paths
from service.settings import Settings
from service.shared_encoder import SharedImageEncoder
from upt.backbone import load_backbone
from upt.errors import ArtifactError, BackboneMismatchError, ConfigError, UptError
from upt.predict import Predictor
from upt.serving import TorchImageEncoder, build_image_encoder, calibration_images

log = logging.getLogger("upt.service")
FAILURE_TTL_S = 30.0
LOAD_WAIT_S = 60.0  # how long a request waits for a load in progress


class LruCache:
    """Least-recently-used cache bounded by the bytes its values hold (`weigh(value)`), not a count:
    a tuned 10-class predictor holds kilobytes, a zero-shot one for 1,000 classes megabytes."""

    def __init__(self, max_bytes: int, weigh: Callable[[Any], int]) -> None:
        self.max_bytes = max_bytes
        self.weigh = weigh
        self.bytes = 0
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def get_or_create(self, key: Hashable, create: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key][0]
        value = create()  # outside the lock: building a predictor must not block cached hits
        weight = self.weigh(value)
        with self._lock:
            if key in self._items:  # built concurrently by another request: keep one
                self.bytes -= self._items.pop(key)[1]
            self._items[key] = (value, weight)
            self.bytes += weight
            while self.bytes > self.max_bytes and len(self._items) > 1:  # the newest stays, whatever its size
                self.bytes -= self._items.popitem(last=False)[1][1]
        return value

    def discard(self, key: Hashable) -> None:
        with self._lock:
            item = self._items.pop(key, None)
            if item is not None:
                self.bytes -= item[1]


class ServingCache:
    """What serving needs, built once per API process: the frozen backbone, its serving image encoder
    and the two predictor caches (tuned, zero-shot).

    The backbone loads in a background thread, so a slow or failing load (a real CLIP download can
    take minutes, or a minute to time out offline) never holds up /livez or /readyz."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._backbone = None
        self._encoder = None
        self.encoder_note = ""
        self._failure: tuple[float, str] | None = None
        self._loading: threading.Thread | None = None
        self._lock = threading.Lock()
        self.tuned = LruCache(settings.predictor_cache_bytes, _predictor_bytes)
        self.zero_shot = LruCache(settings.predictor_cache_bytes, _predictor_bytes)

    def start_loading(self) -> threading.Thread | None:
        """Start a load unless one runs, it succeeded, or it failed less than FAILURE_TTL_S ago."""
        with self._lock:
            if self._backbone is not None:
                return None
            if self._loading is not None and self._loading.is_alive():
                return self._loading
            if self._failure and time.monotonic() - self._failure[0] < FAILURE_TTL_S:
                return None
            self._loading = threading.Thread(target=self._load, name="backbone-load", daemon=True)
            self._loading.start()
            return self._loading

    def _load(self) -> None:
        try:
            backbone = load_backbone(self.settings.model, self.settings.pretrained, self.settings.device)
            self._encoder = self._build_encoder(backbone)  # compiled once here, never per request
        except UptError as error:
            self._failure = (time.monotonic(), str(error))
            return
        except Exception as error:  # an unexpected failure is reported the same way, with its type
            self._failure = (time.monotonic(), f"{type(error).__name__}: {error}")
            return
        self._failure = None
        self._backbone = backbone

    def _build_encoder(self, backbone):
        """The configured serving encoder; one that cannot be built as configured (int8 without its
        calibration images or with the PyTorch runtime) serves PyTorch with a note /readyz shows: a
        serving setting never takes the backbone, and with it POST /tasks, down."""
        try:
            encoder, note = self._configured_encoder(backbone)
        except (UptError, ValueError, OSError) as error:
            encoder, _ = build_image_encoder(backbone, "pytorch", "auto")
            note = f"{without_paths(str(error))} Serving PyTorch instead."
        self.encoder_note = note
        if note:
            log.warning("Serving with %s: %s", encoder.describe(), note)
        return SharedImageEncoder(encoder)

    def _configured_encoder(self, backbone):
        calibration = None
        if self.settings.serve_precision == "int8":
            if self.settings.serve_runtime == "pytorch":
                raise ConfigError("UPT_SERVE_PRECISION=int8 is served by OpenVINO only, not with "
                                  "UPT_SERVE_RUNTIME=pytorch.")
            if self.settings.serve_calibration_dir is None:
                raise ConfigError("UPT_SERVE_PRECISION=int8 needs UPT_SERVE_CALIBRATION_DIR: a folder of real "
                                  "images of the kind served, to calibrate the int8 image encoder on.")
            calibration = calibration_images(backbone, self.settings.serve_calibration_dir)
        return build_image_encoder(backbone, self.settings.serve_runtime, self.settings.serve_precision,
                                   self.settings.compiled_dir, calibration)

    def image_encoder(self, backbone) -> SharedImageEncoder:
        """The image encoder that serves `backbone`: the micro-batcher's for every pass, and the
        instant stage's for its background passes, which yield to /classify's."""
        if self._encoder is None or backbone is not self._backbone:
            return SharedImageEncoder(TorchImageEncoder(backbone))
        return self._encoder

    def encoder_status(self) -> tuple[bool, str]:
        if self._encoder is None:
            return False, "not built: the backbone is not loaded"
        note = f" ({self.encoder_note})" if self.encoder_note else ""
        return True, self._encoder.describe() + note

    def backbone(self, wait_s: float = LOAD_WAIT_S):
        """The loaded backbone, or a 503 problem that says how to configure one (or to retry)."""
        if self._backbone is not None:
            return self._backbone
        loading = self.start_loading()
        if loading is not None:
            loading.join(wait_s)
        if self._backbone is not None:
            return self._backbone
        if self._failure is not None:
            raise self._unavailable(self._failure[1])
        raise Problem(503, "Backbone loading", f"The backbone {self.settings.model!r} is still loading; retry "
                      "in a little while.", type="backbone-loading", headers={"Retry-After": "10"})

    def backbone_status(self) -> tuple[bool, str]:
        try:
            backbone = self.backbone(wait_s=0.5)
        except Problem as problem:
            return False, problem.detail
        return True, f"{backbone.name} ({self.shown_weights(backbone)}) on {backbone.device}"

    def shown_weights(self, backbone=None) -> str:
        return shown_weights(self.settings.pretrained, backbone.weights_sha256 if backbone is not None else None)

    def _unavailable(self, reason: str) -> Problem:
        return Problem(
            503, "Backbone unavailable",
            f"The backbone {self.settings.model!r} with {self.shown_weights()!r} cannot be loaded: {without_paths(reason)} "
            "Set UPT_MODEL and UPT_PRETRAINED (an open_clip model name and a pretrained tag or a local "
            "checkpoint file), then restart the service.",
            type="backbone-unavailable",
        )

    def tuned_predictor(self, task_id: str, artifact_dir: Path):
        backbone = self.backbone()

        def build():
            try:
                return Predictor.from_artifact(backbone, artifact_dir)
            except BackboneMismatchError as error:
                raise Problem(409, "Backbone mismatch", f"{error} The service runs {backbone.name} "
                              f"({self.shown_weights(backbone)}); classify with the backbone the task was trained on.",
                              type="backbone-mismatch")
            except ArtifactError as error:
                raise Problem(409, "Artifact unusable", str(error), type="artifact-unusable")

        return self.tuned.get_or_create(task_id, build)

    def zero_shot_predictor(self, class_names: list[str]):
        backbone = self.backbone()
        return self.zero_shot.get_or_create(tuple(class_names), lambda: Predictor.zero_shot(backbone, class_names))


def _predictor_bytes(predictor) -> int:
    return predictor.nbytes
