"""A worker on another box: its checkpoints and log go to the artifact service over HTTP.

With ``JUMPOUT_ARTIFACT_URL`` set, a worker shares nothing with the API's box but URLs (the
broker, the database, this service: `api.artifact_service`) and the workers' secret. The trainer
still writes each checkpoint to its own ``artifact_dir`` (the engine is unchanged) and then:

* `CheckpointUploader` (a thread of the trainer) sends it to the artifact service, which checks
  its sha256 on arrival; only then are the epochs it covers and the checkpoint recorded in the
  database, in one transaction as a local worker does, under the path where the API serves it.
  So a recorded checkpoint always has its file on the API's box. The queue is bounded
  (``artifact_upload_queue``): training goes on while a checkpoint uploads and waits only when
  that many are still unsent. A waiting checkpoint is a hard link, so the engine's pruning of its
  local file cannot take it away. After each upload the job's records are pruned by the engine's
  rule (the newest ``keep_last`` plus the best one), the record first and then the file, so the
  API's box keeps what a local worker would keep even for a job that several boxes trained.
* `fetch_checkpoint` (the trainer, before it starts) resumes a job another box trained: the
  newest recorded checkpoint, from this box's copy when its sha256 matches, else downloaded and
  checked against the sha256 the database recorded.
* `LogShipper` (a thread of the supervisor) appends the trainer's new output to the job's log on
  the API's box once a second, by byte offset (the service refuses a gap and a chunk that differs
  from what it holds, and ignores a repeat), read as the API reads a log (`jobstore.joblog.
  read_log`: a range the supervisor's cut dropped is skipped, never sent as zeros), and sends the
  rest before the supervisor records the job's end, so the API's log is whole when the job is
  final, unless the service does not answer within ``LOG_SEND_TIMEOUT_S`` (then the end is
  recorded anyway and the rest stays in the local log only).

Transient failures (the service restarting, a network partition) are retried for
``artifact_retry_s``; an upload that still fails then fails the attempt (a crash: retried from
the last uploaded checkpoint).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
from sqlalchemy import delete, select

from jobstore import db, joblog, jobs
from jobstore.artifact_store import CHECKPOINT_NAME
from jobstore.settings import get_settings
from jobstore.tables import Checkpoint

log = logging.getLogger(__name__)
# One line per request at INFO would fill the trainer's log (which its owner reads) with HTTP.
logging.getLogger("httpx").setLevel(logging.WARNING)

STAGING_DIR = ".uploading"  # in the job's local directory: hard links waiting to be sent
LOG_CHUNK = 1 << 20  # log bytes per request
LOG_SHIP_INTERVAL_S = 1.0
# Each log request's own limit: a hung service must not hold the job's end for the client's
# default 300 s (the supervisor writes no heartbeat while it waits; `LogShipper.close`).
LOG_REQUEST_TIMEOUT_S = 10.0
RETRY_STATUSES = frozenset({502, 503, 504, 507})
DOWNLOAD_CHUNK = 1 << 20


class ArtifactError(RuntimeError):
    """The artifact service refused a request, or could not be reached in time."""

    def __init__(self, message: str, *, status_code: int | None = None, body: dict | None = None):
        super().__init__(message)
        self.status_code = status_code
        self.body = body or {}


class DownloadMismatch(ArtifactError):
    """A downloaded checkpoint is not the one recorded (its sha256 differs)."""


def remote_artifacts() -> bool:
    """Whether this worker sends its artifacts to an artifact service."""
    return bool(get_settings().artifact_url)


class ArtifactClient:
    """The artifact service's routes, with the workers' secret; transient failures retried for
    ``retry_s`` seconds (default ``artifact_retry_s``), each request waiting at most
    ``timeout_s`` for the service. ``http``: a ready client (tests)."""

    def __init__(
        self,
        base_url: str | None = None,
        secret: str | None = None,
        *,
        http: httpx.Client | None = None,
        retry_s: float | None = None,
        timeout_s: float = 300.0,
    ) -> None:
        settings = get_settings()
        self.retry_s = settings.artifact_retry_s if retry_s is None else retry_s
        headers = {"Authorization": f"Bearer {secret or settings.worker_secret}"}
        self._owns_http = http is None  # a client given (tests) is closed by whoever gave it
        if http is None:
            http = httpx.Client(
                base_url=(base_url or settings.artifact_url).rstrip("/"),
                # Connecting is quick or the service is away; a large file takes its time.
                timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0)),
            )
        http.headers.update(headers)
        self.http = http

    def close(self) -> None:
        if self._owns_http:
            self.http.close()

    def _request(self, method: str, url: str, *, body: Callable[[], object] | None = None, **kw):
        """One request, retried on a transport error or a 5xx that may pass; raises
        `ArtifactError` for any other refusal. ``body()`` gives a fresh body for each try."""
        deadline = time.monotonic() + self.retry_s
        pause = 0.5
        while True:
            try:
                opened = body() if body is not None else None
                try:
                    response = self.http.request(
                        method, url, **({"content": opened} if opened is not None else {}), **kw
                    )
                finally:
                    if hasattr(opened, "close"):
                        opened.close()
                if response.status_code < 400:
                    return response
                error = _refusal(method, url, response)
                if response.status_code not in RETRY_STATUSES:
                    raise error
            except httpx.TransportError as transport:
                error = ArtifactError(f"{method} {url}: the artifact service did not answer "
                                      f"({type(transport).__name__}: {transport})")  # fmt: skip
            if time.monotonic() + pause > deadline:
                raise error
            log.warning("%s; trying again in %.1f s", error, pause)
            time.sleep(pause)
            pause = min(pause * 2, 10.0)

    def ping(self) -> None:
        self._request("GET", "/v1/internal/ping")

    def upload_checkpoint(self, job_id: str, path: Path, *, name: str, sha256: str) -> dict:
        """Send the file at ``path`` as the job's checkpoint ``name``; the service checks it
        against ``sha256``. Returns ``{"path", "size_bytes", "sha256"}`` as stored there."""
        size = path.stat().st_size
        response = self._request(
            "PUT",
            f"/v1/internal/jobs/{job_id}/checkpoints/{name}",
            body=lambda: open(path, "rb"),  # noqa: SIM115 - closed by _request
            headers={"X-Checksum-SHA256": sha256, "Content-Length": str(size),
                     "Content-Type": "application/octet-stream"},
        )  # fmt: skip
        return response.json()

    def download_checkpoint(self, job_id: str, name: str, destination: Path, *, sha256: str):
        """Fetch the job's checkpoint ``name`` into ``destination`` (written under a temporary
        name, renamed once its sha256 is the recorded one). Raises `ArtifactError`."""
        destination.parent.mkdir(parents=True, exist_ok=True)
        # Unique per download: two trainers of this box fetching one checkpoint (a resume and a
        # job started from it) must not write into each other's file.
        part = destination.with_name(f".{name}.{uuid.uuid4().hex}.download")
        deadline = time.monotonic() + self.retry_s
        try:
            while True:
                try:
                    digest = _stream_to(
                        self.http, f"/v1/internal/jobs/{job_id}/checkpoints/{name}", part
                    )
                    break
                except httpx.TransportError as transport:
                    if time.monotonic() > deadline:
                        raise ArtifactError(
                            f"could not download {name}: {transport}"
                        ) from transport
                    time.sleep(1.0)
            if digest != sha256:
                raise DownloadMismatch(f"{name}: downloaded sha256 {digest}, recorded {sha256}")
            os.replace(part, destination)
        finally:
            part.unlink(missing_ok=True)  # after a failure (once renamed, nothing is there)
        return destination

    def delete_checkpoint(self, job_id: str, name: str) -> None:
        self._request("DELETE", f"/v1/internal/jobs/{job_id}/checkpoints/{name}")

    def log_size(self, job_id: str) -> int:
        return int(self._request("GET", f"/v1/internal/jobs/{job_id}/log").json()["size"])

    def append_log(self, job_id: str, offset: int, data: bytes) -> int:
        """Append ``data`` at ``offset`` of the job's log there; returns the log's size."""
        response = self._request(
            "POST",
            f"/v1/internal/jobs/{job_id}/log",
            params={"offset": offset},
            body=lambda: data,
            headers={"Content-Type": "application/octet-stream"},
        )
        return int(response.json()["size"])


def _refusal(method: str, url: str, response: httpx.Response) -> ArtifactError:
    try:
        body = response.json()
        message = body["error"]["message"]
    except (ValueError, KeyError, TypeError):
        body, message = None, response.text[:200]
    return ArtifactError(
        f"{method} {url}: {response.status_code} {message}",
        status_code=response.status_code,
        body=body,
    )


def _stream_to(http: httpx.Client, url: str, part: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with http.stream("GET", url) as response:
        if response.status_code >= 400:
            response.read()
            raise _refusal("GET", url, response)
        with open(part, "wb") as handle:
            for chunk in response.iter_bytes(DOWNLOAD_CHUNK):
                digest.update(chunk)
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
    return digest.hexdigest()


# --- resuming a job on this box -----------------------------------------------------------------


def _recorded_newest_first(session, job_id: str) -> list[tuple[str, str, int, int]]:
    rows = session.execute(
        select(Checkpoint.path, Checkpoint.sha256, Checkpoint.size_bytes, Checkpoint.epoch)
        .where(Checkpoint.job_id == job_id)
        .order_by(Checkpoint.epoch.desc(), Checkpoint.created_at.desc(), Checkpoint.id.desc())
    ).all()
    session.commit()
    return [tuple(row) for row in rows]


def newest_intact_checkpoint(session, job_id: str) -> Checkpoint | None:
    """The checkpoint a retry of the job would resume from, for a disk-full reason: on the API's
    box `jobs.newest_valid_checkpoint` (the file checked); on a remote worker the newest recorded
    one, unchecked, as its path is the API box's (not here) and it was recorded only after the
    artifact service had checked its sha256."""
    if not remote_artifacts():
        return jobs.newest_valid_checkpoint(session, job_id)
    row = session.scalars(
        select(Checkpoint)
        .where(Checkpoint.job_id == job_id)
        .order_by(Checkpoint.epoch.desc(), Checkpoint.created_at.desc(), Checkpoint.id.desc())
        .limit(1)
    ).first()
    session.commit()
    return row


def fetch_checkpoint(job_id: str, client: ArtifactClient, *, into: Path) -> Path | None:
    """The newest recorded checkpoint of ``job_id`` as a file in ``into``: this box's copy if its
    sha256 is the recorded one, else downloaded from the artifact service (and checked). A
    checkpoint the service no longer has (or that does not match) is skipped for the next older,
    as `jobs.newest_valid_checkpoint` does; None when no checkpoint is left."""
    for recorded_path, sha256, size_bytes, epoch in db.call(_recorded_newest_first, job_id):
        name = Path(recorded_path).name
        if not CHECKPOINT_NAME.fullmatch(name):
            continue
        local = into / name
        if (
            local.is_file()
            and local.stat().st_size == size_bytes
            and jobs.file_sha256(local) == sha256
        ):
            log.info("job %s: resuming from this box's copy of %s", job_id, name)
            return local
        try:
            client.download_checkpoint(job_id, name, local, sha256=sha256)
        except ArtifactError as error:
            if not isinstance(error, DownloadMismatch) and error.status_code != 404:
                raise  # the service is away or refuses us: a crash, retried later
            log.warning("job %s: skipping checkpoint of epoch %d: %s", job_id, epoch, error)
            continue
        log.info("job %s: downloaded %s from the artifact service", job_id, name)
        return local
    return None


# --- uploading checkpoints from the trainer -------------------------------------------------------


class UploadFailed(RuntimeError):
    """A checkpoint could not be sent (or recorded) in ``artifact_retry_s``: the attempt ends as a
    crash and the next one resumes from the last checkpoint that was."""


def prune_records(
    session, job_id: str, *, keep_last: int, keep_best: bool, attempt: int | None = None
) -> list[str]:
    """Forget the job's checkpoint records that the engine's rule no longer keeps (the newest
    ``keep_last`` by name, plus the best one with ``keep_best``); returns their file names, whose
    files are then deleted. With ``attempt``, only while the job still runs as that attempt
    (`jobs.hold_attempt`)."""
    if attempt is not None:
        jobs.hold_attempt(session, job_id, attempt=attempt)
    rows = session.execute(
        select(Checkpoint.id, Checkpoint.path, Checkpoint.is_best).where(
            Checkpoint.job_id == job_id
        )
    ).all()
    named = []
    for row in rows:
        match = CHECKPOINT_NAME.fullmatch(Path(row.path).name)
        if match:
            named.append(((int(match.group(1)), int(match.group(2) or 0)), row))
    named.sort(key=lambda item: item[0])
    kept = {row.id for _, row in named[-keep_last:]}
    if keep_best:
        kept |= {row.id for _, row in named if row.is_best}
    dropped = [row for _, row in named if row.id not in kept]
    if dropped:
        session.execute(delete(Checkpoint).where(Checkpoint.id.in_([row.id for row in dropped])))
    session.commit()
    return [Path(row.path).name for row in dropped]


Record = Callable[[list[dict], dict | None], None]
"""``record(epochs, checkpoint)``: the trainer's write of epochs and the checkpoint covering them
(``checkpoint`` None: epochs only), in one transaction."""


class CheckpointUploader:
    """The trainer's uploads, in order, on a thread of their own (see the module's docstring)."""

    _STOP = object()

    def __init__(
        self,
        job_id: str,
        client: ArtifactClient,
        record: Record,
        *,
        keep_last: int,
        keep_best: bool,
        attempt: int | None = None,
        queue_size: int | None = None,
    ) -> None:
        self.job_id = job_id
        self.attempt = attempt
        self.client = client
        self.record = record
        self.keep_last = keep_last
        self.keep_best = keep_best
        size = get_settings().artifact_upload_queue if queue_size is None else queue_size
        self._queue: queue.Queue = queue.Queue(maxsize=size)
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="checkpoint-uploader", daemon=True)
        self._thread.start()

    def _check(self) -> None:
        if isinstance(self._failure, jobs.AttemptSuperseded):
            raise self._failure  # not a failed upload: the job is another attempt's now
        if self._failure is not None:
            raise UploadFailed(
                f"checkpoint upload to the artifact service failed: {self._failure}"
            ) from self._failure

    def checkpoint(self, path: str, *, epoch: int, sha256: str, size_bytes: int,
                   is_best: bool, epochs: list[dict]) -> None:  # fmt: skip
        """Queue the checkpoint just written at ``path`` with the epochs it covers (waits while
        ``artifact_upload_queue`` are unsent)."""
        self._check()
        source = Path(path)
        staging = source.parent / STAGING_DIR
        staging.mkdir(exist_ok=True)
        staged = staging / f"{source.name}.{time.monotonic_ns()}"
        try:
            os.link(source, staged)  # the engine may prune `source` before it is sent
        except OSError:
            import shutil

            shutil.copyfile(source, staged)
        item = dict(staged=staged, name=source.name, epoch=epoch, sha256=sha256,
                    size_bytes=size_bytes, is_best=is_best, epochs=list(epochs))  # fmt: skip
        self._queue.put(item)

    def epochs(self, epochs: list[dict]) -> None:
        """Queue epochs to record without a checkpoint (in order after the uploads before)."""
        self._check()
        if epochs:
            self._queue.put({"epochs": list(epochs)})

    def abandon(self) -> None:
        """Send nothing more: the job went to another attempt. What is queued is discarded; an
        upload under way ends by itself, and its record is refused (`jobs.hold_attempt`)."""
        if self._failure is None:
            self._failure = jobs.AttemptSuperseded(f"job {self.job_id}: uploads abandoned")
        with contextlib.suppress(queue.Full):  # a full queue is drained (discarded) anyway
            self._queue.put_nowait(self._STOP)

    def close(self, timeout: float | None = None) -> None:
        """Send everything queued, stop the thread; raises `UploadFailed` if something could
        not be sent."""
        self._queue.put(self._STOP)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise UploadFailed(f"checkpoint uploads still running after {timeout} s")
        self.client.close()
        self._check()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is self._STOP:
                return
            if self._failure is not None:
                _discard(item)  # after a failure nothing more is recorded: the attempt ends
                continue
            try:
                self._handle(item)
            except BaseException as error:  # noqa: BLE001 - reported by _check, in the trainer
                log.error("job %s: %s", self.job_id, error)
                self._failure = error
                _discard(item)

    def _handle(self, item: dict) -> None:
        if "staged" not in item:
            self.record(item["epochs"], None)
            return
        if self.attempt is not None:  # the upload may replace a file the new attempt recorded
            db.call(jobs.hold_attempt, self.job_id, attempt=self.attempt, lock=False)
        stored = self.client.upload_checkpoint(
            self.job_id, item["staged"], name=item["name"], sha256=item["sha256"]
        )
        checkpoint = dict(path=stored["path"], epoch=item["epoch"], sha256=stored["sha256"],
                          size_bytes=stored["size_bytes"], is_best=item["is_best"])  # fmt: skip
        self.record(item["epochs"], checkpoint)
        _discard(item)
        pruned = db.call(
            prune_records,
            self.job_id,
            keep_last=self.keep_last,
            keep_best=self.keep_best,
            attempt=self.attempt,
        )
        for name in pruned:
            try:
                self.client.delete_checkpoint(self.job_id, name)
            except ArtifactError as error:  # a leftover file costs space, not correctness
                log.warning("job %s: could not delete %s there: %s", self.job_id, name, error)


def _discard(item: object) -> None:
    if isinstance(item, dict) and "staged" in item:
        with contextlib.suppress(OSError):
            item["staged"].unlink()


def clear_staging(job_directory: Path) -> None:
    """Remove hard links an earlier attempt left unsent (it was killed)."""
    staging = job_directory / STAGING_DIR
    if staging.is_dir():
        for leftover in staging.iterdir():
            with contextlib.suppress(OSError):
                leftover.unlink()


# --- the log, from the supervisor -----------------------------------------------------------------


class LogShipper:
    """Appends what the trainer writes to ``local_path`` from ``local_offset`` on to the job's log
    on the API's box, once a second on a thread; ``close`` sends the rest."""

    def __init__(
        self,
        job_id: str,
        local_path: Path,
        local_offset: int,
        client: ArtifactClient,
        *,
        interval: float = LOG_SHIP_INTERVAL_S,
    ) -> None:
        self.job_id = job_id
        self.local_path = local_path
        self.local_offset = local_offset
        self.remote_offset: int | None = None  # asked of the service before the first append
        self.client = client
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="log-shipper", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.ship()
            except (ArtifactError, OSError) as error:
                log.warning("job %s: log not sent yet: %s", self.job_id, error)

    def ship(self) -> bool:
        """Send what is new (at most `LOG_CHUNK` bytes); True when it was all sent."""
        if self.remote_offset is None:
            self.remote_offset = self.client.log_size(self.job_id)
        # As the API reads a log: the supervisor's cut (`joblog.cut_log`) punched zeros into a
        # range a slow shipper may not have sent yet; it is skipped, its marker line sent.
        chunk = joblog.read_log(self.local_path, self.local_offset, LOG_CHUNK)
        if not chunk.data:
            self.local_offset = max(self.local_offset, chunk.next_offset)
            return chunk.next_offset >= chunk.size
        try:
            size = self.client.append_log(self.job_id, self.remote_offset, chunk.data)
        except ArtifactError as error:
            if error.status_code == 409:
                # The log there is not what we thought (shorter: a gap; or another attempt
                # wrote there: a conflict): resend at its end.
                self.remote_offset = None
            raise
        self.local_offset = chunk.next_offset
        self.remote_offset = size
        return chunk.next_offset >= chunk.size

    def close(self, timeout: float) -> None:
        """Stop the thread and send the rest, trying for at most ``timeout`` seconds plus one
        request's limit (a log is not worth holding the job's end longer, and the supervisor
        writes no heartbeat meanwhile: what could not be sent stays in the local log)."""
        deadline = time.monotonic() + timeout
        self._stop.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            # Still in a request to a service that does not answer; two shippers at once would
            # race on the offsets. Its client is left open: the thread ends after the request's
            # own limit, and closing the client under it would only raise there.
            log.warning("job %s: the end of its log was not sent: the artifact service did not "
                        "answer in %.0f s", self.job_id, timeout)  # fmt: skip
            return
        try:
            while True:
                try:
                    if self.ship():
                        return
                    error = None
                except (ArtifactError, OSError) as failure:
                    error = failure
                if time.monotonic() > deadline:
                    log.warning("job %s: the end of its log was not sent in %.0f s: %s",
                                self.job_id, timeout, error or "still sending")  # fmt: skip
                    return
                if error is not None:
                    time.sleep(0.5)
        finally:
            self.client.close()
