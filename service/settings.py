"""Service settings: every knob comes from `UPT_*` environment variables or a `.env` file.

One `Settings` class serves the API, the worker and the CLI so that embedded and production mode
differ only in URLs. Each process builds its settings once, when it starts, and passes them on
(`create_app(settings)`, the worker process at its start, each CLI command): nothing reads the
environment again later. Derived values (database and broker URLs in local mode) are properties, so the
defaults stay visible in one place and the README table can quote them.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="UPT_", env_file=".env", extra="ignore")

    # Backbone (frozen CLIP). A pretrained tag of open_clip or a local checkpoint file.
    model: str = "ViT-B-16"
    pretrained: str = "openai"
    device: str | None = None

    # Where things live. Empty URLs mean "local mode": SQLite and a filesystem broker in data_dir.
    data_dir: Path = Path("var")
    database_url: str = ""
    broker_url: str = ""
    queue: str = "upt"
    # Pooled database connections per process (PostgreSQL's max_connections must cover every process),
    # and how long a request waits for a free one before a 503 says the database is busy.
    database_max_connections: int = Field(15, ge=1)
    database_pool_timeout_s: float = Field(30.0, gt=0)

    # HTTP
    host: str = "127.0.0.1"
    port: int = 8000
    # None: keys are required unless the API is bound to a loopback address only.
    require_api_keys: bool | None = None
    # None: run `alembic upgrade head` at start-up for SQLite (local mode) only.
    auto_migrate: bool | None = None
    preload_backbone: bool = True
    # GET /metrics counts the whole fleet's tasks: None (auto) serves it to anyone only where the API is
    # bound to a loopback address (a scraper beside it), else to a request with a valid API key.
    metrics_public: bool | None = None
    # Web pages on these origins may call the API from a browser (comma-separated, e.g.
    # `https://labels.example.com,http://localhost:5173`). Empty: same-origin pages only.
    cors_origins: Annotated[list[str], NoDecode] = []
    # Lifetime of a token made by POST /tasks/{id}/events/token; only the connection must start in time.
    stream_token_ttl_s: float = Field(60.0, gt=0)
    # Event streams one tenant may hold open on one API process (0: no limit): each polls the database.
    tenant_max_streams: int = Field(20, ge=0)

    # Upload limits, enforced while the request body streams in.
    max_files: int = Field(2000, ge=1)
    max_file_bytes: int = Field(10 * 1024 * 1024, ge=1)
    max_upload_bytes: int = Field(512 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(40_000_000, ge=1)
    max_request_pixels: int = Field(400_000_000, ge=1)
    # Preprocessing scales an image's short side to the model's input (224-448 pixels): a 1000000x1 PNG
    # of 1 KB would become tens of gigapixels. Wider (or taller) than this ratio is refused from the header.
    max_image_aspect: float = Field(20.0, ge=1)
    max_classes: int = Field(1000, ge=2)
    max_classify_files: int = Field(64, ge=1)
    max_epochs: int = Field(500, ge=1)
    # Slow or stalled clients: the whole body, the longest pause in it (408 past either), header bytes.
    body_timeout_s: float = Field(900.0, gt=0)
    body_idle_timeout_s: float = Field(30.0, gt=0)
    max_header_bytes: int = Field(16384, ge=1024)
    # The longest a client may take to send a request's headers (slowloris: 408, connection closed).
    header_timeout_s: float = Field(10.0, gt=0)
    # A POST /tasks under an Idempotency-Key holds the key while its body arrives and is decoded; a hold
    # older than this was left by a killed process and is taken over. It must outlast the longest body
    # (UPT_BODY_TIMEOUT_S), or a slow but live upload would lose its key to a retry.
    idempotency_lock_stale_s: float = Field(1200.0, gt=0)
    # Per tenant (0: no limit): tasks queued or running (429 past it), bytes its tasks keep (507 past it).
    tenant_max_active_tasks: int = Field(100, ge=0)
    tenant_max_stored_bytes: int = Field(50 * 1024**3, ge=0)

    # Serving
    # Bytes of classifiers and visual prompts kept per cache (tuned, zero-shot) in each API process:
    # a tuned 10-class task on ViT-B-16 holds 20-170 KB, a zero-shot 1,000-class one 2 MB.
    predictor_cache_bytes: int = Field(512 * 1024 * 1024, ge=1)
    # The image encoder that serves /classify (training always runs in PyTorch). auto: OpenVINO on a
    # CPU where installed (bf16 where the CPU computes bf16 natively, with AMX or AVX-512 BF16, else
    # fp32), PyTorch fp16 on CUDA, else PyTorch fp32.
    serve_runtime: Literal["auto", "openvino", "pytorch"] = "auto"
    serve_precision: Literal["auto", "fp32", "bf16", "fp16", "int8"] = "auto"
    # int8 only (opt-in, OpenVINO with NNCF): real images of the kind served, to calibrate on.
    serve_calibration_dir: Path | None = None
    batch_window_ms: float = Field(5.0, ge=0)
    max_batch: int = Field(64, ge=1)
    max_top_k: int = Field(100, ge=1)
    # The training-free stage built by the API right after a task's uploads are stored: its method (GDA,
    # or Tip-Adapter's cache), and the augmented views of each training image it is fitted on (the
    # papers' 10; fewer is faster on a CPU).
    instant_method: Literal["gda", "tip-adapter"] = "gda"
    instant_augment_views: int = Field(10, ge=1, le=100)
    # A stage still `building` (or never started) this long after its task was created was left by an
    # API process that died; the sweeper builds it again.
    instant_resume_after_s: float = Field(600.0, gt=0)

    # Dependability: heartbeats, re-enqueueing of lost messages, bounded retries.
    heartbeat_interval_s: float = Field(5.0, gt=0)
    heartbeat_timeout_s: float = Field(60.0, gt=0)
    requeue_after_s: float = Field(120.0, gt=0)
    sweep_interval_s: float = Field(10.0, gt=0)
    max_attempts: int = Field(3, ge=1)
    # Upload scratch and row-less task folders untouched this long were left by killed requests.
    orphan_grace_s: float = Field(3600.0, gt=0)
    task_time_limit_s: int = Field(6 * 3600, ge=10)
    worker_concurrency: int = Field(1, ge=1)
    # A training that finds the storage volume full is retried after this, doubled each try (bounded).
    disk_full_retry_s: float = Field(60.0, gt=0)
    disk_full_retry_max_s: float = Field(900.0, gt=0)

    log_level: str = "info"

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            value = [origin.strip().rstrip("/") for origin in value.split(",") if origin.strip()]
        for origin in value if isinstance(value, list) else []:
            # A browser's Origin header is exactly scheme://host[:port]; anything else would never match.
            parts = urlsplit(origin)
            if origin != "*" and (parts.scheme not in ("http", "https") or not parts.netloc or parts.path
                                  or parts.query or parts.fragment):
                raise ValueError(f"UPT_CORS_ORIGINS: {origin!r} is not an origin such as https://labels.example.com")
        return value

    @model_validator(mode="after")
    def _lock_outlasts_body(self) -> "Settings":
        if self.idempotency_lock_stale_s <= self.body_timeout_s:
            raise ValueError(f"UPT_IDEMPOTENCY_LOCK_STALE_S ({self.idempotency_lock_stale_s:g}) must be longer than "
                             f"UPT_BODY_TIMEOUT_S ({self.body_timeout_s:g}): a live upload would lose its key")
        return self

    @property
    def storage_dir(self) -> Path:
        return self.data_dir / "storage"

    @property
    def compiled_dir(self) -> Path:
        return self.data_dir / "compiled"

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'upt.sqlite').resolve()}"

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def broker_folder(self) -> Path:
        return (self.data_dir / "broker").resolve()

    @property
    def is_sqlite(self) -> bool:
        return self.resolved_database_url.startswith("sqlite")

    @property
    def visibility_timeout_s(self) -> int:
        # Redis redelivers an unacked message after this; it must outlast the longest task, or a
        # healthy long training would be handed to a second worker.
        return self.task_time_limit_s + 3600

    @property
    def binds_loopback_only(self) -> bool:
        if self.host in LOOPBACK_NAMES:
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @property
    def api_keys_required(self) -> bool:
        if self.require_api_keys is None:
            return not self.binds_loopback_only
        return self.require_api_keys

    @property
    def metrics_open(self) -> bool:
        return self.binds_loopback_only if self.metrics_public is None else self.metrics_public

    @property
    def should_auto_migrate(self) -> bool:
        return self.is_sqlite if self.auto_migrate is None else self.auto_migrate

    def check(self) -> None:
        """Refuse configurations that would be unsafe, with a message that says what to change."""
        if not self.api_keys_required and not self.binds_loopback_only:
            raise ValueError(
                f"UPT_REQUIRE_API_KEYS=false is only allowed when UPT_HOST is a loopback address "
                f"(it is {self.host!r}); create keys with `upt keys create --tenant NAME` instead."
            )
