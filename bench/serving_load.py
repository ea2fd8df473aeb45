"""/classify as users see it: N concurrent HTTP clients against a real `upt serve`.

One run, so that the ratios compare like with like on a shared machine:
- raw PyTorch fp32 `encode_image` throughput at batch 32, measured in this process right before and
  right after each load phase (the server idle meanwhile): each phase's ratio is against the mean of
  the two, since on a shared or virtual machine the yardstick drifts by 10 % within minutes, and both
  are printed so that the drift during a phase shows;
- for each serving configuration (`--configs`, e.g. the default `auto`, exact `fp32`, or the opt-in
  `openvino:int8`, calibrated on the fixture's training images): a fresh
  `upt serve --no-worker` on its own SQLite database, then N clients posting one image per request
  over 1, 10 and 100 distinct tasks of mixed methods (zero-shot class lists, CoOp, VPT-shallow,
  VPT-deep, UPT artifacts), printing images/s (and its ratio to raw), p50/p99 latency, encoder
  passes per image (from /metrics: upt_classify_encoder_batch_size _count / _sum), the share of the
  phase the encoder was busy and its speed meanwhile (upt_classify_encoder_seconds), and how many
  cores the server and the clients (this process) kept busy: on one machine they share the CPU;
- a cold zero-shot miss for 100 classes and a tuned-artifact miss, each against a hit.

The backbone is ViT-B-16 with random weights (the only weights here; cost does not depend on values).
The tuned tasks' artifacts are made from untrained prompts and written as a worker would write them
(rows in the database, artifacts in storage): serving them costs exactly what a trained one costs.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

from _timing import machine, median_seconds

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "fashion_mnist"
METHODS = ("zero-shot", "coop", "vpt-shallow", "vpt-deep", "upt")
CLASSES = [f"class {i}" for i in range(10)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_checkpoint(model: str, path: Path, device: str):
    from safetensors.torch import save_file

    from upt.backbone import load_backbone, random_backbone

    clip = random_backbone(model).clip
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(path))
    return load_backbone(model, str(path), device)


def make_tasks(backbone, data_dir: Path, count: int) -> list[dict]:
    """`count` tasks cycling through METHODS: zero-shot ones are class lists, tuned ones are succeeded
    task rows with an artifact in storage (untrained prompts: the serving cost is the same)."""
    os.environ["UPT_DATA_DIR"] = str(data_dir)
    from service.auth import LOCAL_TENANT, get_or_create_tenant
    from service.db import Database
    from service.migrate import upgrade
    from service.models import Task, TaskStatus
    from service.settings import Settings
    from service.storage import Storage
    from upt.artifact import save_artifact
    from upt.methods import PromptConfig, PromptedCLIP

    settings = Settings()  # each configuration has a database of its own (UPT_DATA_DIR above)
    upgrade(settings)
    storage = Storage.from_settings(settings)
    tasks = []
    database = Database.from_settings(settings)
    with database.scope() as session:
        tenant = get_or_create_tenant(session, LOCAL_TENANT)
        for index in range(count):
            method = METHODS[index % len(METHODS)]
            names = [f"{name} {index}" for name in CLASSES]
            if method == "zero-shot":
                tasks.append({"method": method, "data": {"class_names": names}})
                continue
            torch.manual_seed(index)
            config = PromptConfig(method)
            model = PromptedCLIP(backbone, names, config).eval()
            task = Task(tenant_id=tenant.id, status=TaskStatus.succeeded.value, method=method,
                        config={"prompt": config.to_dict()}, class_names=names, num_images=0,
                        model=backbone.name, pretrained=backbone.pretrained)
            session.add(task)
            session.flush()
            save_artifact(storage.artifact_dir(task.id), backbone=backbone, method=method, class_names=names,
                          tensors=model.export(), options={"prompt": config.to_dict()})
            tasks.append({"method": method, "data": {"task_id": task.id}})
    database.dispose()
    return tasks


class Server:
    def __init__(self, env: dict, port: int, log: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self.process = subprocess.Popen([sys.executable, "-m", "upt", "serve", "--no-worker"], env=env,
                                        stdout=open(log, "w"), stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 900) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"upt serve exited:\n{self.log.read_text()[-3000:]}")
            try:
                ready = httpx.get(f"{self.url}/readyz", timeout=5)
                if ready.status_code == 200:
                    return ready.json()
            except httpx.HTTPError:
                pass
            time.sleep(2)
        raise RuntimeError(f"not ready after {timeout_s} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def encoder_counts(url: str) -> tuple[float, float, float]:
    """Encoder passes, the images they encoded, and the seconds they took, so far (from /metrics)."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    names = ("upt_classify_encoder_batch_size_count", "upt_classify_encoder_batch_size_sum",
             "upt_classify_encoder_seconds_sum")
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in names:
            values[name] = float(value)
    return tuple(values.get(name, 0.0) for name in names)


def classify(client: httpx.Client, url: str, task: dict, image: tuple[str, bytes]) -> float:
    start = time.perf_counter()
    response = client.post(f"{url}/classify", data=task["data"],
                           files=[("files", (image[0], image[1], "image/png"))], timeout=600)
    elapsed = time.perf_counter() - start
    if response.status_code != 200:
        raise RuntimeError(f"/classify answered {response.status_code}: {response.text[:500]}")
    return elapsed


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) that process `pid` has used, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load(url: str, tasks: list[dict], images: list[tuple[str, bytes]], clients: int, seconds: float,
         server_pid: int) -> dict:
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client_loop(number: int) -> None:
        with httpx.Client() as client:
            k = 0
            while time.monotonic() < stop_at:
                task = tasks[(number + k * clients) % len(tasks)]
                try:
                    elapsed = classify(client, url, task, images[(number + k) % len(images)])
                except Exception as error:  # reported, not hidden
                    with lock:
                        errors.append(str(error))
                    return
                with lock:
                    latencies.append(elapsed)
                k += 1

    passes0, images0, encoder_s0 = encoder_counts(url)
    # Where the machine's cores went: the clients run in this process and share the CPU with the server.
    clients_cpu0, server_cpu0 = time.process_time(), process_cpu_s(server_pid)
    start = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    clients_cores = (time.process_time() - clients_cpu0) / wall
    server_cores = (process_cpu_s(server_pid) - server_cpu0) / wall
    passes1, images1, encoder_s1 = encoder_counts(url)
    if errors:
        raise RuntimeError(f"{len(errors)} client errors, first: {errors[0]}")
    ordered = sorted(latencies)
    return {
        "images_per_s": len(latencies) / wall,
        "p50_ms": 1000 * statistics.median(ordered),
        "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        "passes_per_image": (passes1 - passes0) / max(1.0, images1 - images0),
        # Where the time went: the share of the phase the encoder was busy, and its own speed then.
        "encoder_busy": (encoder_s1 - encoder_s0) / wall,
        "encoder_images_per_s": (images1 - images0) / max(1e-9, encoder_s1 - encoder_s0),
        "requests": len(latencies),
        "server_cores": server_cores,
        "clients_cores": clients_cores,
        "load_average": os.getloadavg()[0],
    }


def warm(url: str, tasks: list[dict], image: tuple[str, bytes], clients: int) -> None:
    """One request per task, `clients` at a time, so every predictor is cached before a phase."""
    from concurrent.futures import ThreadPoolExecutor

    with httpx.Client() as client, ThreadPoolExecutor(clients) as pool:
        list(pool.map(lambda task: classify(client, url, task, image), tasks))


def miss_and_hit(url: str, task: dict, image: tuple[str, bytes]) -> tuple[float, float]:
    with httpx.Client() as client:
        miss = classify(client, url, task, image)
        hits = [classify(client, url, task, image) for _ in range(3)]
    return miss, statistics.median(hits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=30.0, help="per load phase")
    parser.add_argument("--tasks", default="1,10,100")
    parser.add_argument("--configs", default="auto:auto,pytorch:fp32,openvino:fp32",
                        help="runtime:precision pairs, each served by a fresh `upt serve`")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: raw figure in fp16 autocast there")
    args = parser.parse_args()
    task_counts = [int(n) for n in args.tasks.split(",")]
    images = [(p.name, p.read_bytes()) for p in sorted((FIXTURE / "test").rglob("*.png"))]

    with tempfile.TemporaryDirectory(prefix="upt-load-") as tmp:
        tmp = Path(tmp)
        backbone = write_checkpoint(args.model, tmp / "weights.safetensors", args.device)
        size = backbone.image.size
        batch = torch.randn(32, 3, size, size, device=args.device)
        on_cuda = args.device.startswith("cuda")

        def raw_pass():
            with torch.autocast("cuda", dtype=torch.float16, enabled=on_cuda):
                backbone.clip.encode_image(batch)
            if on_cuda:
                torch.cuda.synchronize()

        def yardstick(server_pid: int) -> float:
            """Raw throughput now, with the server idle; the server's CPU meanwhile is printed, to show
            that it was idle."""
            server_cpu = process_cpu_s(server_pid)
            start = time.perf_counter()
            raw_s = median_seconds(raw_pass, args.repeats)
            idle = (process_cpu_s(server_pid) - server_cpu) / (time.perf_counter() - start)
            print(f"raw PyTorch {'fp16' if on_cuda else 'fp32'} encode_image, batch 32: {32 / raw_s:.2f} images/s "
                  f"({1000 * raw_s:.0f} ms per batch; load average {os.getloadavg()[0]:.1f}, idle server "
                  f"{idle:.2f} cores)")
            sys.stdout.flush()
            return 32 / raw_s

        print(f"# {args.model} (random weights), {args.clients} clients, 1 image per request, {machine()}")
        yardsticks = []
        for config in args.configs.split(","):
            runtime, precision = config.split(":")
            print(f"\n## UPT_SERVE_RUNTIME={runtime} UPT_SERVE_PRECISION={precision}")
            data_dir = tmp / f"data-{runtime}-{precision}"
            pool = max(max(task_counts), len(METHODS))  # every method at least once: one task is a UPT one
            tasks = make_tasks(backbone, data_dir, pool + 2)
            env = {k: v for k, v in os.environ.items() if not k.startswith("UPT_")}
            env.update({"UPT_MODEL": args.model, "UPT_PRETRAINED": str(tmp / "weights.safetensors"),
                        "UPT_DEVICE": args.device, "UPT_DATA_DIR": str(data_dir), "UPT_PORT": str(free_port()),
                        "UPT_SERVE_RUNTIME": runtime, "UPT_SERVE_PRECISION": precision, "UPT_LOG_LEVEL": "warning"})
            if precision == "int8":  # calibrated on the fixture's real training images (not those sent)
                env["UPT_SERVE_CALIBRATION_DIR"] = str(FIXTURE / "train")
            server = Server(env, int(env["UPT_PORT"]), tmp / f"serve-{runtime}-{precision}.log")
            try:
                start = time.perf_counter()
                ready = server.wait_ready()
                serving = ready["checks"].get("image_encoder", {}).get("detail", "?")
                print(f"served by {serving} (ready after {time.perf_counter() - start:.0f} s)")
                warm(server.url, tasks[:len(METHODS)], images[0], 1)  # the process's first requests: imports etc.
                spare = tasks[pool:]  # never used under load: cold misses
                tuned = next(t for t in spare if "task_id" in t["data"])
                miss, hit = miss_and_hit(server.url, tuned, images[0])
                print(f"tuned-artifact miss ({tuned['method']}): {1000 * miss:.0f} ms vs hit {1000 * hit:.0f} ms "
                      f"(miss costs {1000 * (miss - hit):.0f} ms)")
                hundred = {"method": "zero-shot", "data": {"class_names": [f"object {i}" for i in range(100)]}}
                miss, hit = miss_and_hit(server.url, hundred, images[0])
                print(f"zero-shot miss, 100 classes: {1000 * miss:.0f} ms vs hit {1000 * hit:.0f} ms "
                      f"(miss costs {1000 * (miss - hit):.0f} ms)")
                before = yardstick(server.process.pid)
                for count in task_counts:
                    chosen = tasks[:count] if count > 1 else [t for t in tasks if t["method"] == "upt"][:1]
                    warm(server.url, chosen, images[0], args.clients)  # this phase measures serving, not misses
                    result = load(server.url, chosen, images, args.clients, args.seconds, server.process.pid)
                    after = yardstick(server.process.pid)  # also the next phase's "before"
                    raw = (before + after) / 2
                    yardsticks.append(raw)
                    methods = sorted({t["method"] for t in chosen})
                    print(f"{count:3d} task(s) [{', '.join(methods)}]: {result['images_per_s']:.2f} images/s "
                          f"= {result['images_per_s'] / raw:.2f}x raw batch-32 (mean of {before:.2f} before and "
                          f"{after:.2f} after), p50 {result['p50_ms']:.0f} ms, "
                          f"p99 {result['p99_ms']:.0f} ms, {result['passes_per_image']:.3f} encoder passes per "
                          f"image ({result['requests']} requests), encoder busy {100 * result['encoder_busy']:.1f} % "
                          f"at {result['encoder_images_per_s']:.2f} images/s; cores busy: server "
                          f"{result['server_cores']:.2f}, clients {result['clients_cores']:.2f} of {os.cpu_count()} "
                          f"(load average {result['load_average']:.1f})")
                    sys.stdout.flush()
                    before = after
            except Exception:
                print(f"--- the tail of the server's log ---\n{server.log.read_text()[-6000:]}")
                raise
            finally:
                server.stop()
        print(json.dumps({"raw_images_per_s_per_phase": yardsticks}))


if __name__ == "__main__":
    main()
