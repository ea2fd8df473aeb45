"""Run an exported upt model as a user without upt would: ONNX Runtime, Pillow and NumPy only.

    python standalone_onnx.py MODEL.onnx IMAGE... -> JSON on stdout: per image its top label and logits

Importing upt, torch or open_clip here fails, so a model that needed them could not pass.
"""

from __future__ import annotations

import importlib.abc
import json
import sys

FORBIDDEN = ("upt", "torch", "open_clip", "torchvision")


class _Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in FORBIDDEN:
            raise ImportError(f"{name} must not be needed to run an exported model")
        return None


sys.meta_path.insert(0, _Refuse())

import numpy as np  # noqa: E402
import onnxruntime  # noqa: E402
from PIL import Image  # noqa: E402


def pixels(path: str, size: int) -> np.ndarray:
    """The preprocessing the model's metadata states: shorter side to `size` (bicubic), centre crop,
    RGB scaled to [0, 1], (3, size, size)."""
    image = Image.open(path).convert("RGB")
    width, height = image.size
    scale = size / min(width, height)
    resized = (size, int(height * scale)) if width <= height else (int(width * scale), size)
    image = image.resize(resized, Image.BICUBIC)
    left, top = int(round((image.width - size) / 2.0)), int(round((image.height - size) / 2.0))
    image = image.crop((left, top, left + size, top + size))
    return (np.asarray(image, dtype=np.float32) / 255.0).transpose(2, 0, 1)


def main(model: str, images: list[str]) -> None:
    session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    metadata = session.get_modelmeta().custom_metadata_map
    class_names, size = json.loads(metadata["class_names"]), int(metadata["image_size"])
    batch = np.stack([pixels(path, size) for path in images])
    logits, probabilities = session.run(["logits", "probabilities"], {metadata["input"]: batch})
    print(json.dumps({"labels": [class_names[i] for i in logits.argmax(axis=1)], "logits": logits.tolist(),
                      "probability_sums": probabilities.sum(axis=1).tolist(),
                      "loaded": sorted(m for m in FORBIDDEN if m in sys.modules)}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
