"""docker-compose.yml: accepted by `docker-compose config`, with the production shape it promises."""

from __future__ import annotations

import shutil
import subprocess

import yaml

from svc_helpers import ROOT


def test_compose_file_is_valid_and_complete():
    assert shutil.which("docker-compose"), "docker-compose is missing: `make test` installs it (Debian package)"
    done = subprocess.run(["docker-compose", "config"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    services = yaml.safe_load(done.stdout)["services"]
    assert set(services) == {"postgres", "redis", "migrate", "api", "worker"}
    for name in ("postgres", "redis", "api", "worker"):
        assert services[name]["healthcheck"]["test"], name
    for name in ("api", "worker"):
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully"
        assert depends["redis"]["condition"] == depends["postgres"]["condition"] == "service_healthy"
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert services["api"]["command"][:3] == ["upt", "serve", "--no-worker"]
    assert services["worker"]["command"] == ["upt", "worker"]
    for dockerfile in ("docker/api.Dockerfile", "docker/worker.Dockerfile"):
        assert (ROOT / dockerfile).is_file()
