"""service.task_state on a real PostgreSQL: every transition, and every race it can lose.

Each test reads the row back and checks the lease rule (a lease exactly while running or cancelling).
The last test checks that nothing else in service/ and worker/ writes a task's status.
"""

from __future__ import annotations

import ast
import math
import threading
import uuid
from datetime import timedelta
from types import SimpleNamespace

import pytest

from service import task_state
from service.db import Database, db_now
from service.migrate import upgrade
from service.models import ACTIVE_STATUSES, Task, TaskEvent, Tenant
from service.settings import Settings
from svc_helpers import ROOT, images, scratch_database, skew_host_clock

pytestmark = pytest.mark.service


@pytest.fixture(scope="module")
def state_database_url():
    """A PostgreSQL database of this module's own: no API sweeper of the shared stack touches its rows."""
    with scratch_database("upt_state") as url:
        yield url


sessions: Database = None  # type: ignore[assignment]  # this test's database, set by the `settings` fixture


@pytest.fixture
def settings(state_database_url, tmp_path, monkeypatch):
    settings = Settings(database_url=state_database_url, data_dir=tmp_path)
    upgrade(settings)
    database = Database.from_settings(settings)
    monkeypatch.setitem(globals(), "sessions", database)
    yield settings
    database.dispose()


def new_task(status: str = "queued", **values) -> str:
    """A row as a test wants it (tests may write rows; the service may not, see the last test)."""
    with sessions.scope() as session:
        tenant = session.query(Tenant).filter_by(name="state").one_or_none() or Tenant(name="state")
        session.add(tenant)
        session.flush()
        now = db_now(session)
        values = {"enqueued_at": now, "lease": "held" if status in ACTIVE_STATUSES else None,
                  "heartbeat_at": now if status in ACTIVE_STATUSES else None} | values
        task = Task(tenant_id=tenant.id, status=status, method="coop", config={"method": "coop"},
                    class_names=["a", "b"], num_images=4, model="upt-tiny", pretrained="p", **values)
        session.add(task)
        session.flush()
        return task.id


def row(task_id: str) -> Task:
    """The row as it is now; asserts the lease rule on the way."""
    with sessions.scope() as session:
        task = session.get(Task, task_id)
    if task is not None:
        assert (task.lease is not None) == (task.status in ACTIVE_STATUSES), (task.status, task.lease)
    return task


def events(task_id: str, kind: str) -> list[TaskEvent]:
    with sessions.scope() as session:
        return list(session.query(TaskEvent).filter_by(task_id=task_id, kind=kind).order_by(TaskEvent.epoch))


def db_time():
    with sessions.scope() as session:
        return db_now(session)


def claimed(task_id: str, worker: str = "w1") -> str:
    with sessions.scope() as session:
        task = task_state.claim(session, task_id, worker)
    assert task is not None
    return task.lease


def report(epoch: int = 1, loss: float = 0.5) -> SimpleNamespace:
    return SimpleNamespace(progress=epoch / 4, epoch=epoch, epochs=4, loss=loss, accuracy=0.75, eta_s=3.0)


def concurrent_winners(count: int, take) -> list[str]:
    """Workers w0..w{count-1} call `take(session, worker)` at the same instant, each in a transaction of
    its own; the workers for which it returned something (a lost race returns None)."""
    start, won = threading.Barrier(count), []

    def one(worker: str) -> None:
        with sessions.scope() as session:
            start.wait()
            if take(session, worker) is not None:
                won.append(worker)

    threads = [threading.Thread(target=one, args=(f"w{i}",)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return won


def run(transition, *args):
    """One transition in a transaction of its own, as its callers run it."""
    with sessions.scope() as session:
        return transition(session, *args)


# --- the API -----------------------------------------------------------------------------------------

def test_a_new_task_is_queued_at_the_database_time(settings):
    before = db_time()
    with sessions.scope() as session:
        tenant = Tenant(name=f"new-{uuid.uuid4().hex[:6]}")
        session.add(tenant)
        session.flush()
        task = task_state.add_queued(session, Task(tenant_id=tenant.id, method="coop", config={}, class_names=[],
                                                   num_images=0, model="m", pretrained="p"))
    task = row(task.id)
    assert task.status == "queued" and before <= task.enqueued_at <= db_time()


def test_post_tasks_writes_enqueued_at_by_the_database_clock_not_the_api_hosts(settings, tmp_path, monkeypatch,
                                                                              tiny_checkpoint):
    """The sweeper judges `enqueued_at` by the database's clock: an API host an hour late made every
    message of its tasks look lost at once (an hour early: lost messages never re-sent)."""
    from service.api.tasks import _create
    from service.storage import Storage
    from service.task_input import parse_checked_task_form
    from service.uploads import ParsedForm, UploadedFile
    from upt.backbone import load_backbone

    chosen = images("train", 2)
    form = ParsedForm(fields={"class_names": sorted({c for c, _ in chosen}), "labels": [c for c, _ in chosen],
                              "method": ["coop"], "epochs": ["1"]},
                      files=[UploadedFile("files", path.name, path, path.stat().st_size) for _, path in chosen])
    with sessions.scope() as session:
        tenant = Tenant(name=f"clock-{uuid.uuid4().hex[:6]}")
        session.add(tenant)
    skew_host_clock(monkeypatch, -3600)
    before = db_time()
    backbone = load_backbone("upt-tiny", str(tiny_checkpoint), "cpu")
    with sessions.session() as session:
        spec = parse_checked_task_form(form, settings)
        task, replayed = _create(session, session.merge(tenant), settings, Storage(tmp_path / "storage"), spec, None,
                                 backbone, None)
    assert not replayed and row(task.id).status == "queued"
    assert before <= row(task.id).enqueued_at <= db_time()


def test_cancel_ends_a_queued_task_and_asks_a_running_one_to_stop(settings):
    queued, running = new_task("queued"), new_task("running")
    assert run(task_state.cancel, queued) and run(task_state.cancel, running)
    assert row(queued).status == "cancelled" and row(queued).finished_at is not None
    assert row(running).status == "cancelling" and row(running).lease == "held"
    assert not run(task_state.cancel, running)  # already cancelling: nothing more to do
    for final in ("succeeded", "failed", "cancelled"):
        task_id = new_task(final)
        assert not run(task_state.cancel, task_id) and row(task_id).status == final


# --- claim and heartbeat ------------------------------------------------------------------------------

def test_claim_takes_a_fresh_lease_once_and_only_from_queued(settings):
    task_id = new_task("queued", error="Training paused: no space left")
    with sessions.scope() as session:
        task = task_state.claim(session, task_id, "host:1")
    assert task.status == "running" and task.lease and task.worker == "host:1" and task.attempts == 1
    assert task.error is None and task.started_at == task.heartbeat_at
    assert run(task_state.claim, task_id, "host:2") is None  # a duplicate message: nothing to do
    assert row(task_id).lease == task.lease and row(task_id).worker == "host:1"
    for status in ("running", "cancelling", "succeeded", "failed", "cancelled"):
        assert run(task_state.claim, new_task(status), "host:2") is None
    assert run(task_state.claim, uuid.uuid4().hex, "host:2") is None  # deleted


def test_of_many_concurrent_claims_exactly_one_wins(settings):
    task_id = new_task("queued")
    won = concurrent_winners(8, lambda session, worker: task_state.claim(session, task_id, worker))
    assert len(won) == 1 and row(task_id).worker == won[0] and row(task_id).attempts == 1


def test_a_heartbeat_keeps_the_version_and_tells_the_worker_to_stop_on_cancel(settings):
    task_id = new_task("queued")
    lease = claimed(task_id)
    before = row(task_id)
    assert run(task_state.heartbeat, task_id, lease) == "running"
    after = row(task_id)
    assert after.heartbeat_at > before.heartbeat_at
    assert (after.version, after.updated_at) == (before.version, before.updated_at)  # pollers' ETags hold
    assert run(task_state.cancel, task_id)
    assert row(task_id).version == before.version + 1
    assert run(task_state.heartbeat, task_id, lease) == "cancelling"


def test_a_heartbeat_from_a_stale_lease_loses_and_writes_nothing(settings):
    task_id = new_task("queued")
    old = claimed(task_id, "w1")
    assert run(task_state.after_worker_loss, row(task_id), settings) == "queued"
    new = claimed(task_id, "w2")
    before = row(task_id)
    assert run(task_state.heartbeat, task_id, old) is None
    assert row(task_id).heartbeat_at == before.heartbeat_at and row(task_id).lease == new
    assert run(task_state.heartbeat, task_id, new) == "running"


# --- progress ------------------------------------------------------------------------------------------

def test_progress_and_epochs_are_written_under_the_lease(settings):
    task_id = new_task("queued")
    lease = claimed(task_id)
    version = row(task_id).version
    assert run(task_state.record_progress, task_id, lease, report(1))
    assert row(task_id).progress == 0.25 and row(task_id).version == version + 1  # shown: a new version
    assert run(task_state.record_epoch, task_id, lease, 1, report(1, loss=float("nan")),
               {"epoch": 1, "loss": float("nan")})
    [event] = events(task_id, "epoch")
    assert event.attempt == 1 and event.data == {"epoch": 1, "loss": None}  # PostgreSQL's json has no NaN
    assert math.isnan(row(task_id).loss)
    # The epoch trained again by a second attempt replaces its event.
    assert run(task_state.record_epoch, task_id, lease, 2, report(1), {"epoch": 1, "loss": 0.4})
    [event] = events(task_id, "epoch")
    assert event.attempt == 2 and event.data["loss"] == 0.4


def test_progress_from_a_stale_lease_loses_and_writes_no_event(settings):
    task_id = new_task("queued")
    old = claimed(task_id, "w1")
    run(task_state.after_worker_loss, row(task_id), settings)
    claimed(task_id, "w2")
    before = row(task_id)
    assert not run(task_state.record_progress, task_id, old, report(3))
    assert not run(task_state.record_epoch, task_id, old, 1, report(3), {"epoch": 3})
    after = row(task_id)
    assert (after.version, after.progress, after.metrics) == (before.version, before.progress, before.metrics)
    assert events(task_id, "epoch") == []


# --- the worker's endings ---------------------------------------------------------------------------------

def test_succeed_ends_the_task_and_adds_the_artifacts_bytes(settings):
    task_id = new_task("queued", stored_bytes=1000)
    lease = claimed(task_id)
    assert run(task_state.succeed, task_id, lease, {"val_accuracy": 0.9, "loss": float("nan")}, 234)
    task = row(task_id)
    assert task.status == "succeeded" and task.progress == 1.0 and task.stored_bytes == 1234
    assert task.metrics == {"val_accuracy": 0.9, "loss": None} and task.finished_at >= task.started_at
    assert not run(task_state.succeed, task_id, lease, {}, 1)  # once
    assert not run(task_state.fail, task_id, lease, "late") and row(task_id).status == "succeeded"


def test_succeed_after_the_lease_was_taken_over_loses(settings):
    task_id = new_task("queued")
    presumed_dead = claimed(task_id, "w1")
    assert run(task_state.after_worker_loss, row(task_id), settings) == "queued"
    holder = claimed(task_id, "w2")
    for transition, args in ((task_state.succeed, ({}, 10)), (task_state.fail, ("x",)),
                             (task_state.confirm_cancel, ()), (task_state.retry_later, (1.0, "x")),
                             (task_state.hand_back, ("w1", "x", 1.0))):
        assert not run(transition, task_id, presumed_dead, *args), transition.__name__
    task = row(task_id)
    assert task.status == "running" and task.lease == holder and task.attempts == 2 and task.stored_bytes == 0


def test_fail_and_confirm_cancel(settings):
    failing = new_task("queued")
    lease = claimed(failing)
    assert run(task_state.fail, failing, lease, "Training diverged.")
    assert row(failing).status == "failed" and row(failing).error == "Training diverged." and row(failing).finished_at
    stopping = new_task("queued")
    lease = claimed(stopping)
    run(task_state.cancel, stopping)
    assert run(task_state.confirm_cancel, stopping, lease)
    assert row(stopping).status == "cancelled" and row(stopping).finished_at


def test_retry_later_queues_the_task_in_the_future_by_the_database_clock(settings):
    task_id = new_task("queued")
    lease = claimed(task_id)
    before = db_time()
    assert run(task_state.retry_later, task_id, lease, 60.0, "Training paused: no space left.")
    task = row(task_id)
    assert task.status == "queued" and task.error == "Training paused: no space left."
    assert before + timedelta(seconds=60) <= task.enqueued_at <= db_time() + timedelta(seconds=60)
    with sessions.scope() as session:
        again = task_state.claim(session, task_id, "w2")
    assert again.attempts == 2 and again.error is None


def test_a_cancel_wins_over_a_retry_or_a_hand_back(settings):
    for transition, args in ((task_state.retry_later, (5.0, "paused")), (task_state.hand_back, ("w", "other", 5.0))):
        task_id = new_task("queued")
        lease = claimed(task_id)
        run(task_state.cancel, task_id)
        assert not run(transition, task_id, lease, *args)
        assert run(task_state.confirm_cancel, task_id, lease) and row(task_id).status == "cancelled"


def test_hand_back_requeues_untrained_and_says_why(settings):
    task_id = new_task("queued")
    lease = claimed(task_id, "host:1")
    before = db_time()
    assert run(task_state.hand_back, task_id, lease, "host:1", "serves another backbone", 2.0)
    task = row(task_id)
    assert task.status == "queued" and task.attempts == 0 and task.started_at is None  # not an attempt
    assert task.enqueued_at >= before + timedelta(seconds=2)
    lease = claimed(task_id, "host:2")
    assert run(task_state.hand_back, task_id, lease, "host:2", "serves another backbone", 2.0)
    assert [(e.epoch, e.data) for e in events(task_id, "handback")] == [
        (1, {"worker": "host:1", "reason": "serves another backbone"}),
        (2, {"worker": "host:2", "reason": "serves another backbone"})]
    with sessions.scope() as session:
        assert task_state.hand_backs(session, task_id) == 2
    # A task that had trained before keeps its first start and its earlier attempt.
    trained = new_task("queued")
    lease = claimed(trained)
    run(task_state.after_worker_loss, row(trained), settings)
    started = row(trained).started_at
    lease = claimed(trained)
    assert run(task_state.hand_back, trained, lease, "w", "other", 0.0)
    assert row(trained).attempts == 1 and row(trained).started_at == started


# --- recovery ----------------------------------------------------------------------------------------------

def test_renew_enqueued_is_a_compare_and_set_on_the_time_read(settings):
    task_id = new_task("queued")
    seen = row(task_id)
    assert run(task_state.renew_enqueued, task_id, seen.enqueued_at)
    assert not run(task_state.renew_enqueued, task_id, seen.enqueued_at)  # a second sweeper with the same read
    renewed = row(task_id)
    assert renewed.enqueued_at > seen.enqueued_at and renewed.version == seen.version  # shown nowhere


def test_requeue_of_a_task_that_was_just_claimed_loses(settings):
    task_id = new_task("queued")
    seen = row(task_id)  # the sweeper's read: queued for long
    lease = claimed(task_id)  # a worker got the message meanwhile
    assert not run(task_state.renew_enqueued, task_id, seen.enqueued_at)
    assert row(task_id).status == "running" and row(task_id).lease == lease


def test_after_worker_loss_requeues_fails_or_ends_a_cancel(settings):
    old = db_time() - timedelta(hours=1)
    retry = new_task("running", attempts=1, heartbeat_at=old)
    spent = new_task("running", attempts=settings.max_attempts, heartbeat_at=old)
    orphan = new_task("cancelling", attempts=1, heartbeat_at=old)
    assert run(task_state.after_worker_loss, row(retry), settings) == "queued"
    assert run(task_state.after_worker_loss, row(spent), settings) == "failed"
    assert run(task_state.after_worker_loss, row(orphan), settings) == "cancelled"
    assert row(retry).enqueued_at > old and row(retry).attempts == 1
    assert "UPT_MAX_ATTEMPTS" in row(spent).error and row(spent).finished_at
    assert row(orphan).finished_at


def test_after_worker_loss_loses_to_any_change_since_the_sweepers_read(settings):
    old = db_time() - timedelta(hours=1)
    beat, cancelled, ended, taken = (new_task("running", attempts=1, heartbeat_at=old) for _ in range(4))
    seen = {task_id: row(task_id) for task_id in (beat, cancelled, ended, taken)}
    assert run(task_state.heartbeat, beat, "held") == "running"  # the worker was alive after all
    run(task_state.cancel, cancelled)
    run(task_state.succeed, ended, "held", {}, 0)
    run(task_state.after_worker_loss, seen[taken], settings)  # another sweeper was first...
    new_lease = claimed(taken, "w2")  # ...and another worker holds it now
    for task_id, status in ((beat, "running"), (cancelled, "cancelling"), (ended, "succeeded"), (taken, "running")):
        assert run(task_state.after_worker_loss, seen[task_id], settings) is None
        assert row(task_id).status == status
    assert row(taken).lease == new_lease


# --- one home ----------------------------------------------------------------------------------------------

def _updates_task(call: ast.Call) -> bool:
    """`update(Task)...` or `session.query(Task)...` somewhere down the receiver chain of `call`."""
    node = call.func
    while isinstance(node, (ast.Attribute, ast.Call)):
        if isinstance(node, ast.Call):
            name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
            if name in ("update", "insert", "query") and any(isinstance(a, ast.Name) and a.id == "Task"
                                                              for a in node.args):
                return True
            node = node.func
        else:
            node = node.value
    return False


def status_writes_outside_task_state() -> list[str]:
    found = []
    for path in sorted([*(ROOT / "service").rglob("*.py"), *(ROOT / "worker").rglob("*.py")]):
        if path == ROOT / "service" / "task_state.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    node.func.attr in ("values", "update") and _updates_task(node):
                # The instant stage's own columns are instant.py's, with the bytes it stores (a counter, not a
                # state); anything else, and any **values, is not.
                if any(k.arg is None or not (k.arg.startswith("instant_") or k.arg == "stored_bytes")
                       for k in node.keywords) or node.args:
                    found.append(f"{where}: UPDATE of a task row")
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Task" \
                    and any(k.arg in ("status", None) for k in node.keywords):
                found.append(f"{where}: Task(status=...)")
            elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    for part in ast.walk(target):
                        if isinstance(part, ast.Attribute) and part.attr in ("status", "lease") and \
                                not (isinstance(part.value, ast.Name) and part.value.id == "self"):
                            found.append(f"{where}: assignment to .{part.attr}")
    return found


def test_nothing_but_task_state_writes_a_tasks_status():
    """Routes, worker and recovery change a task's state through service.task_state only."""
    assert status_writes_outside_task_state() == []
