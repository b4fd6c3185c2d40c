"""``jumpout-client watch``: follow one job through its event stream (``GET /v1/jobs/{id}/events``)
with a live progress bar (epoch, loss, test accuracy, ETA) on stderr, and exit with a status that
tells the outcome apart: 0 succeeded, 1 failed, 3 cancelled, 4 the server was lost.

The stream is resumed after a dropped connection with ``Last-Event-ID`` (the server then sends
what was missed, without duplicates), for up to ``reconnect_for`` seconds per outage; a read that
sees neither an event nor a heartbeat for `READ_TIMEOUT` counts as a dropped connection.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

from client.events import ServerEvent, parse_events
from client.format import duration, percent
from client.http import EXIT_CANCELLED, EXIT_OK, EXIT_REFUSED, EXIT_UNREACHABLE, ApiClient

# Heartbeats come every 15 s by default (JUMPOUT_SSE_HEARTBEAT on the server): three missed ones
# mean the connection is dead even if no socket error says so.
READ_TIMEOUT = 50.0
RECONNECT_DELAYS = (0.5, 1.0, 2.0)  # then every 2 s until reconnect_for has passed

EXIT_BY_STATUS = {"succeeded": EXIT_OK, "failed": EXIT_REFUSED, "cancelled": EXIT_CANCELLED}
FINAL = tuple(EXIT_BY_STATUS)


class LostConnection(Exception):
    """The stream could not be resumed; the message says since when and what to do."""


class JobWatch:
    """What the watcher knows of the job, drawn as one progress bar and printed lines."""

    def __init__(self, job_id: str, console: Console) -> None:
        self.job_id = job_id
        self.console = console
        self.job: dict[str, Any] | None = None
        self.loss: float | None = None
        self.accuracy: float | None = None
        self.eta: float | None = None
        self.epoch = 0
        self.epochs = 0
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[stats]}"),
            console=console,
            transient=False,
        )
        self.task = self.progress.add_task(f"job {job_id[:8]}", total=1.0, stats="")

    # --- events ------------------------------------------------------------------------------

    def handle(self, event: ServerEvent) -> str | None:
        """Apply one event; the final status once the stream says ``end``, else None."""
        data = event.json()
        if event.event == "snapshot":
            self._job(data["job"], announce=True)
            for metrics in data.get("metrics") or []:
                self._epoch(metrics, quiet=True)
        elif event.event == "status":
            self._job(data, announce=True)
        elif event.event == "epoch":
            self._epoch(data, quiet=False)
        elif event.event == "progress":
            self.epoch = max(self.epoch, int(data.get("epoch") or 0))
            if data.get("loss") is not None:
                self.loss = data["loss"]
            self.eta = data.get("eta_seconds")
            self._draw(data.get("fraction"))
        elif event.event == "end":
            self._job(data, announce=False)
            return data["status"]
        return None

    def _job(self, job: dict[str, Any], *, announce: bool) -> None:
        previous = self.job
        self.job = job
        progress = job.get("progress") or {}
        self.epochs = progress.get("epochs") or self.epochs
        self.epoch = max(self.epoch, progress.get("epoch") or 0)
        self.eta = progress.get("eta_seconds")
        changed = previous is None or any(
            previous.get(key) != job.get(key) for key in ("status", "attempt", "cancel_requested")
        )
        if announce and changed:
            line = f"job {self.job_id}: {job['status']}"
            if job.get("attempt", 0) > 1:
                line += f" (attempt {job['attempt']})"
            if job.get("cancel_requested") and job["status"] not in FINAL:
                line += ", cancel requested"
            queue = job.get("queue")
            if job["status"] == "queued" and queue:
                line += f", position {queue['position']} in the queue: {queue['reason']}"
            self.console.print(line, markup=False, highlight=False)
        self._draw(progress.get("fraction"))

    def _epoch(self, metrics: dict[str, Any], *, quiet: bool) -> None:
        self.epoch = max(self.epoch, metrics["epoch"])
        self.loss = metrics.get("train_loss", self.loss)
        self.accuracy = metrics.get("test_accuracy", self.accuracy)
        if not quiet:
            self.console.print(epoch_line(metrics, self.epochs), markup=False, highlight=False)
        fraction = self.epoch / self.epochs if self.epochs else None
        self._draw(fraction)

    def _draw(self, fraction: float | None) -> None:
        stats = []
        if self.loss is not None:
            stats.append(f"loss {self.loss:.4f}")
        if self.accuracy is not None:
            stats.append(f"test acc {percent(self.accuracy)}")
        if self.eta is not None and (self.job or {}).get("status") == "running":
            stats.append(f"ETA {duration(self.eta)}")
        status = (self.job or {}).get("status", "")
        description = f"job {self.job_id[:8]} {status}"
        if self.epochs:
            description += f" epoch {self.epoch}/{self.epochs}"
        update: dict[str, Any] = {"description": description, "stats": "  ".join(stats)}
        if fraction is not None:
            update["completed"] = fraction
        self.progress.update(self.task, **update)

    def summary(self) -> str:
        job = self.job or {}
        result = job.get("result") or {}
        status = job.get("status", "?")
        line = f"job {self.job_id} {status}"
        if status == "succeeded":
            line += f": final test accuracy {percent(result.get('final_accuracy'))}"
            if result.get("best_epoch") is not None:
                line += (
                    f"; best on validation: epoch {result['best_epoch']} "
                    f"(test {percent(result.get('test_accuracy_at_best'))})"
                )
        elif status == "failed":
            line += f": {job.get('error') or 'no reason recorded'}"
        else:
            line += f" after {self.epoch}/{self.epochs} epochs"
        return line


def epoch_line(metrics: dict[str, Any], epochs: int) -> str:
    """One finished epoch as the library's command line prints it."""
    parts = [f"epoch {metrics['epoch']:>3}/{epochs or '?'}"]
    if metrics.get("train_loss") is not None:
        parts.append(
            f"train loss {metrics['train_loss']:.4f} acc {percent(metrics.get('train_accuracy'))}"
        )
    if metrics.get("test_loss") is not None:
        parts.append(
            f"test loss {metrics['test_loss']:.4f} acc {percent(metrics.get('test_accuracy'))}"
        )
    if metrics.get("val_accuracy") is not None:
        parts.append(f"val acc {percent(metrics['val_accuracy'])}")
    if metrics.get("seconds") is not None:
        parts.append(f"{metrics['seconds']:.1f}s")
    return "  ".join(parts)


class _Outage:
    """Since when the stream has been down, and how long to wait before the next try. The
    server talking (an event or a heartbeat) ends the outage; a connection that is accepted and
    closed without a byte does not, so a flapping server is given up on too."""

    def __init__(self) -> None:
        self.since: float | None = None
        self.tries = 0

    def over(self) -> None:
        self.since, self.tries = None, 0

    def seconds(self) -> float:
        now = time.monotonic()
        self.since = self.since or now
        return now - self.since

    def next_delay(self) -> float:
        self.tries += 1
        return RECONNECT_DELAYS[min(self.tries, len(RECONNECT_DELAYS)) - 1]


def _alive(lines: Iterator[str], outage: _Outage) -> Iterator[str]:
    for line in lines:
        outage.over()
        yield line


def watch_job(api: ApiClient, job_id: str, *, console: Console, reconnect_for: float = 30.0) -> int:
    """Follow the job to its end; the exit status for its final state. `ClientError` if the
    server refuses (unknown job, bad token); `LostConnection` if it cannot be resumed."""
    view = JobWatch(job_id, console)
    last_id: str | None = None
    connected = False  # once: a later failure is a dropped stream to resume, not a dead server
    outage = _Outage()
    timeout = httpx.Timeout(10.0, read=READ_TIMEOUT)
    with view.progress:
        while True:
            headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
            if last_id is not None:
                headers["Last-Event-ID"] = last_id
            try:
                with api.http.stream(
                    "GET",
                    f"/v1/jobs/{quote(job_id, safe='')}/events",
                    headers=headers,
                    timeout=timeout,
                ) as response:
                    if response.status_code >= 500 and connected:
                        raise httpx.RemoteProtocolError(f"HTTP {response.status_code}")
                    api.check(response)
                    connected = True
                    for event in parse_events(_alive(response.iter_lines(), outage)):
                        last_id = event.id or last_id
                        final = view.handle(event)
                        if final is not None:
                            break
                    else:
                        final = None  # closed before `end`: resume
            except httpx.HTTPError as error:
                if not connected:
                    raise api.unreachable(error) from None
                final = None
                reason = str(error) or type(error).__name__
            else:
                reason = "the stream closed before the job ended"
            if final is not None:
                break
            if outage.seconds() > reconnect_for:
                raise LostConnection(
                    f"lost the connection to {api.server} while watching job {job_id} "
                    f"({reason}) and could not resume it for {reconnect_for:g}s; the job goes on "
                    f"on the server: run `jumpout-client watch {job_id}` again"
                )
            time.sleep(outage.next_delay())
    console.print(view.summary(), markup=False, highlight=False)
    return EXIT_BY_STATUS.get(final, EXIT_UNREACHABLE)
