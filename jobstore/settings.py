"""The one settings object of the service, read from `JUMPOUT_*` environment variables.

Paths default to places under `home` (`./var`), so an unconfigured checkout keeps everything in one
directory; the SQLite database and the embedded Redis are the defaults, PostgreSQL and a real Redis
are one variable away (`JUMPOUT_DATABASE_URL`, `JUMPOUT_BROKER_URL`).
"""

from __future__ import annotations

import socket
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from jumpout.spec import FIELDS, Device


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="JUMPOUT_", extra="ignore")

    home: Path = Path("./var")
    database_url: str = ""  # default: sqlite:///{home}/jumpout.db
    broker_url: str = ""  # default: the embedded Redis, redis://127.0.0.1:{redis_port}/0
    redis_port: int = Field(6390, ge=1, le=65535)
    artifact_dir: Path | None = None  # default: {home}/artifacts
    data_dir: Path | None = None  # default: {home}/data

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    # False for the embedded, loopback-only default; the compose deployment sets it True.
    auth_required: bool = False

    heartbeat_interval: float = Field(5.0, gt=0)
    heartbeat_timeout: float = Field(60.0, gt=0)
    max_attempts: int = Field(3, ge=1)
    reaper_interval: float = Field(10.0, gt=0)
    # How long a queued job may wait before the reaper counts it when topping up the dispatch
    # messages (the API publishes right after its commit; shorter for tests, or for faster
    # recovery after a Redis restart). A job the reaper itself requeues counts at once.
    reconcile_after: float = Field(60.0, gt=0)
    # At most this many dispatch messages wait in the broker (`jobstore.queue`): each wakes one
    # free worker to claim the next job in the fair order; a worker that claims tops it up.
    dispatch_depth: int = Field(2, ge=1, le=1000)
    cancel_grace: float = Field(30.0, ge=0)
    # Redis redelivers unacknowledged messages after this; it must exceed the longest job.
    visibility_timeout: float = Field(7 * 24 * 3600.0, gt=0)

    # This server's limits may be below the spec's (jumpout.spec), never above.
    max_epochs: int = Field(FIELDS["epochs"].high, ge=1, le=FIELDS["epochs"].high)
    max_batch_size: int = Field(FIELDS["batch_size"].high, ge=1, le=FIELDS["batch_size"].high)
    # The most devices one data-parallel job may ask for (`devices`): set it to the device slots
    # of this deployment's largest worker box, so a job no box can run is refused (422) at once.
    max_devices: int = Field(FIELDS["devices"].high, ge=1, le=FIELDS["devices"].high)
    max_queued_per_token: int = Field(100, ge=1)
    # The most jobs (rows x seeds) one experiment may hold; its jobs do not count against
    # max_queued_per_token.
    max_experiment_jobs: int = Field(500, ge=1)
    max_request_bytes: int = Field(64 * 1024, ge=1024)
    # Seconds an `Idempotency-Key` of a creating POST is remembered (`jobstore.idempotency`): a
    # retry within this replays the stored answer; after it the key is forgotten and creates anew.
    idempotency_retention: float = Field(24 * 3600.0, gt=0)
    # Who may read a job or experiment (`api.access`): "team" (any token reads every job; the
    # default, for one team's box) or "owner" (a non-admin token reads only its own; anything
    # else is answered 404, as if it did not exist).
    read_scope: Literal["team", "owner"] = "team"

    device: Device = Device.AUTO
    # A worker box's device slots (`worker.devices`): 0 = one per visible GPU (one on the CPU); N
    # on a GPU box = the first N visible GPUs; N on the CPU = N simulated slots. The Celery worker
    # runs one pool process per slot, and a job holds `devices` slots while it trains.
    device_slots: int = Field(0, ge=0, le=64)
    # A job needing several slots that has been queued this long reserves the box: no smaller job
    # starts on it until the big one fits (`jobstore.devicefit`); before that, smaller jobs may
    # fill the free slots. Seconds.
    device_reserve_after: float = Field(600.0, ge=0)
    # The trainer's PostgreSQL connections (its cancel poll, metrics, checkpoints) give up on a
    # connect or an unanswered network after this many seconds (a partition must not freeze
    # training), and its cancel poll's statement after this too (`jobstore.db`).
    db_connect_timeout: float = Field(10.0, gt=0)
    # Fork each trainer from a process that has imported torch once (`worker.template`) instead
    # of starting `python -m worker.trainer` (seconds of imports per job); False: always spawn.
    trainer_template: bool = True
    # Seconds between a job's checkpoints (and its epoch metrics' writes) when epochs are shorter;
    # the last epoch and a stop are always checkpointed. 0: every epoch. A crash repeats at most
    # this much training; a checkpoint per sub-second epoch would cost as much as the epoch.
    checkpoint_interval: float = Field(2.0, ge=0)
    # The job's event stream (`GET /v1/jobs/{id}/events`): a `: ping` comment this often keeps
    # proxies from closing an idle stream; and the API re-reads a watched job from the database
    # this often even without a pub/sub notification (one lost in a Redis restart is late by at
    # most this much, never missing).
    events_heartbeat_s: float = Field(15.0, gt=0)
    events_recheck_s: float = Field(5.0, gt=0)
    # The longest an event stream or a followed log stays open (0: until the job ends); the
    # client then reconnects with Last-Event-ID or its offset. Tests set it, since a TestClient
    # reads a streaming response to its end.
    stream_max_s: float = Field(0.0, ge=0)
    # The trainer's output on disk (`<artifact_dir>/jobs/<id>/trainer.log`) is cut to about this
    # size: the head and the newest output are kept, the middle dropped (`jobstore.joblog`).
    log_max_bytes: int = Field(4 * 1024 * 1024, ge=64 * 1024)
    # DataLoader processes per training job; unset: the engine's choice (0 on the CPU, min(8,
    # CPUs) when a GPU reads from the loader, e.g. ImageNet's JPEGs).
    num_workers: int | None = Field(None, ge=0, le=FIELDS["num_workers"].high)
    worker_name: str = Field(default_factory=socket.gethostname)

    # Workers on other boxes (`worker.artifacts`, `api.artifact_service`). Set on such a worker,
    # `artifact_url` is the artifact service of the box that runs the API (e.g.
    # http://gpu-main:8001): its checkpoints and log are sent there instead of being left in its
    # own artifact_dir, and a resumed job fetches its checkpoint from there. Empty (the default):
    # the artifact directory is the API's own (one box, or a shared volume), as before.
    artifact_url: str = ""
    # The secret that workers present to the artifact service (`Authorization: Bearer ...`); set
    # the same value on that service and on every remote worker. Never a user's API token.
    worker_secret: str = Field("", repr=False)
    # The largest checkpoint the artifact service accepts (WRN-28-10 with its optimiser: ~0.3 GB).
    max_artifact_bytes: int = Field(16 * 1024**3, ge=1024)
    # Checkpoints waiting to be uploaded before training waits for the uploader (each waiting
    # one is a hard link: no copy, but its disk space is held until it is sent).
    artifact_upload_queue: int = Field(2, ge=1, le=100)
    # How long an upload or a log chunk is retried (the artifact service restarting, a network
    # partition) before the attempt fails and is retried from the last uploaded checkpoint.
    artifact_retry_s: float = Field(300.0, ge=0)

    # Sync routes run in Starlette's thread pool (40 threads); pool_size + max_overflow must
    # exceed it or requests can deadlock waiting for a connection (fastapi #3205).
    db_pool_size: int = Field(10, ge=1)
    db_max_overflow: int = Field(40, ge=0)
    # How long /v1/health waits for Celery workers to answer a ping.
    health_ping_timeout: float = Field(0.5, gt=0)
    # /v1/health says "degraded" when a filesystem the service writes to (home, artifacts, the
    # SQLite database) has less free space than this (`jobstore.storage`): checkpoints and
    # submissions start failing once it is full.
    min_free_bytes: int = Field(1024**3, ge=0)
    # `make run` (launcher): False keeps the children's output (Celery's banner, Redis' and
    # uvicorn's logs) in files under {home}/logs and the terminal to a few lines; True (or
    # `make run VERBOSE=1`) shows all of it in the terminal as well as it used to.
    verbose: bool = False

    @model_validator(mode="after")
    def _fill_defaults(self) -> Settings:
        if not self.database_url:
            self.database_url = f"sqlite:///{self.home / 'jumpout.db'}"
        if not self.broker_url:
            self.broker_url = f"redis://127.0.0.1:{self.redis_port}/0"
        if self.artifact_dir is None:
            self.artifact_dir = self.home / "artifacts"
        if self.data_dir is None:
            self.data_dir = self.home / "data"
        if self.worker_secret and (
            len(self.worker_secret) < 16 or self.worker_secret.startswith("jo_")
        ):
            # Short secrets can be guessed; "jo_" is how user API tokens start (`api.auth`).
            raise ValueError("JUMPOUT_WORKER_SECRET: at least 16 characters, not starting with jo_")
        return self


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings; tests call `get_settings.cache_clear()` after changing env."""
    return Settings()
