"""The serving encoder shared by /classify and the instant stage: /classify's passes go first, and a
background pass yields to them slice by slice, with the features of one whole pass."""

from __future__ import annotations

import threading

import httpx
import pytest
import torch

from service.shared_encoder import BACKGROUND_SLICE, SharedImageEncoder
from svc_helpers import api_in_process, classify_with_task, task_form, wait_for_stage, wait_until
from upt.backbone import load_backbone
from upt.serving import TorchImageEncoder
from upt.tiny import TINY_MODEL


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return load_backbone(TINY_MODEL, str(tiny_checkpoint), "cpu")


class RecordingEncoder:
    """Records each pass's caller and size; a pass of `hold_calls` waits for `release` first."""

    runtime = "fake"

    def __init__(self, hold_calls: set[int]) -> None:
        self.calls: list[tuple[str, int]] = []
        self.hold_calls = hold_calls
        self.holding = threading.Event()
        self.release = threading.Event()

    def describe(self) -> str:
        return "fake"

    def __call__(self, images, prompts, normalize=True, depths=None):
        self.calls.append((threading.current_thread().name, len(images)))
        if len(self.calls) - 1 in self.hold_calls:
            self.holding.set()
            assert self.release.wait(30)
        return torch.zeros(len(images), 2)


def _in_thread(name: str, fn) -> threading.Thread:
    thread = threading.Thread(target=fn, name=name, daemon=True)
    thread.start()
    return thread


def test_a_background_pass_gives_the_features_of_one_pass(tiny):
    torch.manual_seed(0)
    images = torch.randn(11, 3, tiny.image.size, tiny.image.size)
    shared = SharedImageEncoder(TorchImageEncoder(tiny), background_slice=4)
    one_pass = TorchImageEncoder(tiny)
    torch.testing.assert_close(shared.background(images, normalize=False), one_pass(images, None, normalize=False))
    per_sample = torch.randn(11, 1, 2, tiny.vision_width) * 0.02  # each image its own prompts
    torch.testing.assert_close(shared.background(images, per_sample), one_pass(images, per_sample))
    shared_prompts = per_sample[0]
    torch.testing.assert_close(shared.background(images, shared_prompts), one_pass(images, shared_prompts))


def test_classify_waits_for_one_background_slice_not_the_whole_pass():
    fake = RecordingEncoder(hold_calls={0})
    shared = SharedImageEncoder(fake, background_slice=8)
    background = _in_thread("instant", lambda: shared.background(torch.zeros(64, 3, 4, 4)))
    assert fake.holding.wait(30)  # the first slice runs
    classify = _in_thread("classify", lambda: shared(torch.zeros(1, 3, 4, 4), None))
    wait_until(lambda: shared._serving_waits == 1, "the /classify pass waiting")
    fake.release.set()
    classify.join(30)
    background.join(30)
    assert fake.calls[:3] == [("instant", 8), ("classify", 1), ("instant", 8)]
    assert fake.calls.count(("instant", 8)) == 8 and len(fake.calls) == 9


def test_background_work_takes_turns_with_classify_passes_that_keep_coming():
    """Under sustained load a slice that waited through a /classify pass goes next: the build advances
    (the batcher starts its next pass at once, so without a turn the slice would wait for the load
    to end), and no /classify pass waits for more than one slice."""
    fake = RecordingEncoder(hold_calls={0})
    shared = SharedImageEncoder(fake, background_slice=8)
    first = _in_thread("classify-1", lambda: shared(torch.zeros(2, 3, 4, 4), None))
    assert fake.holding.wait(30)  # a /classify pass holds the encoder
    background = _in_thread("instant", lambda: shared.background(torch.zeros(16, 3, 4, 4)))
    wait_until(lambda: shared._background_waits == 1, "the background slice waiting")
    second = _in_thread("classify-2", lambda: shared(torch.zeros(3, 3, 4, 4), None))
    wait_until(lambda: shared._serving_waits == 1, "the second /classify pass waiting")
    fake.release.set()
    for thread in (first, second, background):
        thread.join(30)
    assert fake.calls == [("classify-1", 2), ("instant", 8), ("classify-2", 3), ("instant", 8)]


@pytest.mark.service
def test_the_api_builds_an_instant_stage_in_slices_and_classify_still_answers(tmp_path, tiny_checkpoint,
                                                                           monkeypatch):
    """The instant stage's cache (4 classes x 4 shots x 4 views, and the validation images) goes
    through the serving encoder in slices of BACKGROUND_SLICE images, not in passes of 64."""
    passes: list[tuple[str, int]] = []
    pass_of = TorchImageEncoder.__call__

    def recording(self, images, prompts, normalize=True, depths=None):
        passes.append((threading.current_thread().name, len(images)))
        return pass_of(self, images, prompts, normalize, depths)

    monkeypatch.setattr(TorchImageEncoder, "__call__", recording)
    with api_in_process(tmp_path, tiny_checkpoint, instant_augment_views=4) as (base, _, headers):
        client = httpx.Client(base_url=base, headers=headers, timeout=60)
        data, files = task_form(per_class=8, method="coop", shots=4, epochs=1)
        created = client.post("/tasks", data=data, files=files)
        assert created.status_code == 202, created.text
        task_id = created.json()["id"]
        answered = classify_with_task(client, task_id)  # while the stage builds, or once it is ready
        assert answered.status_code == 200, answered.text
        assert wait_for_stage(client, task_id, "instant", {"ready", "failed"})["stages"]["instant"]["state"] == "ready"
    # The stage is built by the API's instant-stage thread, or by the /classify that asked first.
    background = [size for thread, size in passes if thread != "classify-batcher"]
    assert sum(background) >= 4 * 4 * 4 and max(background) <= BACKGROUND_SLICE, background
