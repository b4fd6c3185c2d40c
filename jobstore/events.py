"""Notifications that a job changed, on Redis pub/sub, for the API's event streams.

The database stays the source of truth: a writer (the trainer after storing epochs, the
supervisor after a claim or the job's end, the reaper after a requeue, the API after a cancel of
a job or of an experiment) commits first and then publishes a small message on
``jumpout:job:<id>``; the API
(`api.events`) reads what is new from the database when it hears one, and re-reads on its own
every ``events_recheck_s``, so a lost message only delays an event. Progress within an epoch is
not stored: its message carries the payload.

Messages (JSON): ``{"kind": "changed"}`` or ``{"kind": "progress", "progress": {"epoch",
"step", "steps", "loss", "fraction", "eta_seconds"}}``.

Publishing is best effort and never raises: the broker's Redis with a 1 s socket timeout
(`jobstore.queue`), and after a failure nothing is tried for ``BACKOFF_S``, so a dead Redis
costs a training loop one timeout, not one per step. No Redis broker: nothing is published.
"""

from __future__ import annotations

import json
import logging
import math
import time

from jobstore import queue
from jobstore.settings import get_settings

log = logging.getLogger(__name__)

CHANNEL_PREFIX = "jumpout:job:"
CHANNEL_PATTERN = CHANNEL_PREFIX + "*"
CHANGED = "changed"
PROGRESS = "progress"
BACKOFF_S = 10.0
# At most this often a trainer publishes its progress (a watcher sees about two updates a
# second; a fast loop's thousands of steps cost nothing).
PROGRESS_INTERVAL_S = 0.5

_quiet_until = 0.0


def channel(job_id: str) -> str:
    return CHANNEL_PREFIX + job_id


def _publish(job_id: str, message: dict) -> bool:
    global _quiet_until
    now = time.monotonic()
    if now < _quiet_until:
        return False
    address = queue.redis_address(get_settings().broker_url)
    if address is None:
        return False
    try:
        queue._redis_client(address).publish(channel(job_id), json.dumps(message))
        return True
    except Exception as error:  # noqa: BLE001 - best effort: the API re-reads the database
        _quiet_until = now + BACKOFF_S
        log.warning("could not publish an event for job %s: %s", job_id, error)
        return False


def publish_changed(*job_ids: str) -> None:
    """The jobs' rows or metrics changed (call after the commit)."""
    for job_id in job_ids:
        _publish(job_id, {"kind": CHANGED})


def publish_progress(job_id: str, progress: dict) -> None:
    _publish(job_id, {"kind": PROGRESS, "progress": progress})


class ProgressReporter:
    """Turns the engine's ``on_step`` calls into throttled progress messages: the fraction of
    the whole job done and an ETA from this attempt's pace so far."""

    def __init__(
        self, job_id: str, *, epochs: int, interval_s: float = PROGRESS_INTERVAL_S, clock=None
    ) -> None:
        self.job_id = job_id
        self.epochs = max(1, epochs)
        self.interval_s = interval_s
        self.clock = clock or time.monotonic
        self._started: tuple[float, float] | None = None  # (time, fraction) of the first step
        self._sent_at = float("-inf")
        self._loss: float | None = None

    def progress(self, epoch: int, step: int, steps: int, loss: float | None) -> dict | None:
        """The payload to publish now, or None (throttled)."""
        now = self.clock()
        if loss is not None and math.isfinite(loss):
            self._loss = float(loss)
        fraction = min(1.0, ((epoch - 1) + step / max(1, steps)) / self.epochs)
        if self._started is None:
            self._started = (now, fraction)
        if now - self._sent_at < self.interval_s:
            return None
        self._sent_at = now
        eta = None
        elapsed, done = now - self._started[0], fraction - self._started[1]
        if elapsed > 0 and done > 0:
            eta = round((1.0 - fraction) * elapsed / done, 1)
        return {
            "epoch": epoch,
            "step": step,
            "steps": steps,
            "loss": self._loss,
            "fraction": round(fraction, 4),
            "eta_seconds": eta,
        }

    def on_step(self, epoch: int, step: int, steps: int, loss: float | None) -> None:
        payload = self.progress(epoch, step, steps, loss)
        if payload is not None:
            publish_progress(self.job_id, payload)
