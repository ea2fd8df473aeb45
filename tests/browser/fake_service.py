"""A stand-in for the real service, speaking the HTTP contract of DESIGN.md, for fast UI tests of the web
client (no model, training simulated by the clock). The end-to-end test runs the real `upt serve`.

Run by hand:  python tests/browser/fake_service.py --port 8765 [--api-key KEY]
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from upt.auto import method_listing

WEB = Path(__file__).resolve().parents[2] / "service" / "web"
METHODS = {method["name"] for method in method_listing()}  # GET /methods: the real registry's listing
# Each method's option fields, as listed; POST /tasks refuses an option the chosen method does not take.
TAKES = {method["name"]: {option["name"] for option in method["options"]} for method in method_listing()}
OPTION_FIELDS = set().union(*TAKES.values())


def problem(status: int, title: str, detail: str, errors=None):
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    if errors:
        body["errors"] = errors
    return JSONResponse(body, status_code=status, media_type="application/problem+json")


def _zip_classes(upload) -> list[str]:
    import zipfile

    with zipfile.ZipFile(upload.file) as z:
        return sorted({n.split("/")[0] for n in z.namelist() if "/" in n})


def create_app(api_key: str | None = None, epoch_seconds: float = 1.0) -> FastAPI:
    app = FastAPI()
    tasks: dict[str, dict] = {}
    counter = itertools.count(1)

    @app.middleware("http")
    async def auth(request: Request, call_next):
        path = request.url.path
        protected = path.startswith("/tasks") or path.startswith("/classify")
        if api_key and protected:
            got = request.headers.get("x-api-key") or request.headers.get("authorization", "").removeprefix("Bearer ")
            if got != api_key:
                return problem(401, "Unauthorized", "A valid API key is required.")
        return await call_next(request)

    def view(t: dict) -> dict:
        """Advance the simulated training by the clock, and return the public task."""
        if t["status"] in ("queued", "running"):
            elapsed = time.time() - t["started"]
            epochs = t["epochs"]
            done = min(epochs, int(elapsed / epoch_seconds))
            if t["method"] == "zero-shot":
                done = epochs
            while len(t["events"]) < done:
                e = len(t["events"]) + 1
                t["events"].append({"epoch": e, "loss": round(2.2 * math.exp(-0.6 * e), 4),
                                    "accuracy": round(min(0.98, 0.35 + 0.15 * e), 4), "lr": 0.002 * (1 - e / (epochs + 1))})
            t["status"] = "running" if elapsed > 0.3 else "queued"
            t["progress"] = min(1.0, elapsed / (epoch_seconds * epochs))
            t["epoch"] = done
            t["eta_s"] = max(0.0, epoch_seconds * epochs - elapsed)
            if t["events"]:
                t["loss"], t["accuracy"] = t["events"][-1]["loss"], t["events"][-1]["accuracy"]
            if done >= epochs:
                n = len(t["class_names"])
                cm = [[(8 if i == j else (1 if (i + 1) % n == j else 0)) for j in range(n)] for i in range(n)]
                t.update(status="succeeded", progress=1.0, eta_s=0, metrics={
                    "val_accuracy": round(sum(cm[i][i] for i in range(n)) / sum(map(sum, cm)), 4),
                    "val_count": sum(map(sum, cm)), "train_count": 4 * n,
                    "per_class_accuracy": {c: round(cm[i][i] / sum(cm[i]), 4) for i, c in enumerate(t["class_names"])},
                    "confusion_matrix": cm, "class_names": t["class_names"],
                    "variances": {"intra_class_visual": 0.412, "inter_class_text": 0.183,
                                  "per_class_visual": {c: round(0.35 + 0.03 * i, 3) for i, c in enumerate(t["class_names"])}}})
        if t["status"] == "cancelling":
            t["status"] = "cancelled"
        return {k: v for k, v in t.items() if k not in ("events", "started")}

    @app.get("/methods")
    def methods():
        return {"methods": method_listing()}

    @app.get("/livez")
    def livez():
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz():
        return {"status": "ok"}

    @app.post("/tasks", status_code=202)
    async def create(request: Request):
        form = await request.form()
        names = [str(x) for x in form.getlist("class_names")]
        files = form.getlist("files")
        labels = [str(x) for x in form.getlist("labels")]
        method = str(form.get("method") or "")
        errors = []
        if method not in METHODS:
            errors.append({"field": "method", "message": f"must be one of {', '.join(sorted(METHODS))}"})
        if not names and not form.get("archive"):
            errors.append({"field": "class_names", "message": "give at least one class"})
        if len(names) == 1:
            errors.append({"field": "class_names", "message": "give at least two classes"})
        if len(files) != len(labels):
            errors.append({"field": "labels", "message": "one label per file"})
        for k in sorted(OPTION_FIELDS & set(form.keys()) - TAKES.get(method, OPTION_FIELDS)):
            errors.append({"field": k, "message": f"{method} does not use this option; its options are "
                                                  f"{', '.join(sorted(TAKES[method]))}."})
        for k in ("shots", "epochs", "seed"):
            v = form.get(k)
            if v is not None and (not str(v).isdigit() or (k != "seed" and int(v) < 1) or (k == "epochs" and int(v) > 200)):
                errors.append({"field": k, "message": "must be an integer between 1 and 200" if k == "epochs" else "must be a positive integer"})
        if errors:
            return problem(422, "Unprocessable Content", "The task is invalid.", errors)
        tid = f"{next(counter):04d}{uuid.uuid4().hex[:12]}"
        epochs = int(form.get("epochs") or 5)
        t = {"id": tid, "status": "queued", "method": method, "class_names": names or _zip_classes(form.get("archive")), "progress": 0.0,
             "epoch": 0, "epochs": epochs, "loss": None, "accuracy": None, "eta_s": None, "metrics": None, "error": None,
             "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             "num_images": len(files), "model": "upt-tiny", "pretrained": "/tmp/tiny.pt",
             "config": {"method": method, "shots": int(form.get("shots") or 16), "epochs": epochs, "seed": int(form.get("seed") or 0)},
             "events": [], "started": time.time()}
        tasks[tid] = t
        return JSONResponse(view(t), status_code=202, headers={"Location": f"/tasks/{tid}"})

    @app.get("/tasks")
    def list_tasks(status: str | None = None, cursor: str | None = None, limit: int = 20):
        items = [view(t) for t in sorted(tasks.values(), key=lambda t: -t["started"])]
        if status:
            items = [t for t in items if t["status"] == status]
        start = int(cursor or 0)
        page = items[start:start + limit]
        return {"items": page, "next_cursor": str(start + limit) if start + limit < len(items) else None}

    @app.get("/tasks/{tid}")
    def get_task(tid: str):
        if tid not in tasks:
            return problem(404, "Not Found", f"no task {tid}")
        return view(tasks[tid])

    @app.get("/tasks/{tid}/events")
    def events(tid: str):
        if tid not in tasks:
            return problem(404, "Not Found", f"no task {tid}")
        view(tasks[tid])
        return {"task_id": tid, "items": [{"epoch": e["epoch"], "attempt": 1, "created_at": "2026-01-01T00:00:00Z", "data": e}
                                          for e in tasks[tid]["events"]]}

    @app.post("/tasks/{tid}/cancel", status_code=202)
    def cancel(tid: str):
        t = tasks.get(tid)
        if not t:
            return problem(404, "Not Found", f"no task {tid}")
        view(t)
        if t["status"] in ("queued", "running"):
            t["status"] = "cancelling"
        return {k: v for k, v in t.items() if k not in ("events", "started")}

    @app.delete("/tasks/{tid}", status_code=204)
    def delete(tid: str):
        if tasks.pop(tid, None) is None:
            return problem(404, "Not Found", f"no task {tid}")
        return Response(status_code=204)

    @app.get("/tasks/{tid}/artifact")
    def artifact(tid: str):
        return Response(b"PK\x05\x06" + b"\0" * 18, media_type="application/zip",
                        headers={"Content-Disposition": f'attachment; filename="task-{tid}.zip"'})

    @app.post("/classify")
    async def classify(request: Request):
        form = await request.form()
        files = form.getlist("files")
        task_id = form.get("task_id")
        names = [str(x) for x in form.getlist("class_names")]
        if task_id:
            if task_id not in tasks:
                return problem(404, "Not Found", f"no task {task_id}")
            names = tasks[task_id]["class_names"]
        if not names:
            return problem(422, "Unprocessable Content", "give task_id or class_names",
                           [{"field": "class_names", "message": "required without task_id"}])
        k = int(form.get("top_k") or 5)
        results = []
        for i, f in enumerate(files):
            raw = [math.exp(-((j - i) % len(names))) for j in range(len(names))]
            s = sum(raw)
            preds = sorted(({"label": n, "probability": r / s} for n, r in zip(names, raw)), key=lambda p: -p["probability"])
            results.append({"filename": getattr(f, "filename", f"image{i}"), "labels": preds[:k]})
        return {"task_id": task_id, "class_names": names, "predictions": results}

    app.mount("/", StaticFiles(directory=WEB, html=True), name="web")
    return app


if __name__ == "__main__":
    import uvicorn

    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--api-key")
    ap.add_argument("--epoch-seconds", type=float, default=1.0)
    a = ap.parse_args()
    uvicorn.run(create_app(a.api_key, a.epoch_seconds), host="127.0.0.1", port=a.port, log_level="warning")
