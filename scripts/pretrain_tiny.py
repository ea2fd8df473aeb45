"""Pretrain the project's tiny open_clip (`upt-tiny`) CLIP's way on Debian's Fashion-MNIST training set.

A real pretrained CLIP cannot be downloaded here, so this makes a small one that knows something:
both towers are trained from scratch with CLIP's objective (symmetric InfoNCE over a batch of
image-caption pairs, learnable logit scale clamped at 100) on the 60,000 training images, each paired
with a caption drawn from several templates (fashion_mnist.PRETRAIN_TEMPLATES). The held-out
templates and the text-shift names never appear in a caption; the test split is never seen.

    apt-get install dataset-fashion-mnist
    nice -n 5 .venv/bin/python scripts/pretrain_tiny.py          # writes upt/weights/, then evaluates

The result is an ordinary open_clip checkpoint (fp16 safetensors, loaded into float32), used like any
real one: `--model upt-tiny --pretrained upt/weights/upt-tiny-fashion-mnist.safetensors`. The run is
seeded (data order, augmentation, captions, initialisation) and single-process, so the same command
on the same torch build and thread count writes the same file; its sha256 is printed and written
beside it (`<file>.sha256`). The shipped file took 570 s of wall time on the busy shared 2-core machine
(about 3 minutes of CPU time).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

from fashion_mnist import HELD_OUT_TEMPLATES, LABELS, PRETRAIN_TEMPLATES, TEXT_SHIFT_NAMES, read_split, visual_shift
from upt.encoders import encode_text
from upt.tiny import PRETRAINED_TINY, TINY_MODEL, register_model_configs

LOGIT_SCALE_MAX = math.log(100.0)  # CLIP's clamp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=PRETRAINED_TINY)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; on the shared 2-core machine one was measured 9x faster per step than two")
    parser.add_argument("--eval-only", action="store_true", help="only evaluate the checkpoint at --out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    register_model_configs()
    if not args.eval_only:
        started = time.perf_counter()
        model = pretrain(args)
        save_fp16(model, args.out)
        digest = sha256(args.out)
        Path(f"{args.out}.sha256").write_text(f"{digest}  {args.out.name}\n")  # sha256sum's format
        print(f"trained in {time.perf_counter() - started:.0f} s on {args.threads} thread(s)")
        print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB), sha256 {digest}")
    evaluate(args.out)


def pretrain(args: argparse.Namespace) -> open_clip.CLIP:
    torch.manual_seed(args.seed)
    model = open_clip.create_model(TINY_MODEL, pretrained=None)
    model.train()
    images, labels = read_split("train")
    pixels = normalised(resized(images), model.visual.preprocess_cfg)
    black = normalised(np.zeros((1, 1, 1), np.uint8), model.visual.preprocess_cfg)  # the background
    labels_t = torch.from_numpy(labels.astype(np.int64))
    captions = [template.format(name) for name in LABELS for template in PRETRAIN_TEMPLATES]
    caption_tokens = open_clip.get_tokenizer(TINY_MODEL)(captions)  # caption id = label * T + template
    optimizer = torch.optim.AdamW(parameter_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    steps_per_epoch = len(labels) // args.batch_size
    total = steps_per_epoch * args.epochs
    generator = torch.Generator().manual_seed(args.seed)
    step = 0
    for epoch in range(args.epochs):
        order = torch.randperm(len(labels), generator=generator)
        running, started = 0.0, time.perf_counter()
        for batch in order[: steps_per_epoch * args.batch_size].view(steps_per_epoch, args.batch_size):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, total, args)
            templates = torch.randint(len(PRETRAIN_TEMPLATES), (len(batch),), generator=generator)
            caption_ids = labels_t[batch] * len(PRETRAIN_TEMPLATES) + templates
            loss = clip_loss(model, augment(pixels[batch], black, generator), caption_tokens, caption_ids)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, LOGIT_SCALE_MAX)
            running += loss.item()
            step += 1
        print(f"epoch {epoch + 1}/{args.epochs}: loss {running / steps_per_epoch:.4f}, "
              f"logit scale {model.logit_scale.exp().item():.1f}, {time.perf_counter() - started:.0f} s", flush=True)
    return model.eval()


def clip_loss(model: open_clip.CLIP, images: torch.Tensor, caption_tokens: torch.Tensor,
              caption_ids: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of CLIP: image i's caption is column i, every other caption of the batch a negative.

    Each distinct caption of the batch is encoded once and gathered per pair (the batch holds at most
    10 x T distinct captions), and upt's encode_text stops after the longest caption (the causal mask
    makes the rest irrelevant); the loss and its gradients are those of open_clip's encode_text on
    every pair's caption.
    """
    unique, inverse = torch.unique(caption_ids, return_inverse=True)
    text = encode_text(model, caption_tokens[unique], normalize=True)[inverse]
    image = F.normalize(model.encode_image(images), dim=-1)
    logits = model.logit_scale.exp() * image @ text.T
    target = torch.arange(len(images))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only, as open_clip's training: not on gains, biases, embeddings or the
    logit scale (the token embedding's rows of words never seen stay as initialised)."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        exempt = parameter.ndim < 2 or "embedding" in name or "logit_scale" in name or name.endswith("bias")
        (no_decay if exempt else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def learning_rate(step: int, total: int, args: argparse.Namespace) -> float:
    """Linear warm-up, then cosine decay to zero (open_clip's default schedule)."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, total - args.warmup_steps)
    return 0.5 * args.lr * (1 + math.cos(math.pi * progress))


def resized(images: np.ndarray, size: int = 32) -> np.ndarray:
    """28 -> 32 pixels with PIL's bicubic, as upt.data.eval_transform resizes (identical bytes)."""
    return np.stack([np.asarray(Image.fromarray(image, mode="L").resize((size, size), Image.BICUBIC))
                     for image in images])


def normalised(images: np.ndarray, preprocess_cfg: dict) -> torch.Tensor:
    """Grey images as the RGB tensors the tower expects (CLIP's normalisation per channel)."""
    grey = torch.from_numpy(images).float().div_(255).unsqueeze(1).expand(-1, 3, -1, -1)
    mean = torch.tensor(preprocess_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(preprocess_cfg["std"]).view(1, 3, 1, 1)
    return ((grey - mean) / std).contiguous()


def augment(images: torch.Tensor, black: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Horizontal flip and a shift of up to 2 pixels (padding with the black background), per image."""
    flip = torch.rand(len(images), generator=generator) < 0.5
    images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
    padded = F.pad(images - black, (2, 2, 2, 2)) + black
    dx, dy = torch.randint(5, (2, len(images)), generator=generator)
    size = images.shape[-1]
    return torch.stack([padded[i, :, y: y + size, x: x + size] for i, (x, y) in enumerate(zip(dx.tolist(), dy.tolist()))])


def save_fp16(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({name: tensor.detach().half().contiguous() for name, tensor in model.state_dict().items()}, str(path))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def evaluate(checkpoint: Path) -> None:
    """Zero-shot accuracy of the checkpoint, loaded through upt's real path, on the whole test split."""
    from upt.backbone import load_backbone
    from upt.predict import Predictor

    backbone = load_backbone(TINY_MODEL, str(checkpoint), "cpu")
    images, labels = read_split("test")
    shifted = np.stack([visual_shift(image, index) for index, image in enumerate(images)])
    synonyms = [TEXT_SHIFT_NAMES[name] for name in LABELS]
    print(f"zero-shot accuracy on the Fashion-MNIST test split ({len(labels)} images, 10 classes, chance 10%):")
    rows = [
        ("in-domain, 'a photo of a {}.'", images, LABELS, ("a photo of a {}.",)),
        ("in-domain, held-out templates", images, LABELS, HELD_OUT_TEMPLATES),
        ("visual shift (rotated 45-315 degrees)", shifted, LABELS, ("a photo of a {}.",)),
        ("text shift (unseen near-synonyms)", images, synonyms, ("a photo of a {}.",)),
    ]
    for title, pixels, names, templates in rows:
        predictor = Predictor.zero_shot(backbone, names, templates)
        print(f"  {title}: {100 * accuracy(predictor, pixels, labels):.1f}%", flush=True)


@torch.no_grad()
def accuracy(predictor, images: np.ndarray, labels: np.ndarray, batch_size: int = 500) -> float:
    correct = 0
    for start in range(0, len(images), batch_size):
        batch = [Image.fromarray(image, mode="L") for image in images[start: start + batch_size]]
        predicted = predictor.logits(predictor.preprocess(batch)).argmax(dim=-1).numpy()
        correct += int((predicted == labels[start: start + batch_size]).sum())
    return correct / len(images)


if __name__ == "__main__":
    main()
