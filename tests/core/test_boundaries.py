"""upt/ is the ML core: importing all of it must not pull in the web, database or queue stacks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import upt

FORBIDDEN = ("fastapi", "starlette", "sqlalchemy", "celery", "kombu", "redis", "uvicorn")


def test_core_imports_no_service_stack():
    modules = sorted(
        f"upt.{path.relative_to(Path(upt.__file__).parent).with_suffix('').as_posix().replace('/', '.')}"
        for path in Path(upt.__file__).parent.rglob("*.py") if path.name not in ("__init__.py", "__main__.py", "cli.py")
    )
    code = (f"import sys\nfor name in {modules!r}: __import__(name)\n"
            f"print(','.join(m for m in {FORBIDDEN!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""
    source = "\n".join(p.read_text() for p in Path(upt.__file__).parent.rglob("*.py") if p.name != "cli.py")
    assert not any(f"import {m}" in source or f"from {m}" in source for m in FORBIDDEN)
