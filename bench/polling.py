"""Database cost of polling an unchanged task: SQL statements, columns read and body bytes per GET /tasks/{id}.

Two clients poll the same finished task, which has a realistic metrics blob (a confusion matrix) and
one event per epoch: one sends a plain GET every time, as every client did before ETags; the other
sends back the ETag it got as If-None-Match. Statements are counted with SQLAlchemy's
`before_cursor_execute` event on the service's own engine (in-process app, SQLite or --database-url).
"""

from __future__ import annotations

import argparse
import os
import tempfile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--polls", type=int, default=200)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--database-url", default="", help="default: a fresh SQLite file")
    args = parser.parse_args()
    os.environ["UPT_DATA_DIR"] = tempfile.mkdtemp(prefix="upt-bench-polling-")
    os.environ["UPT_DATABASE_URL"] = args.database_url
    os.environ["UPT_PRELOAD_BACKBONE"] = "false"

    from fastapi.testclient import TestClient
    from sqlalchemy import event

    from service.app import create_app
    from service.auth import create_key, get_or_create_tenant
    from service.migrate import upgrade
    from service.models import Task, TaskEvent
    from service.settings import Settings

    settings = Settings()
    upgrade(settings)
    app = create_app(settings)
    task_id = "b" * 32
    names = [f"class {i}" for i in range(args.classes)]
    with app.state.database.scope() as session:
        key = create_key(session, "bench")
        tenant = get_or_create_tenant(session, "bench")
        session.add(Task(id=task_id, tenant_id=tenant.id, method="upt", config={"method": "upt"}, class_names=names,
                         num_images=16 * args.classes, model="ViT-B-16", pretrained="openai", status="succeeded",
                         progress=1.0, metrics={"val_accuracy": 0.5, "per_class_accuracy": dict.fromkeys(names, 0.5),
                                                "confusion_matrix": [[1] * args.classes] * args.classes}))
        for epoch in range(1, args.epochs + 1):
            session.add(TaskEvent(task_id=task_id, kind="epoch", epoch=epoch, data={"epoch": epoch, "loss": 1.0}))

    statements: list[int] = []  # per statement: how many columns its result has (0: not a query)
    event.listen(app.state.database.engine, "after_cursor_execute",
                 lambda conn, cursor, *a: statements.append(len(cursor.description or ())))
    headers = {"Authorization": f"Bearer {key}"}
    with TestClient(app) as client:
        def poll(conditional: bool) -> tuple[float, float]:
            etag = client.get(f"/tasks/{task_id}", headers=headers).headers.get("etag")
            sent = dict(headers, **({"If-None-Match": etag} if conditional and etag else {}))
            statements.clear()
            received = 0
            for _ in range(args.polls):
                answer = client.get(f"/tasks/{task_id}", headers=sent)
                assert answer.status_code in (200, 304), answer.text
                received += len(answer.content)
            return len(statements) / args.polls, sum(statements) / args.polls, received / args.polls

        plain, conditional = poll(conditional=False), poll(conditional=True)
    url = settings.resolved_database_url.split("://")[0]
    print(f"# {args.polls} polls of one unchanged task ({args.classes} classes, {args.epochs} epoch events), {url}")
    for name, (count, columns, received) in (("plain GET (every poll before ETags)", plain),
                                             ("GET with If-None-Match (ETag)", conditional)):
        print(f"{name:38s} {count:.2f} SQL statements/poll, {columns:.0f} columns read/poll, "
              f"{received:.0f} body bytes/poll")


if __name__ == "__main__":
    main()
