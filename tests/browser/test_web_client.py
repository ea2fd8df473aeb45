"""The web client in headless Chromium.

- test_end_to_end_on_the_real_service: `upt serve` on the pretrained tiny backbone with API keys on. Enter the key, create a
  task with real Fashion-MNIST images, watch the progress bar move and the task succeed, read its plot and
  confusion matrix, classify images (tuned and zero-shot), download the artifact, and save screenshots of the
  main views to docs/screenshots/ (desktop and phone widths).
- test_client_behaviour_on_the_contract: a fake of the HTTP contract (no model) for what is slow or awkward to
  reach on the real service: client and API validation errors next to their fields, cancel, delete, a real
  drop event, keyboard reach of the drop zones, empty states.

Both fail on any request to another origin than the service (see conftest.OriginGuard).
"""

from __future__ import annotations

import base64
import re
import time
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

CLASSES = ["bag", "pullover", "sneaker", "trouser"]

# Records every aria-valuenow a progress bar shows, so the test sees it move even between two polls, with
# the id of the list row it is in ('' on a task's own page): the list also shows other tests' tasks.
WATCH_PROGRESS = """
() => {
  window.__progress = [];
  const seen = (el) => window.__progress.push([el.closest('[data-task-id]')?.dataset.taskId || '', Number(el.getAttribute('aria-valuenow'))]);
  document.querySelectorAll('[role=progressbar]').forEach(seen);
  new MutationObserver((records) => {
    for (const r of records) {
      for (const n of r.addedNodes) if (n.nodeType === 1) n.querySelectorAll?.('[role=progressbar]').forEach(seen);
      if (r.type === 'attributes' && r.target.getAttribute('role') === 'progressbar') seen(r.target);
    }
  }).observe(document.body, { subtree: true, childList: true, attributes: true, attributeFilter: ['aria-valuenow'] });
}
"""


def images(root: Path, split: str, cls: str, n: int) -> list[str]:
    return [str(p) for p in sorted((root / split / cls).glob("*.png"))[:n]]


def enter_key(page, key: str) -> None:
    dialog = page.locator("#key-dialog")
    dialog.wait_for(state="visible")
    page.fill("#key-input", key)
    page.click("#key-dialog button[value=save]")
    dialog.wait_for(state="hidden")
    # The key is stored by the dialog's `close` event, which the browser fires in a later task than the
    # one that hides it: on a fast machine a test read localStorage in between and found nothing.
    page.locator("#key-button", has_text="✓").wait_for()


def add_classes(page, root: Path, shots: int) -> None:
    page.fill("#class-name", ", ".join(CLASSES))
    page.press("#class-name", "Enter")
    for cls in CLASSES:
        card = page.locator(f'.class-card[data-class-name="{cls}"]')
        card.locator(".dz-input").set_input_files(images(root, "train", cls, shots))
        page.locator(f'.class-card[data-class-name="{cls}"] .count').filter(has_text=f"{shots} images").wait_for()


A11Y_PROBLEMS = r"""
() => {
  const out = [];
  for (const el of document.querySelectorAll('input, select, textarea, button')) {
    const named = el.labels?.length || el.getAttribute('aria-label') || el.getAttribute('aria-labelledby') ||
      (el.tagName === 'BUTTON' && el.textContent.trim());
    if (!named) out.push(`unlabelled ${el.tagName.toLowerCase()}#${el.id || '?'}`);
  }
  const ids = [...document.querySelectorAll('[id]')].map((e) => e.id);
  ids.filter((id, i) => ids.indexOf(id) !== i).forEach((id) => out.push(`duplicate id ${id}`));
  for (const el of document.querySelectorAll('[aria-describedby], [aria-labelledby]'))
    for (const ref of (el.getAttribute('aria-describedby') + ' ' + el.getAttribute('aria-labelledby')).split(/\s+/))
      if (ref && ref !== 'null' && !document.getElementById(ref)) out.push(`dangling reference ${ref}`);
  const text = document.body.innerText;
  const stray = text.match(/\bnull\b|\bundefined\b|\bNaN\b|\[object Object\]/);
  if (stray) out.push(`stray text: ${stray[0]}`);
  return out;
}
"""


def shot(page, dir_: Path, name: str, full_page: bool = True) -> None:
    page.evaluate("window.scrollTo(0, 0)")
    page.wait_for_timeout(150)  # let transitions settle
    page.screenshot(path=str(dir_ / name), full_page=full_page)


def test_end_to_end_on_the_real_service(real_service, open_page, fixture_images, screenshots_dir):
    base, key = real_service["url"], real_service["key"]
    page, guard = open_page(base)

    # Behind an API key: the first refused request opens the key dialog; the key is kept in the browser.
    page.goto(base + "/")
    enter_key(page, key)
    assert page.evaluate("localStorage.getItem('upt.apiKey')") == key
    page.get_by_role("heading", name="Tasks", exact=True).wait_for()

    # Create: classes by name, images on each, method, options. An API validation error shows by its field.
    page.get_by_role("link", name="New task").first.click()
    page.get_by_role("heading", name="New task", exact=True).wait_for()
    add_classes(page, fixture_images, shots=4)
    page.check('input[name=method][value="upt"]')
    page.fill("#opt-shots", "4")
    page.fill("#opt-seed", "0")
    page.fill("#opt-epochs", "100000")  # above UPT_MAX_EPOCHS: refused by the API, shown next to Epochs
    page.click("button[type=submit]")
    err = page.locator("#err-epochs")
    err.wait_for(state="visible")
    assert "500" in err.inner_text() or "epoch" in err.inner_text().lower()
    assert page.get_attribute("#opt-epochs", "aria-invalid") == "true"
    shot(page, screenshots_dir, "create-task-error.png")
    page.fill("#opt-epochs", "3")  # editing the field clears its message
    assert err.is_hidden() and page.locator(".form-error").is_hidden()
    assert page.evaluate(A11Y_PROBLEMS) == []
    shot(page, screenshots_dir, "create-task.png")

    page.evaluate(WATCH_PROGRESS)  # from here on (one document: the router only changes the hash)
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(r"#/tasks/[A-Za-z0-9]+$"))
    task_id = page.url.rsplit("/", 1)[-1]

    # The list: a live progress bar with ETA, polled while the task runs, until it succeeds.
    page.goto(base + "/#/")
    row = page.locator(f'.task-row[data-task-id="{task_id}"]')
    row.wait_for()
    took_progress_shot = False
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        status = row.get_attribute("data-status")
        if status == "running" and not took_progress_shot:
            value = int(row.locator("[role=progressbar]").get_attribute("aria-valuenow") or 0)
            if 0 < value < 100:
                shot(page, screenshots_dir, "task-list-progress.png")
                took_progress_shot = True
        if status in ("succeeded", "failed", "cancelled"):
            break
        page.wait_for_timeout(100)
    assert row.get_attribute("data-status") == "succeeded", row.inner_text()
    # The task page's bar, then its row's in the list (not the rows of tasks other tests made before).
    values = [v for owner, v in page.evaluate("window.__progress") if owner in ("", task_id)]
    assert values and values[-1] == 100 and len(set(values)) >= 2, f"the progress bar did not move: {values}"
    assert values == sorted(values), f"the progress went backwards: {values}"
    if not took_progress_shot:
        shot(page, screenshots_dir, "task-list-progress.png")
    page.wait_for_timeout(2000)  # polling stops when nothing runs: no more GET /tasks/{id}
    polls = len([r for r in guard.requests if r.endswith(f"/tasks/{task_id}")])
    page.wait_for_timeout(3500)
    assert len([r for r in guard.requests if r.endswith(f"/tasks/{task_id}")]) == polls, "polling did not stop"
    shot(page, screenshots_dir, "task-list.png")

    # The task: settings, loss/accuracy plot from /events, validation accuracy, per-class, confusion matrix.
    row.get_by_role("link").first.click()
    page.locator(".chart-svg").wait_for()
    assert page.locator(".chart .pt.loss").count() == 3
    cm = page.locator("table.cm")
    cm.wait_for()
    assert cm.locator("tbody tr").count() == len(CLASSES)
    assert page.locator(".per-class li").count() == len(CLASSES)
    assert re.search(r"\d+(\.\d)?%", page.locator(".big-metric .big").inner_text())
    assert page.evaluate(A11Y_PROBLEMS) == []
    shot(page, screenshots_dir, "task-detail.png")

    # Try it with the tuned task: top labels with probability bars for each image dropped.
    tests = [images(fixture_images, "test", c, 1)[0] for c in ("sneaker", "trouser")]
    page.locator("#s-try").scroll_into_view_if_needed()
    page.locator("form.classify .dz-input").set_input_files(tests)
    cards = page.locator(".result-card")
    cards.nth(1).wait_for()
    assert cards.count() == 2
    assert cards.first.locator(".topk li").count() == len(CLASSES)  # top-5 of 4 classes
    probs = [float(x.rstrip("%")) for x in cards.first.locator(".topk-p").all_inner_texts()]
    assert abs(sum(probs) - 100) < 1.0 and probs == sorted(probs, reverse=True)
    # The pretrained tiny CLIP knows clothes: each image's top label is its class.
    assert [card.locator(".topk-label").first.inner_text() for card in cards.all()] == ["sneaker", "trouser"]
    page.locator(".results").screenshot(path=str(screenshots_dir / "classify-result.png"))

    # The artifact downloads with the key (a fetch, not a bare link).
    with page.expect_download() as dl:
        page.get_by_role("button", name="Download artifact").click()
    path = dl.value.path()
    assert dl.value.suggested_filename.endswith(".zip") and Path(path).read_bytes()[:2] == b"PK"

    # Zero-shot with typed class names.
    page.get_by_role("link", name="Try it").first.click()
    page.get_by_role("heading", name="Try it", exact=True).wait_for()
    page.check('input[name=try-mode][value="zero"]')
    page.fill("#try-names", "bag, pullover, sneaker, trouser, dress, coat")
    page.locator("form.classify .dz-input").set_input_files(tests[:1])
    page.locator(".result-card").wait_for()
    assert page.locator(".result-card .topk li").count() == 5
    assert page.locator(".result-card .topk-label").first.inner_text() == "sneaker"  # zero-shot, pretrained
    shot(page, screenshots_dir, "try-zero-shot.png")

    # Phone width: same views, one column; the key is already in this browser's storage.
    phone, _ = open_page(base, width=390, height=844, device_scale_factor=2, is_mobile=True, has_touch=True)
    phone.add_init_script(f"localStorage.setItem('upt.apiKey', {key!r})")
    phone.goto(base + "/#/")
    phone.locator(f'.task-row[data-task-id="{task_id}"]').wait_for()
    shot(phone, screenshots_dir, "phone-task-list.png", full_page=False)
    phone.goto(base + "/#/new")
    phone.fill("#class-name", "bag, sneaker")
    phone.press("#class-name", "Enter")
    phone.locator('.class-card[data-class-name="bag"] .dz-input').set_input_files(images(fixture_images, "train", "bag", 4))
    shot(phone, screenshots_dir, "phone-create.png", full_page=False)
    phone.goto(f"{base}/#/tasks/{task_id}")
    phone.locator("table.cm").wait_for()
    assert phone.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1"), "horizontal scroll on a phone"
    shot(phone, screenshots_dir, "phone-task-detail.png")

    # A long training, cancelled from the list: cancelling, then cancelled once the worker stops.
    page.goto(base + "/#/new")
    page.fill("#class-name", "bag, sneaker")
    page.press("#class-name", "Enter")
    for cls in ("bag", "sneaker"):
        page.locator(f'.class-card[data-class-name="{cls}"] .dz-input').set_input_files(images(fixture_images, "train", cls, 4))
    page.check('input[name=method][value="coop"]')
    page.fill("#opt-epochs", "400")
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(r"#/tasks/[A-Za-z0-9]+$"))
    long_id = page.url.rsplit("/", 1)[-1]
    page.goto(base + "/#/")
    long_row = page.locator(f'.task-row[data-task-id="{long_id}"]')
    long_row.locator('[data-role="cancel"]').click()
    page.locator(f'.task-row[data-task-id="{long_id}"][data-status="cancelled"]').wait_for(timeout=120_000)

    # Delete from the list.
    for tid in (long_id, task_id):
        row = page.locator(f'.task-row[data-task-id="{tid}"]')
        row.get_by_role("button", name=re.compile("Delete")).click()
        row.wait_for(state="detached")
    page.get_by_text("No tasks yet").wait_for()


PNG_1PX = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")


def test_client_behaviour_on_the_contract(fake_service, open_page, fixture_images, tmp_path):
    base = fake_service(api_key="s3cret", epoch_seconds=0.8)
    page, guard = open_page(base)
    page.goto(base + "/")

    # A wrong key is refused and the banner says so; the right one works and is remembered.
    enter_key(page, "wrong")
    page.locator("#banner").filter(has_text="refused").wait_for()
    page.get_by_role("button", name="Enter API key").click()
    enter_key(page, "s3cret")
    page.get_by_text("No tasks yet").wait_for()  # empty state
    page.reload()
    page.get_by_text("No tasks yet").wait_for()
    assert page.locator("#key-dialog").is_hidden()

    # Client-side checks, next to their fields.
    page.goto(base + "/#/new")
    page.fill("#class-name", "bag")
    page.press("#class-name", "Enter")
    page.click("button[type=submit]")
    page.locator("#err-classes").filter(has_text="two classes").wait_for()
    assert page.locator(".form-error").is_visible()

    # Keyboard: Tab from the class name reaches the class's drop zone (a real file input). First the
    # method cards (GET /methods): inserted while the keyboard walks the form, they could move the focus.
    page.locator(".method-cards").wait_for(state="attached")
    page.focus("#class-name")
    for _ in range(6):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.classList.contains('dz-input')"):
            break
    assert page.evaluate("document.activeElement.classList.contains('dz-input')")
    # ...where Space opens the file chooser.
    with page.expect_file_chooser() as chooser:
        page.keyboard.press("Space")
    chooser.value.set_files(images(fixture_images, "train", "bag", 2))
    page.locator('.class-card[data-class-name="bag"] .count').filter(has_text="2 images").wait_for()
    page.locator('.class-card[data-class-name="bag"]').get_by_role("button", name="Remove the images of bag").click()
    assert page.evaluate("document.activeElement.classList.contains('dz-input')")  # focus stays in the card

    page.fill("#class-name", "sneaker")
    page.press("#class-name", "Enter")
    # A real drop event (DataTransfer with a File) on the first class's zone.
    page.evaluate("""(b64) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], 'dropped.png', { type: 'image/png' }));
        const zone = document.querySelector('.class-card[data-class-name="bag"] .dropzone');
        for (const type of ['dragenter', 'dragover', 'drop']) zone.dispatchEvent(new DragEvent(type, { dataTransfer: dt, bubbles: true, cancelable: true }));
    }""", base64.b64encode(PNG_1PX).decode())
    page.locator('.class-card[data-class-name="bag"] .count').filter(has_text="1 image").wait_for()
    page.locator('.class-card[data-class-name="sneaker"] .dz-input').set_input_files(images(fixture_images, "train", "sneaker", 2))
    assert page.evaluate(A11Y_PROBLEMS) == []

    # API validation errors land next to their field.
    page.fill("#opt-epochs", "999")
    page.click("button[type=submit]")
    page.locator("#err-epochs").filter(has_text="between 1 and 200").wait_for()
    assert page.get_attribute("#opt-epochs", "aria-invalid") == "true"
    page.fill("#opt-epochs", "4")
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(r"#/tasks/\w+$"))
    first = page.url.rsplit("/", 1)[-1]
    page.locator(".chart-svg").wait_for()  # the plot appears while it trains
    page.locator("table.cm").wait_for(timeout=20_000)
    page.get_by_role("heading", name="Your data, as the paper measures it").wait_for()
    assert "CoOp" in page.locator(".advice").inner_text()

    # A second task, cancelled from the list, then deleted.
    page.goto(base + "/#/new")  # the draft was cleared after the first submit
    assert page.locator(".class-card").count() == 0
    page.fill("#class-name", "bag, sneaker")
    page.press("#class-name", "Enter")
    for cls in ("bag", "sneaker"):
        page.locator(f'.class-card[data-class-name="{cls}"] .dz-input').set_input_files(images(fixture_images, "train", cls, 1))
    page.fill("#opt-epochs", "50")
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(r"#/tasks/\w+$"))
    second = page.url.rsplit("/", 1)[-1]
    page.goto(base + "/#/")
    row = page.locator(f'.task-row[data-task-id="{second}"]')
    row.get_by_role("button", name=re.compile("Cancel")).click()
    page.locator(f'.task-row[data-task-id="{second}"][data-status="cancelled"]').wait_for()
    row.get_by_role("button", name=re.compile("Delete")).click()
    row.wait_for(state="detached")
    assert page.locator(f'.task-row[data-task-id="{first}"]').count() == 1

    # One zip of class folders instead of images per class.
    archive = tmp_path / "fashion.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for cls in ("bag", "trouser"):
            for path in images(fixture_images, "train", cls, 2):
                z.write(path, f"{cls}/{Path(path).name}")
    page.goto(base + "/#/new")
    page.check('input[name=mode][value="archive"]')
    assert page.locator("#panel-classes").is_hidden()
    page.locator("#panel-archive .dz-input").set_input_files(str(archive))
    page.get_by_text("Chosen: fashion.zip").wait_for()
    page.check('input[name=method][value="coop"]')
    page.fill("#opt-epochs", "2")
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(r"#/tasks/\w+$"))
    page.locator(".badge.st-succeeded").wait_for()

    assert page.evaluate(A11Y_PROBLEMS) == []

    # Zero-shot needs two names; then top labels with bars.
    page.goto(base + "/#/try")
    page.check('input[name=try-mode][value="zero"]')
    page.fill("#try-names", "cat")
    page.locator("form.classify .dz-input").set_input_files(images(fixture_images, "test", "bag", 1))
    page.locator("#try-err").filter(has_text="two class names").wait_for()
    page.fill("#try-names", "cat, dog, bag")
    page.click("form.classify button[type=submit]")
    page.locator(".result-card .topk li").nth(2).wait_for()

    assert page.evaluate(A11Y_PROBLEMS) == []
    page.goto(f"{base}/#/tasks/{first}")
    page.locator("table.cm").wait_for()
    assert page.evaluate(A11Y_PROBLEMS) == []
    page.goto(base + "/#/")
    page.locator(".task-row").first.wait_for()
    assert page.evaluate(A11Y_PROBLEMS) == []

    # Not found.
    page.goto(base + "/#/tasks/nope")
    page.get_by_text("There is no task nope").wait_for()


# Records the name of every field appended to a FormData (the body of POST /tasks), into window.__fields.
RECORD_FORM_FIELDS = """
() => {
  window.__fields = [];
  const append = FormData.prototype.append;
  FormData.prototype.append = function (name, ...rest) { window.__fields.push(name); return append.call(this, name, ...rest); };
}
"""


def test_only_the_chosen_methods_options_are_sent(fake_service, open_page, fixture_images):
    """The option fields follow the chosen method (GET /methods): one it does not take is hidden and not
    sent, since POST /tasks refuses it (the fake as the service); what was typed comes back with a method
    that takes it."""
    base = fake_service(epoch_seconds=0.2)
    page, guard = open_page(base)

    def new_task(method: str, epochs: str, more: dict[str, str], then: str) -> list[str]:
        page.goto(base + "/#/new")
        page.fill("#class-name", "bag, sneaker")
        page.press("#class-name", "Enter")
        for cls in ("bag", "sneaker"):
            page.locator(f'.class-card[data-class-name="{cls}"] .dz-input').set_input_files(
                images(fixture_images, "train", cls, 1))
        page.check(f'input[name=method][value="{method}"]')
        page.fill("#opt-epochs", epochs)
        page.locator(".more-options summary").click()
        for name, value in more.items():
            page.fill(f"#opt-{name}", value)
        page.check(f'input[name=method][value="{then}"]')
        page.evaluate(RECORD_FORM_FIELDS)
        page.click("button[type=submit]")
        page.wait_for_url(re.compile(r"#/tasks/\w+$"))  # the fake refuses an option the method does not take
        return page.evaluate("window.__fields")

    # CoCoOp takes ctx_init, not depth; VPT deep takes depth and lr, not ctx_init: those typed for it are sent.
    sent = new_task("cocoop", "3", {"ctx_init": "a photo of a", "lr": "0.01"}, then="vpt-deep")
    assert set(sent) == {"class_names", "files", "labels", "method", "epochs", "lr"}, sent
    # Zero-shot takes no epochs and no "More options": hidden, and none of them sent.
    page.goto(base + "/#/new")
    page.check('input[name=method][value="zero-shot"]')
    assert page.locator("#opt-epochs").is_hidden() and page.locator(".more-options").is_hidden()
    assert page.locator("#opt-shots").is_visible() and page.locator("#opt-seed").is_visible()
    page.check('input[name=method][value="coop"]')
    assert page.locator("#opt-epochs").is_visible()
    sent = new_task("coop", "4", {"depth": "1"}, then="zero-shot")
    assert set(sent) == {"class_names", "files", "labels", "method"}, sent
    assert page.evaluate(A11Y_PROBLEMS) == []


def test_local_mode_error_and_loading_states(fake_service, open_page, fixture_images):
    """Local mode (no keys): no key dialog. A failing request shows an error with a retry that recovers."""
    base = fake_service(api_key=None, epoch_seconds=0.3)
    page, _ = open_page(base)
    fail = {"on": True}

    def maybe_fail(route):
        if fail["on"]:
            route.fulfill(status=503, content_type="application/problem+json",
                          body='{"type":"about:blank","title":"Service unavailable","status":503,"detail":"The backbone is loading."}')
        else:
            route.continue_()

    page.route(re.compile(r"/tasks(\?.*)?$"), maybe_fail)
    page.goto(base + "/")
    page.locator(".error-box").filter(has_text="The backbone is loading.").wait_for()
    assert page.locator("#key-dialog").is_hidden()
    fail["on"] = False
    page.get_by_role("button", name="Try again").click()
    page.get_by_text("No tasks yet").wait_for()
    page.locator("#health[data-state=ok]").wait_for()

    # A finished task offers "Try" from the list, which preselects it.
    page.goto(base + "/#/new")
    page.fill("#class-name", "bag, sneaker")
    page.press("#class-name", "Enter")
    for cls in ("bag", "sneaker"):
        page.locator(f'.class-card[data-class-name="{cls}"] .dz-input').set_input_files(images(fixture_images, "train", cls, 2))
    page.fill("#opt-epochs", "2")
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(r"#/tasks/\w+$"))
    task_id = page.url.rsplit("/", 1)[-1]
    page.locator(".badge.st-succeeded").wait_for()
    page.goto(base + "/#/")
    page.locator(f'.task-row[data-task-id="{task_id}"]').get_by_role("link", name=re.compile("Try")).click()
    page.get_by_role("heading", name="Try it", exact=True).wait_for()
    page.wait_for_function(f"document.querySelector('#try-task').value === {task_id!r}")
    page.locator("form.classify .dz-input").set_input_files(images(fixture_images, "test", "bag", 1))
    page.locator(".result-card .topk li").nth(1).wait_for()
