"""A page on another origin (a second local port) uses the API the way the README shows: it makes a
task of a folder of class folders with fetch, opens the task's event stream with EventSource (token
from POST /tasks/{id}/events/token) and follows it to success. The page is the README's own example."""

from __future__ import annotations

import functools
import http.server
import re
import shutil
import threading
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

pytestmark = pytest.mark.browser
ROOT = Path(__file__).resolve().parents[2]


def readme_example() -> str:
    section = (ROOT / "README.md").read_text().split("**Pages on other origins.**", 1)[1]
    return re.search(r"```html\n(.*?)```", section, flags=re.S).group(1)


@pytest.fixture
def page_server(other_origin, tmp_path):
    """Serves tmp_path/site on other_origin's port; yields the folder to write pages into."""
    site = tmp_path / "site"
    site.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", urlsplit(other_origin).port), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield site
    server.shutdown()
    server.server_close()


def test_a_page_on_another_origin_creates_a_task_and_follows_it(real_service, other_origin, page_server, open_page,
                                                                  fixture_images, tmp_path):
    example = readme_example()
    assert len(example.strip().splitlines()) <= 12  # the README promises about ten lines
    (page_server / "index.html").write_text(example.replace("https://upt.example.com", real_service["url"]))
    folder = tmp_path / "pets"  # one sub-folder per class, as a user would pick it
    for name in ("sneaker", "trouser"):
        (folder / name).mkdir(parents=True)
        for image in sorted((fixture_images / "train" / name).glob("*.png"))[:3]:
            shutil.copy(image, folder / name / image.name)

    page, guard = open_page(other_origin, also=(real_service["url"],))
    page.add_init_script(f"window.prompt = () => {real_service['key']!r};")  # the key a user would type
    page.goto(other_origin + "/index.html")
    page.set_input_files("#pick", str(folder))
    page.wait_for_function("document.getElementById('log').textContent.includes('end:')", timeout=180_000)
    lines = page.locator("#log").text_content().split()
    assert lines[-2:] == ["end:", "succeeded"], lines
    assert "succeeded" in lines[:-2] and lines[0] in {"queued", "running"}, lines
    # It really went across origins, and the key never appeared in a URL.
    assert any(r.startswith(f"POST {real_service['url']}/tasks") for r in guard.requests), guard.requests
    assert any(f"{real_service['url']}/tasks/" in r and "/events?token=" in r for r in guard.requests), guard.requests
    assert not any(real_service["key"] in r for r in guard.requests)
    # The service is shared with the other browser tests, which expect only their own tasks in the list.
    task_id = next(re.search(r"/tasks/([^/]+)/events", r).group(1) for r in guard.requests if "/events?token=" in r)
    deleted = httpx.delete(f"{real_service['url']}/tasks/{task_id}", headers={"X-API-Key": real_service["key"]})
    assert deleted.status_code == 204, deleted.text
