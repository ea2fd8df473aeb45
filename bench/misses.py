"""Cache misses of /classify, in process, old way against new way in one run (ViT-B-16, random weights).

- Zero-shot miss for 100 classes: `template_classifier` (all class prompts in a few text passes, one
  per prompt length) against one text pass per class (how it was written before), same classifier
  to 1e-6, timed in alternating rounds.
- Tuned-task miss: `Predictor.from_artifact` (reads W and the visual prompts, checks their own sha256)
  against reading and hashing the whole artifact (`load_artifact`, as before), for a UPT artifact
  (θ makes it megabytes) of 10 classes.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

from _timing import interleaved_ratios, machine, median_seconds
from upt.artifact import TENSORS_FILE, load_artifact, save_artifact
from upt.backbone import random_backbone
from upt.encoders import encode_text
from upt.methods import PromptConfig, PromptedCLIP, template_classifier
from upt.methods.config import DEFAULT_TEMPLATE
from upt.predict import Predictor


def per_class_classifier(backbone, names: list[str], templates: tuple[str, ...]) -> torch.Tensor:
    rows = []
    for name in names:
        tokens = backbone.tokenizer([t.format(name.replace("_", " ").strip()) for t in templates])
        rows.append(F.normalize(encode_text(backbone.clip, tokens, normalize=True).mean(dim=0), dim=-1))
    return torch.stack(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    backbone = random_backbone(args.model)
    names = list(IMAGENET_CLASSNAMES[: args.classes])
    templates = (DEFAULT_TEMPLATE,)
    print(f"# {args.model} (random weights), {machine()}")
    with torch.no_grad():
        difference = (template_classifier(backbone, names, templates)
                      - per_class_classifier(backbone, names, templates)).abs().max().item()
    old, ratios = interleaved_ratios(lambda: per_class_classifier(backbone, names, templates),
                                     {"batched": lambda: template_classifier(backbone, names, templates)},
                                     args.repeats)
    batched = ratios["batched"]
    print(f"zero-shot miss, {args.classes} classes: one text pass per class {1000 * old:.0f} ms, batched "
          f"{1000 * batched.seconds:.0f} ms: {1 / batched.median:.2f} of before, timed in the same rounds "
          f"({1 / batched.high:.2f}-{1 / batched.low:.2f}), max |W difference| {difference:.1e}")
    with tempfile.TemporaryDirectory() as tmp:
        model = PromptedCLIP(backbone, names[:10], PromptConfig("upt")).eval()
        tensors = {f"prompt.{k}": v for k, v in model.state_dict().items()} | model.export()
        folder = save_artifact(Path(tmp) / "upt", backbone=backbone, method="upt", class_names=names[:10],
                               tensors=tensors, options={})
        size = (folder / TENSORS_FILE).stat().st_size
        whole = median_seconds(lambda: load_artifact(folder), args.repeats * 5)
        serving = median_seconds(lambda: Predictor.from_artifact(backbone, folder), args.repeats * 5)
    print(f"tuned-task miss, UPT artifact of {size / 1e6:.1f} MB: whole artifact read and hashed "
          f"{1000 * whole:.1f} ms, serving tensors only (Predictor.from_artifact) {1000 * serving:.2f} ms "
          f"({whole / serving:.0f}x less)")


if __name__ == "__main__":
    main()
