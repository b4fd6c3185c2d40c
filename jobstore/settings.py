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
    # DataLoader processes per training job.
    num_workers: int = Field(0, ge=0, le=FIELDS["num_workers"].high)
    worker_name: str = Field(default_factory=socket.gethostname)

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
        return self


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings; tests call `get_settings.cache_clear()` after changing env."""
    return Settings()
