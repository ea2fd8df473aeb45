from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny(tiny_checkpoint: Path):
    from upt.backbone import load_backbone
    from upt.tiny import TINY_MODEL

    return load_backbone(TINY_MODEL, str(tiny_checkpoint), "cpu")


@pytest.fixture(scope="session")
def pretrained_tiny(pretrained_tiny_checkpoint: Path):
    from upt.backbone import load_backbone
    from upt.tiny import TINY_MODEL

    return load_backbone(TINY_MODEL, str(pretrained_tiny_checkpoint), "cpu")
