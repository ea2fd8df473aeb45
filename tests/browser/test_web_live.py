"""The web client keeps up by itself: tasks made elsewhere (the API, another tab) appear in the list,
a running task is followed over EventSource (or polled where there is no stream), and a folder of
class folders picked on "New task" becomes one class per sub-folder."""

from __future__ import annotations

import re
import shutil

import httpx
import pytest

from test_web_client import enter_key

pytestmark = pytest.mark.browser


def class_folder(tmp_path, fixture_images, classes: dict[str, int]):
    root = tmp_path / "pets"
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for image in sorted((fixture_images / "train" / name).glob("*.png"))[:count]:
            shutil.copy(image, root / name / image.name)
    (root / "notes.txt").write_text("not an image, and not in a class folder")
    return root


def test_tasks_made_through_the_api_appear_and_a_running_task_is_streamed(real_service, open_page, fixture_images):
    base, key = real_service["url"], real_service["new_key"]("live-updates")
    page, guard = open_page(base)
    page.goto(base + "/")
    enter_key(page, key)
    page.get_by_role("heading", name="Tasks", exact=True).wait_for()

    classes = ["bag", "sneaker", "trouser"]
    pictures = [(c, p) for c in classes for p in sorted((fixture_images / "train" / c).glob("*.png"))[:4]]
    created = httpx.post(f"{base}/tasks", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                         data={"class_names": classes, "labels": [c for c, _ in pictures], "method": "coop",
                               "epochs": "500", "batch_size": "1"},
                         files=[("files", (p.name, p.read_bytes(), "image/png")) for _, p in pictures])
    assert created.status_code == 202, created.text
    task_id = created.json()["id"]
    row = page.locator(f'.task-row[data-task-id="{task_id}"]')
    row.wait_for(timeout=30_000)  # no reload, no click on Refresh

    row.get_by_role("link").first.click()
    page.wait_for_url(re.compile(rf"#/tasks/{task_id}$"))
    content = page.locator(".task-content")
    # The task is far from done (500 epochs of 12 steps): on an idle machine a short one finished before
    # the click, and a finished task is neither streamed nor polled. A cancel through the API ends it.
    page.wait_for_function("['stream', 'poll'].includes(document.querySelector('.task-content')?.dataset.updates)",
                           timeout=120_000)
    assert content.get_attribute("data-updates") == "stream", "the running task was not followed over EventSource"
    cancelled = httpx.post(f"{base}/tasks/{task_id}/cancel", headers={"Authorization": f"Bearer {key}"}, timeout=60)
    assert cancelled.status_code == 202, cancelled.text
    page.locator(".status-line").filter(has_text="Training was cancelled").wait_for(timeout=180_000)
    polls = [r for r in guard.requests if r.startswith(f"GET {base}/tasks/{task_id}") and "/events" not in r]
    assert len(polls) <= 3, polls  # the first read, the final read (and a visibility re-read): no polling loop
    assert any("/events?token=" in r for r in guard.requests)
    assert not any(key in r for r in guard.requests)  # the key never goes into a URL


def test_without_a_stream_the_task_is_polled_and_a_folder_makes_classes(fake_service, open_page, fixture_images,
                                                                        tmp_path):
    base = fake_service(epoch_seconds=0.3)
    page, guard = open_page(base)
    page.goto(base + "/#/new")
    page.get_by_role("heading", name="New task", exact=True).wait_for()
    folder = class_folder(tmp_path, fixture_images, {"bag": 3, "sneaker": 2})
    page.locator(".folder-zone .dz-input").set_input_files(str(folder))
    page.locator('.class-card[data-class-name="bag"]').filter(has_text="3 images").wait_for()
    page.locator('.class-card[data-class-name="sneaker"]').filter(has_text="2 images").wait_for()
    assert page.locator(".class-card").count() == 2  # notes.txt made no class

    page.fill("#opt-epochs", "3")
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(r"#/tasks/[A-Za-z0-9]+$"))
    page.locator(".status-line").filter(has_text="Training finished").wait_for(timeout=60_000)
    # This service has no event stream (the contract's fake): the client polled instead.
    assert page.locator(".task-content").get_attribute("data-updates") == "poll"
