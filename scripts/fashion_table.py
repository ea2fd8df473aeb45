"""Train every method through the CLI on the Fashion-MNIST fixture and print the README's table.

Same settings as tests/core/test_cli.py. The tiny backbone has random weights: the table shows that
each method learns from real images, not what it would reach on a real CLIP.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from upt.methods import CACHE_METHODS, METHODS

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "fashion_mnist"
OPTIONS = ["--shots", "16", "--epochs", "100", "--lr", "0.05", "--batch-size", "16", "--seed", "1"]
CACHE_OPTIONS = ["--shots", "16", "--seed", "1"]  # Tip-Adapter(-F): the paper's recipe, as in test_cli.py


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "upt-tiny.pt"
        subprocess.run([sys.executable, "-m", "upt", "tiny-checkpoint", str(checkpoint)], check=True,
                       capture_output=True)
        print("| method | trainable parameters (tiny) | validation accuracy | held-out accuracy (40 images) |")
        print("|---|---|---|---|")
        for method in METHODS:
            options = CACHE_OPTIONS if method in CACHE_METHODS else OPTIONS
            command = [sys.executable, "-m", "upt", "train", "--data", str(FIXTURE / "train"), "--method", method,
                       *options, "--model", "upt-tiny", "--pretrained", str(checkpoint), "--out",
                       str(Path(tmp) / method), "--eval-data", str(FIXTURE / "test"), "--json", "--quiet"]
            result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
            metrics = result["metrics"]
            print(f"| {method} | {result['trainable_parameters']:,} | {100 * metrics['val_accuracy']:.1f}% "
                  f"| {100 * result['eval']['accuracy']:.1f}% |", flush=True)


if __name__ == "__main__":
    main()
