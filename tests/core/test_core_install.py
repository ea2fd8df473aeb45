"""`pip install upt` (no extra) is the ML core and the research CLI: a fresh virtual environment holding
only the core dependencies declared in pyproject.toml trains and predicts on the tiny backbone, and
`import upt` finds no web, queue or database package (none is installed there).

Installing torch afresh takes gigabytes, so the new environment receives hard links to this
environment's installed distributions: the closure of pyproject's core dependencies (their own
requirements, recursively), plus pip and setuptools to install the project. Then
`pip install --no-index -e .` resolves the dependencies without a network: it fails if pyproject
declares a core dependency that the closure lacks, and the commands fail if the core needs a package
that pyproject does not declare.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
import venv
from importlib.metadata import Distribution, PackageNotFoundError, distribution
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
SERVICE_STACK = ("fastapi", "starlette", "sqlalchemy", "celery", "kombu", "redis", "uvicorn", "alembic", "psycopg")
INSTALL_TOOLS = ("pip", "setuptools")  # to run `pip install -e .` without build isolation, not core needs

pytestmark = pytest.mark.slow


def core_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(text) for text in project["dependencies"]]


def closure(requirements: list[Requirement]) -> list[Distribution]:
    """The installed distributions that `requirements` need here, transitively, with the extras asked."""
    found: dict[str, Distribution] = {}
    seen: set[tuple[str, str]] = set()
    pending = list(requirements)
    while pending:
        requirement = pending.pop()
        try:
            dist = distribution(requirement.name)
        except PackageNotFoundError:  # pyproject declares what this environment lacks: say which
            pytest.fail(f"{requirement} is required but not installed in the test environment")
        name = dist.metadata["Name"].lower().replace("_", "-")
        found[name] = dist
        for extra in ("", *requirement.extras):
            if (name, extra) in seen:
                continue
            seen.add((name, extra))
            for text in dist.requires or []:
                nested = Requirement(text)
                if nested.marker is None or nested.marker.evaluate({"extra": extra}):
                    pending.append(nested)
    return list(found.values())


def link_distribution(dist: Distribution, site_packages: Path) -> None:
    """Hard-link the files that `dist` installed into site-packages (scripts elsewhere are not needed)."""
    origin = Path(dist.locate_file(""))
    assert dist.files, f"{dist.metadata['Name']} has no RECORD of its files"
    for file in dist.files:
        if ".." in file.parts or file.suffix == ".pyc":
            continue
        source, target = origin / file, site_packages / file
        if not source.is_file():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            os.link(source, target)


@pytest.fixture(scope="module")
def core_venv(tmp_path_factory) -> Path:
    """A virtual environment with `pip install -e .` of this checkout and nothing but its core needs."""
    home = tmp_path_factory.mktemp("core-venv")
    venv.create(home, with_pip=False)
    site_packages = next((home / "lib").glob("python3*/site-packages"))
    tools = [distribution(name) for name in INSTALL_TOOLS]
    for dist in closure(core_requirements()) + tools:
        link_distribution(dist, site_packages)
    # cwd elsewhere than the checkout: its own upt.egg-info, if any, must not stand in for the install.
    done = subprocess.run([str(home / "bin" / "python"), "-m", "pip", "install", "-q", "--no-index",
                           "--no-build-isolation", "--disable-pip-version-check", "-e", str(ROOT)],
                          cwd=home, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return home


def run(home: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UPT_", "PYTHON"))}
    return subprocess.run([str(home / "bin" / argv[0]), *argv[1:]], cwd=home, env=env, capture_output=True,
                          text=True, timeout=600)


def test_the_core_environment_has_no_service_stack(core_venv):
    code = (f"import importlib.util, json, sys, upt, upt.cli\nupt.cli.build_parser()\nstack = {SERVICE_STACK!r}\n"
            "print(json.dumps([[m for m in stack if m in sys.modules], [m for m in stack if importlib.util.find_spec(m)]]))")
    probe = run(core_venv, "python", "-c", code)
    assert probe.returncode == 0, probe.stderr
    imported, installed = json.loads(probe.stdout)
    assert imported == [] and installed == []


def test_core_install_trains_and_predicts_on_the_tiny_backbone(core_venv, tiny_checkpoint, fashion_train,
                                                               fashion_test):
    artifact = core_venv / "artifact"
    trained = run(core_venv, "upt", "train", "--data", str(fashion_train), "--method", "coop", "--shots", "2",
                  "--epochs", "1", "--model", "upt-tiny", "--pretrained", str(tiny_checkpoint), "--out",
                  str(artifact), "--quiet", "--json")
    assert trained.returncode == 0, trained.stderr
    assert json.loads(trained.stdout)["method"] == "coop"
    image = sorted((fashion_test / "bag").iterdir())[0]
    predicted = run(core_venv, "upt", "predict", "--artifact", str(artifact), "--top-k", "2", str(image), "--json")
    assert predicted.returncode == 0, predicted.stderr
    assert len(json.loads(predicted.stdout)["predictions"][0]["top"]) == 2


def test_service_commands_say_how_to_install_the_service_extra(core_venv):
    for command in (["serve"], ["worker", "--concurrency", "2"], ["keys", "list"]):
        refused = run(core_venv, "upt", *command)
        assert refused.returncode == 2, (command, refused.stdout, refused.stderr)
        assert "pip install 'upt[service]'" in refused.stderr and "fastapi" in refused.stderr, refused.stderr
