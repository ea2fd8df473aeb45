"""Fixtures shared by every test folder: the tiny backbone's checkpoint and the Fashion-MNIST images."""

from __future__ import annotations

from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
FASHION = FIXTURES / "fashion_mnist"
SERVICE_COMMANDS = {"serve", "worker", "migrate", "keys"}


def pytest_sessionstart(session: pytest.Session) -> None:
    """`upt serve` and the worker it starts are found through installed metadata (the `upt.commands`
    entry points of pyproject.toml): an install made before they existed, or a stale `upt.egg-info`
    folder in the working directory (found first on sys.path), hides them, and many tests would fail
    with "invalid choice". Say so once, with the fix."""
    from importlib.metadata import entry_points

    found = {entry.name for entry in entry_points(group="upt.commands")}
    if not SERVICE_COMMANDS <= found:
        pytest.exit(f"the installed metadata of upt lacks the `upt.commands` entry points {sorted(SERVICE_COMMANDS - found)}:"
                    " reinstall with `rm -rf upt.egg-info && .venv/bin/pip install -q --no-deps --no-build-isolation -e .`",
                    returncode=4)


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


@pytest.fixture(scope="session")
def option_values() -> dict:
    """A valid value of every option a user sets (`upt train` flags, `POST /tasks` fields), in the
    registry's order; every method that takes depth accepts 1, and upt-tiny's towers have more."""
    from upt.methods.registry import train_options

    values = {"shots": 1, "seed": 3, "epochs": 1, "n_ctx": 2, "depth": 1, "ctx_init": "a photo of a", "lr": 0.01,
              "batch_size": 4, "augment_views": 2, "text_loss_weight": 5.0, "image_loss_weight": 2.0, "gpa_mean": 3.0,
              "gpa_std": 2.0, "lora_rank": 3, "lora_alpha": 2.0, "lora_dropout": 0.1, "iterations": 2,
              "alpha_max": 4.0, "beta_max": 9.0, "init_alpha": 0.5, "init_beta": 2.0}
    assert set(values) == {option.name for option in train_options()}  # a new option needs a value here
    return {option.name: values[option.name] for option in train_options()}
