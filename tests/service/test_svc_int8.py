"""The opt-in int8 image encoder (UPT_SERVE_PRECISION=int8): served when asked for with calibration
images, and a clear /readyz failure, not a silent fallback, when the images are missing."""

from __future__ import annotations

import sys
import time

import httpx
import pytest

from svc_helpers import CLASSES, FIXTURES, Proc, base_env, free_port, images, wait_http

pytest.importorskip("openvino")
pytest.importorskip("nncf", reason="int8 needs NNCF (pip install nncf, the int8 extra: pip install 'upt[service,int8]')")


def _readyz(tmp_path, tiny_checkpoint, name: str, **overrides) -> tuple[dict, str, Proc]:
    env = base_env(tmp_path / name, tiny_checkpoint, UPT_SERVE_RUNTIME="openvino", UPT_SERVE_PRECISION="int8",
                   **overrides)
    port = free_port()
    server = Proc([sys.executable, "-m", "service", "serve", "--no-worker", "--port", str(port)], env,
                  tmp_path / f"{name}.log")
    url = f"http://127.0.0.1:{port}"
    wait_http(url, server)
    deadline = time.monotonic() + 120
    while True:
        ready = httpx.get(f"{url}/readyz", timeout=30).json()
        if "still loading" not in ready["checks"]["backbone"]["detail"] or time.monotonic() > deadline:
            return ready, url, server
        time.sleep(0.3)


def test_int8_serves_when_asked_for_with_calibration_images(tmp_path, tiny_checkpoint):
    ready, url, server = _readyz(tmp_path, tiny_checkpoint, "with", UPT_SERVE_CALIBRATION_DIR=str(FIXTURES / "train"))
    try:
        assert ready["ready"], ready
        assert ready["checks"]["image_encoder"]["detail"] == "openvino int8 on cpu (calibrated on 64 images)"
        files = [("files", (p.name, p.read_bytes(), "image/png")) for _, p in images("test", 1)]
        response = httpx.post(f"{url}/classify", data={"class_names": CLASSES}, files=files, timeout=60)
        assert response.status_code == 200, response.text
    finally:
        server.stop()


def test_int8_without_calibration_images_says_what_is_missing_and_serves_pytorch(tmp_path, tiny_checkpoint):
    ready, _, server = _readyz(tmp_path, tiny_checkpoint, "without")
    try:
        # A serving setting never takes the backbone (and POST /tasks with it) down: PyTorch serves.
        assert ready["ready"] and ready["checks"]["backbone"]["ok"], ready
        detail = ready["checks"]["image_encoder"]["detail"]
        assert detail.startswith("pytorch") and "UPT_SERVE_CALIBRATION_DIR" in detail, detail
    finally:
        server.stop()
