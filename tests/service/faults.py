"""Real faults for the service tests: a PostgreSQL cluster of the test's own that it stops and starts,
and a small tmpfs that fills up. Never the shared PostgreSQL server."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from svc_helpers import free_port


def _pg_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


class OwnPostgres:
    """initdb + pg_ctl on a free port, as the `postgres` user when the tests run as root (initdb refuses root)."""

    def __init__(self, folder: Path) -> None:
        # Under /tmp, not pytest's folder: the `postgres` user must reach it, and pytest's are root's only.
        self.folder, self.port = folder, free_port()
        self.data, self.socket = folder / "pgdata", folder / "socket"
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *argv: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        done = subprocess.run(prefix + list(argv), capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr

    def init(self) -> "OwnPostgres":
        self.socket.mkdir(parents=True)
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres")
            shutil.chown(self.socket, "postgres")
        self._run(_pg_bin("initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        return self

    def start(self) -> None:
        self._run(_pg_bin("pg_ctl"), "-D", str(self.data), "-w", "-l", str(self.folder / "pg.log"), "-o",
                  f"-p {self.port} -k {self.socket} -c listen_addresses=127.0.0.1", "start")

    def stop(self) -> None:
        self._run(_pg_bin("pg_ctl"), "-D", str(self.data), "-w", "-m", "fast", "stop")

    def remove(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


def own_postgres() -> OwnPostgres:
    if _pg_bin("initdb") is None or _pg_bin("pg_ctl") is None:
        pytest.skip("initdb/pg_ctl not installed: the database-outage test needs a PostgreSQL cluster of its own")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        pytest.skip("running as root without runuser: initdb refuses to run as root")
    return OwnPostgres(Path(tempfile.mkdtemp(prefix="upt-test-pg-"))).init()


class Tmpfs:
    """A small tmpfs, so that "the disk is full" is real (ENOSPC from the kernel), not simulated."""

    def __init__(self, mountpoint: Path, size_bytes: int) -> None:
        self.mountpoint = mountpoint
        mountpoint.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root (the tests run as root in CI)")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(mountpoint)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")

    def free(self) -> int:
        return shutil.disk_usage(self.mountpoint).free

    def fill(self, leave_bytes: int) -> Path:
        """Write a filler file until only about `leave_bytes` are free."""
        filler = self.mountpoint / "filler"
        with open(filler, "ab") as out:
            while (room := self.free() - leave_bytes) > 0:
                out.write(b"\0" * min(room, 1 << 20))
                out.flush()
        return filler

    def files(self, under: str = "") -> list[Path]:
        return sorted(p for p in (self.mountpoint / under).rglob("*") if p.is_file() and p.name != "filler")

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True)
