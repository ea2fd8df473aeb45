"""Imports point one way: upt/ <- service/ <- worker/.

upt/ is the ML core and the CLI: importing any of it (cli.py included, which finds the service's
commands through entry points) must not pull in the web, database or queue stacks, and its source
names no service or worker module. service/ never imports worker/: the worker registers its own task
on the queue that service/ defines.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import upt

ROOT = Path(upt.__file__).parent.parent
FORBIDDEN = ("fastapi", "starlette", "sqlalchemy", "celery", "kombu", "redis", "uvicorn")


def imported_stacks(code: str) -> list[str]:
    """The FORBIDDEN modules present in a fresh interpreter after running `code`."""
    probe = f"import sys\n{code}\nprint(','.join(m for m in {FORBIDDEN!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return [name for name in result.stdout.strip().split(",") if name]


def mentions_of(package: str, folder: Path) -> list[str]:
    """Lines under `folder` that import `package` or name one of its modules: in a string (importlib,
    Celery's include=[...]), import_module("package"), `python -m package`, or a dotted name in prose
    (a docstring pointing at `package.module` is a dependency too, one a reader must follow)."""
    modules = "|".join(sorted(path.stem for path in (ROOT / package).glob("*.py")) + ["api", "web"])
    pattern = re.compile(rf"^\s*(import|from)\s+{package}\b|[\"']{package}\.\w|\b{package}\.({modules})\b"
                         rf"|import_module\(\s*[\"']{package}[\"']|[\"']-m[\"'],\s*[\"']{package}[\"']")
    found = []
    for path in sorted(folder.rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                found.append(f"{path}:{number}: {line.strip()}")
    return found


def test_core_imports_no_service_stack():
    modules = sorted(
        f"upt.{path.relative_to(ROOT / 'upt').with_suffix('').as_posix().replace('/', '.')}"
        for path in (ROOT / "upt").rglob("*.py") if path.name not in ("__init__.py", "__main__.py")
    )
    assert "upt.cli" in modules
    assert imported_stacks(f"for name in {modules!r}: __import__(name)") == []
    source = "\n".join(p.read_text() for p in (ROOT / "upt").rglob("*.py"))
    assert not any(f"import {m}" in source or f"from {m}" in source for m in FORBIDDEN)


def test_import_upt_and_building_the_cli_pull_in_no_service_stack():
    """`upt train` builds the whole parser, the service's commands included (found by entry point):
    registering them must stay as light as the core."""
    assert imported_stacks("import upt") == []
    assert imported_stacks("import upt.cli; upt.cli.build_parser()") == []


def test_core_names_no_service_or_worker_module():
    assert mentions_of("service", ROOT / "upt") == []
    assert mentions_of("worker", ROOT / "upt") == []


def test_service_never_imports_the_worker():
    assert mentions_of("worker", ROOT / "service") == []


def test_the_checks_see_an_import_and_a_module_named_in_a_string(tmp_path):
    """The patterns above do find what they forbid (else the three tests above would pass vacuously)."""
    (tmp_path / "a.py").write_text('from worker.tasks import run_task\n')
    (tmp_path / "b.py").write_text('celery = Celery("upt", include=["worker.tasks"])\n')
    (tmp_path / "c.py").write_text('importlib.import_module("service.commands")\n')
    (tmp_path / "d.py").write_text('subprocess.Popen([sys.executable, "-m", "worker"])\n')
    (tmp_path / "e.py").write_text('"""The worker names itself "host:pid" (see worker.tasks.worker_name)."""\n')
    (tmp_path / "f.py").write_text('"""A worker (prose is allowed)."""\nsummary = {"worker": worker.pid}; argv = ["upt", "worker"]\n')
    assert len(mentions_of("worker", tmp_path)) == 4
    assert len(mentions_of("service", tmp_path)) == 1


def test_the_queue_knows_the_training_task_by_name_only():
    """The API's queue module (service/queue.py) sends messages by task name: importing it loads
    neither the worker nor torch nor the ML core."""
    probe = ("import sys, service.queue\n"
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('worker', 'upt', 'torch')))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_worker_parent_process_imports_no_torch():
    """Celery's parent process imports the worker's modules and only supervises the forked pool
    processes: without torch it stays at ~70 MB instead of ~750 MB (worker/tasks.py says why)."""
    probe = "import sys, worker.process\nprint(sorted(m for m in ('torch', 'open_clip') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
