"""Upload scratch owned by the process that made it, so that no sweep removes a live request's uploads.

Each process holds an exclusive lock (flock) on `tmp-owners/<id>.lock` for as long as it lives, and names
its scratch folders `tmp/upload-<id>-<random>`. A sweep, in any process (a worker's too), removes a
folder only when it can take its owner's lock itself: the owner has died, and whatever it left is
garbage, however young. Nothing ties removal to request time limits any more: a /classify that waits
85 s on a busy encoder keeps its uploads. Folders without an owner (made before owners were named) are
removed once untouched for UPT_ORPHAN_GRACE_S, as before.
"""

from __future__ import annotations

import fcntl
import os
import re
import secrets
import shutil
import tempfile
import threading
from pathlib import Path

_OWNED = re.compile(r"^upload-([0-9a-f]{16})-")
_owner_id = secrets.token_hex(8)
_owner_handles: dict[Path, object] = {}  # the open lock file per scratch root, held for the process's life
_guard = threading.Lock()


def _owners(root: Path) -> Path:
    """Beside the scratch folder, not in it: an idle scratch folder stays empty."""
    return root.with_name(f"{root.name}-owners")


def _lock_path(root: Path, owner: str) -> Path:
    return _owners(root) / f"{owner}.lock"


def _own(root: Path) -> str:
    """This process's owner id, its lock on `root` taken once."""
    with _guard:
        if root not in _owner_handles:
            _owners(root).mkdir(parents=True, exist_ok=True)
            handle = open(_lock_path(root, _owner_id), "a+")
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a fresh random name: nobody else holds it
            _owner_handles[root] = handle
    return _owner_id


def scratch_dir(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"upload-{_own(root)}-", dir=root))


def owner_alive(root: Path, owner: str) -> bool:
    """Whether the process that named itself `owner` still holds its lock (it lives)."""
    if owner == _owner_id:
        return True
    try:
        handle = open(_lock_path(root, owner), "r")
    except FileNotFoundError:
        return False
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def abandoned(root: Path, cutoff: float, newest_mtime) -> list[Path]:
    """Scratch folders under `root` whose owner is dead, and ownerless ones untouched since `cutoff`;
    the lock files of dead owners are removed with their last folder."""
    if not root.is_dir():
        return []
    found, dead = [], set()
    for folder in root.glob("upload-*"):
        if not folder.is_dir():
            continue
        owned = _OWNED.match(folder.name)
        if owned is not None:
            if not owner_alive(root, owned.group(1)):
                found.append(folder)
                dead.add(owned.group(1))
        elif newest_mtime(folder) < cutoff:
            found.append(folder)
    for lock in _owners(root).glob("*.lock"):
        owner = lock.name.removesuffix(".lock")
        if owner not in dead and not owner_alive(root, owner) and not any(root.glob(f"upload-{owner}-*")):
            dead.add(owner)
    for owner in dead:
        try:
            os.remove(_lock_path(root, owner))
        except FileNotFoundError:
            pass
    return found


def remove(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
