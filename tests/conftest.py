"""Fixtures shared by every test folder: the tiny backbone's checkpoint and the Fashion-MNIST images."""

from __future__ import annotations

from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
FASHION = FIXTURES / "fashion_mnist"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from upt.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("weights") / "upt-tiny.pt")


@pytest.fixture(scope="session")
def pretrained_tiny_checkpoint() -> Path:
    """The tiny backbone pretrained on Fashion-MNIST's training split (shipped in upt/weights)."""
    from upt.tiny import PRETRAINED_TINY

    return PRETRAINED_TINY


@pytest.fixture(scope="session")
def fashion_train() -> Path:
    return FASHION / "train"


@pytest.fixture(scope="session")
def fashion_test() -> Path:
    return FASHION / "test"
