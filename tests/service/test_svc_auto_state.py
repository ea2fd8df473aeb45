"""service.task_state's method=auto transitions on a real PostgreSQL: each candidate claimed, trained,
stopped, released or lost under a lease of its own, the task finished by exactly one job, and every
race they can lose (a second claim, a stale lease, a cancel, two candidates finishing at once)."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

import test_svc_task_state as base
from service import task_state
from service.models import Task, TaskCandidate, TaskEvent, Tenant
from test_svc_task_state import run, settings, state_database_url  # noqa: F401 - fixtures: the module's database

pytestmark = pytest.mark.service
CANDIDATES = ["tip-adapter", "coop", "vpt-shallow"]  # 0 + 3 + 3 epochs


def new_auto_task() -> str:
    with base.sessions.scope() as session:
        tenant = session.query(Tenant).filter_by(name="auto").one_or_none() or Tenant(name="auto")
        session.add(tenant)
        session.flush()
        task = Task(tenant_id=tenant.id, method="auto", class_names=["a", "b"], num_images=4, model="upt-tiny",
                    pretrained="p", config={"method": "auto", "candidates": CANDIDATES, "epochs": 3})
        task_state.add_queued(session, task)
        session.flush()
        return task.id


def task(task_id: str) -> Task:
    with base.sessions.scope() as session:
        return session.get(Task, task_id)


def candidate(task_id: str, method: str) -> TaskCandidate:
    with base.sessions.scope() as session:
        return session.query(TaskCandidate).filter_by(task_id=task_id, method=method).one()


def events(task_id: str, kind: str) -> list[TaskEvent]:
    with base.sessions.scope() as session:
        return list(session.query(TaskEvent).filter_by(task_id=task_id, kind=kind).order_by(TaskEvent.epoch))


def claim(task_id: str, method: str, worker: str = "w1") -> str | None:
    with base.sessions.scope() as session:
        found = task_state.claim_candidate(session, task_id, method, worker)
        return found.lease if found is not None else None


def report(progress: float, loss: float = 0.5) -> SimpleNamespace:
    return SimpleNamespace(progress=progress, epoch=1, epochs=3, loss=loss, accuracy=0.75, eta_s=1.0)


def board_row(method: str, accuracy: float) -> dict:
    return {"method": method, "val_accuracy": accuracy, "val_count": 8, "per_class_accuracy": {},
            "trainable_parameters": 10, "training_seconds": 1.0}


def finished(task_id: str, method: str, accuracy: float = 0.5) -> None:
    lease = claim(task_id, method)
    assert lease is not None and run(task_state.finish_candidate, task_id, method, lease, board_row(method, accuracy))


def test_a_new_auto_task_has_its_candidates_queued(settings):
    task_id = new_auto_task()
    with base.sessions.scope() as session:
        rows = task_state.candidates(session, task_id)
    assert [(c.position, c.method, c.status, c.epochs, c.attempts) for c in rows] == [
        (0, "tip-adapter", "queued", 0, 0), (1, "coop", "queued", 3, 0), (2, "vpt-shallow", "queued", 3, 0)]
    assert task(task_id).epochs == 6 and task(task_id).status == "queued"


def test_a_candidate_is_claimed_once_and_the_task_runs_without_a_lease(settings):
    task_id = new_auto_task()
    lease = claim(task_id, "coop", "w1")
    assert lease is not None
    assert claim(task_id, "coop", "w2") is None  # a redelivered message finds nothing to do
    row = task(task_id)
    assert row.status == "running" and row.lease is None and row.attempts == 1
    assert row.metrics["auto"]["running"] == ["coop"] and row.metrics["auto"]["workers"] == {"coop": "w1"}
    assert row.metrics["auto"]["queued"] == ["tip-adapter", "vpt-shallow"]
    assert claim(task_id, "vpt-shallow", "w2") is not None  # another candidate, another worker, at once
    assert task(task_id).metrics["auto"]["running"] == ["coop", "vpt-shallow"]


def test_of_many_concurrent_claims_of_one_candidate_exactly_one_wins(settings):
    task_id = new_auto_task()
    won = base.concurrent_winners(6, lambda session, worker: task_state.claim_candidate(session, task_id, "coop",
                                                                                        worker))
    assert len(won) == 1 and candidate(task_id, "coop").worker == won[0] and candidate(task_id, "coop").attempts == 1


def test_no_candidate_of_a_cancelled_task_is_claimed(settings):
    task_id = new_auto_task()
    assert run(task_state.cancel, task_id) and task(task_id).status == "cancelled"
    assert claim(task_id, "coop") is None and candidate(task_id, "coop").status == "queued"


def test_progress_counts_every_candidates_epochs_and_a_stale_lease_loses(settings):
    task_id = new_auto_task()
    coop, vpt = claim(task_id, "coop"), claim(task_id, "vpt-shallow")
    assert run(task_state.record_candidate_progress, task_id, "coop", coop, report(0.5), 0.5)
    assert run(task_state.record_candidate_progress, task_id, "vpt-shallow", vpt, report(1 / 3), 1 / 3, 1,
               {"candidate": "vpt-shallow"})
    row = task(task_id)
    assert row.progress == pytest.approx((0.5 * 3 + 1 / 3 * 3) / 6) and row.epoch == 1 and row.epochs == 6
    assert row.eta_s is not None and row.eta_s >= 0
    assert run(task_state.record_candidate_progress, task_id, "coop", coop, report(2 / 3), 2 / 3, 2,
               {"candidate": "coop"})
    # Numbered in the order written (the task's epochs done), whichever candidate: a stream's cursor skips none.
    assert [(e.epoch, e.attempt, e.data["candidate"]) for e in events(task_id, "epoch")] == [
        (1, 1, "vpt-shallow"), (3, 1, "coop")]
    version = task(task_id).version
    assert not run(task_state.record_candidate_progress, task_id, "coop", "stale", report(0.9), 0.9, 3, {})
    assert task(task_id).version == version and [e.epoch for e in events(task_id, "epoch")] == [1, 3]


def test_a_heartbeat_answers_the_tasks_status_and_loses_with_a_stale_lease(settings):
    task_id = new_auto_task()
    lease = claim(task_id, "coop")
    version = task(task_id).version
    assert run(task_state.candidate_heartbeat, task_id, "coop", lease) == "running"
    assert task(task_id).version == version  # liveness only
    assert run(task_state.candidate_heartbeat, task_id, "coop", "stale") is None
    assert run(task_state.cancel, task_id)
    assert run(task_state.candidate_heartbeat, task_id, "coop", lease) == "cancelling"


def test_the_job_that_finishes_the_last_candidate_finishes_the_task_once(settings):
    task_id = new_auto_task()
    finished(task_id, "tip-adapter", 0.5)
    finished(task_id, "coop", 0.9)
    assert run(task_state.take_auto_finish, task_id, "w1") is None  # vpt-shallow is not trained yet
    finished(task_id, "vpt-shallow", 0.7)
    lease = run(task_state.take_auto_finish, task_id, "w2")
    assert lease is not None and run(task_state.take_auto_finish, task_id, "w3") is None  # one job only
    assert [e.data["method"] for e in events(task_id, "candidate")] == CANDIDATES
    assert task(task_id).metrics["auto"]["finished"][1]["val_accuracy"] == 0.9
    assert run(task_state.succeed, task_id, lease, {"auto": {"winner": "coop"}}, 10)
    assert task(task_id).status == "succeeded" and task(task_id).lease is None


def test_of_two_candidates_finishing_at_once_exactly_one_job_finishes_the_task(settings):
    for _ in range(5):
        task_id = new_auto_task()
        finished(task_id, "tip-adapter")
        leases = {method: claim(task_id, method) for method in ("coop", "vpt-shallow")}
        start, won = threading.Barrier(2), []

        def finish(method: str) -> None:
            start.wait()
            run(task_state.finish_candidate, task_id, method, leases[method], board_row(method, 0.5))
            lease = run(task_state.take_auto_finish, task_id, method)  # its own transaction, after the commit
            if lease is not None:
                won.append(method)

        threads = [threading.Thread(target=finish, args=(method,)) for method in leases]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(won) == 1, won


def test_a_cancel_ends_the_task_when_its_last_running_candidate_stops(settings):
    task_id = new_auto_task()
    coop, vpt = claim(task_id, "coop"), claim(task_id, "vpt-shallow")
    assert run(task_state.cancel, task_id) and task(task_id).status == "cancelling"
    assert run(task_state.stop_candidate, task_id, "coop", coop)
    assert not run(task_state.confirm_auto_cancel, task_id)  # vpt-shallow still runs
    assert not run(task_state.release_candidate, task_id, "vpt-shallow", vpt, 5.0, "disk full")  # cancel wins
    assert run(task_state.stop_candidate, task_id, "vpt-shallow", vpt)
    assert run(task_state.confirm_auto_cancel, task_id) and task(task_id).status == "cancelled"
    assert task(task_id).metrics["auto"]["running"] == []


def test_a_cancel_with_no_candidate_running_ends_at_once(settings):
    task_id = new_auto_task()
    finished(task_id, "tip-adapter")  # the task runs; no candidate trains at this moment
    assert run(task_state.cancel, task_id) and task(task_id).status == "cancelled"


def test_a_failed_candidate_fails_the_task_and_the_others_lose_their_lease(settings):
    task_id = new_auto_task()
    coop, vpt = claim(task_id, "coop"), claim(task_id, "vpt-shallow")
    assert run(task_state.fail_candidate, task_id, "coop", coop, "Candidate coop: broken")
    assert (task(task_id).status, task(task_id).error) == ("failed", "Candidate coop: broken")
    assert run(task_state.candidate_heartbeat, task_id, "vpt-shallow", vpt) is None  # -> its worker stops
    assert not run(task_state.fail_candidate, task_id, "coop", coop, "again")


def test_release_queues_the_candidate_in_the_future_and_a_hand_back_is_not_an_attempt(settings):
    task_id = new_auto_task()
    lease = claim(task_id, "coop")
    assert run(task_state.release_candidate, task_id, "coop", lease, 30.0, "Candidate coop waits", False)
    found = candidate(task_id, "coop")
    assert (found.status, found.lease, found.attempts) == ("queued", None, 0)
    assert task(task_id).status == "running" and task(task_id).error == "Candidate coop waits"
    assert not run(task_state.release_candidate, task_id, "coop", lease, 30.0, "again")  # lease gone


def test_a_lost_candidate_is_queued_again_or_fails_the_task_after_max_attempts(settings):
    task_id = new_auto_task()
    claim(task_id, "coop")
    seen = candidate(task_id, "coop")
    assert run(task_state.after_worker_loss, task(task_id), settings) is None  # the task is its candidates'
    beat = claim(task_id, "vpt-shallow")
    run(task_state.candidate_heartbeat, task_id, "vpt-shallow", beat)
    assert run(task_state.after_candidate_loss, seen, settings) == "queued"
    assert run(task_state.after_candidate_loss, seen, settings) is None  # judged on what it read: changed
    assert candidate(task_id, "coop").status == "queued" and task(task_id).status == "running"
    for attempt in range(settings.max_attempts - 1):
        claim(task_id, "coop")
        last = run(task_state.after_candidate_loss, candidate(task_id, "coop"), settings)
    assert last == "failed"
    assert task(task_id).status == "failed" and "candidate coop" in task(task_id).error


def test_a_candidate_whose_worker_beat_meanwhile_is_not_taken_away(settings):
    task_id = new_auto_task()
    lease = claim(task_id, "coop")
    seen = candidate(task_id, "coop")
    run(task_state.candidate_heartbeat, task_id, "coop", lease)
    assert run(task_state.after_candidate_loss, seen, settings) is None
    assert candidate(task_id, "coop").lease == lease
