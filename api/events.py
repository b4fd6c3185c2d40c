"""A job's live events for `GET /v1/jobs/{id}/events` (Server-Sent Events), fanned out in process.

The flow: a writer commits to the database, then publishes `{"kind": "changed"}` (or a progress
payload) on `jumpout:job:<id>` (`jobstore.events`). Each API process holds one Redis pub/sub
connection (`EventHub`, pattern `jumpout:job:*`) shared by all its watchers, and one
`JobChannel` per watched job: on a notification, and every `events_recheck_s` on its own, the
channel reads what is new (the job row and the epochs after the newest it holds: one read per
job, whatever the number of watchers) and wakes its watchers, which write the difference
between what they have sent and the channel's state. The database is the source of truth: a
message lost (Redis restarted, the subscriber reconnecting) only delays an event until the next
re-read.

Events (`event:` name, JSON `data:`): `snapshot` {"job", "metrics"} first; `status` (JobRead)
when the status, attempt or cancel flag changes; `epoch` (EpochMetricRead) once per epoch number,
in order; `progress` (not stored, as the trainer published it, at most about 2/s); `: ping`
comments every `events_heartbeat_s`; `end` (JobRead) when the job is final, then the stream
closes. A stored epoch that a later attempt rewrites (after a corrupted checkpoint) is not sent
again; `/metrics` has its newest values.

Event ids encode the state the client holds after that event: `<epoch>-<status>-<attempt>-<0|1>`
(newest epoch delivered, status, attempt, cancel flag) and `-p<n>` on a progress event. A client
reconnecting with `Last-Event-ID` gets no snapshot: a `status` if the status moved on, the epochs
after its own, and the end; so nothing is missed and nothing repeated.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import signal
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import orjson
from sqlalchemy import bindparam

from api import access, queries
from jobstore.errors import JobNotFound
from jobstore.events import CHANGED, CHANNEL_PATTERN, CHANNEL_PREFIX, PROGRESS
from jobstore.jobs import job_view, metric_view
from jobstore.queue import PUBLISH_TIMEOUT_S, redis_address
from jobstore.settings import get_settings
from jobstore.tables import FINAL_STATUSES, EpochMetric

log = logging.getLogger(__name__)

EVENT_ID_PATTERN = r"^[0-9]{1,9}-[a-z]{1,16}-[0-9]{1,9}-[01](-p[0-9]{1,12})?$"
_EVENT_ID = re.compile(EVENT_ID_PATTERN)
RETRY_MS = 2000  # how soon an EventSource reconnects after the stream breaks
RESUBSCRIBE_S = 1.0

_NEWER_METRICS = queries._METRICS.where(EpochMetric.epoch > bindparam("after"))


def _json(value) -> bytes:
    return orjson.dumps(value, option=queries.JSON_OPTIONS)


@dataclass(frozen=True)
class Cursor:
    """What a client holds: the newest epoch number sent and the job's status signature."""

    epoch: int
    status: str
    attempt: int
    cancel: bool

    def event_id(self, progress: int | None = None) -> str:
        text = f"{self.epoch}-{self.status}-{self.attempt}-{int(self.cancel)}"
        return text if progress is None else f"{text}-p{progress}"

    @classmethod
    def parse(cls, event_id: str) -> Cursor | None:
        if not _EVENT_ID.match(event_id):
            return None
        epoch, status, attempt, cancel = event_id.split("-")[:4]
        return cls(int(epoch), status, int(attempt), cancel == "1")

    def signature(self) -> tuple[str, int, bool]:
        return (self.status, self.attempt, self.cancel)


@dataclass
class JobState:
    """A job as the channel last read it: its `JobRead` body and every epoch it has sent, each
    serialised once for all watchers."""

    job: bytes
    status: str
    attempt: int
    cancel: bool
    epochs: list[tuple[int, bytes]] = field(default_factory=list)

    @property
    def final(self) -> bool:
        return self.status in FINAL_STATUSES

    @property
    def newest_epoch(self) -> int:
        return self.epochs[-1][0] if self.epochs else 0

    def cursor(self) -> Cursor:
        return Cursor(self.newest_epoch, self.status, self.attempt, self.cancel)


def sse(event: str, data: bytes, event_id: str) -> bytes:
    return b"id: %s\nevent: %s\ndata: %s\n\n" % (event_id.encode(), event.encode(), data)


def events_after(cursor: Cursor, state: JobState) -> tuple[list[bytes], Cursor]:
    """The events that bring a client from `cursor` to `state`, and its cursor afterwards: a
    status change (before the epochs, or after them when the job ended), the newer epochs, the
    end."""
    out: list[bytes] = []
    moved = cursor.signature() != state.cursor().signature()
    sig = (state.status, state.attempt, state.cancel)
    if moved and not state.final:
        cursor = Cursor(cursor.epoch, *sig)
        out.append(sse("status", state.job, cursor.event_id()))
    for epoch, data in state.epochs:
        if epoch > cursor.epoch:
            cursor = Cursor(epoch, cursor.status, cursor.attempt, cursor.cancel)
            out.append(sse("epoch", data, cursor.event_id()))
    if state.final:
        cursor = Cursor(cursor.epoch, *sig)
        if moved:
            out.append(sse("status", state.job, cursor.event_id()))
        out.append(sse("end", state.job, cursor.event_id()))
    return out, cursor


class Watcher:
    """One open stream: woken when its channel has news, with the newest progress pending."""

    def __init__(self) -> None:
        self.wake = asyncio.Event()
        self.progress: bytes | None = None


class JobChannel:
    """One watched job in this process: its state, its watchers, its re-reads."""

    def __init__(self, hub: EventHub, job_id: str) -> None:
        self.hub = hub
        self.job_id = job_id
        self.watchers: set[Watcher] = set()
        self.state: JobState | None = None
        self._lock = asyncio.Lock()
        self._dirty = False
        self._recheck: asyncio.Task | None = None
        self.owner_id: int | None = None
        self._held_progress: bytes | None = None

    async def refresh(self) -> JobState:
        """Read what is new from the database and wake the watchers. Callers during a read share
        the next one: a burst of notifications costs at most two reads."""
        self._dirty = True
        async with self._lock:
            if self._dirty or self.state is None:
                self._dirty = False
                after = self.state.newest_epoch if self.state else 0
                row, rows = await asyncio.to_thread(queries.read, self._read, after)
                self._apply(row, rows)
            if not self._dirty and self._held_progress is not None:
                self._deliver_progress(self._held_progress)
        return self.state

    def notify_changed(self) -> None:
        """A writer says the job changed: read it (in a task), and hold progress until then."""
        self._dirty = True
        asyncio.create_task(_refresh_quietly(self))

    def _read(self, connection, after: int):
        row = connection.execute(queries._JOB_BY_ID, {"job_id": self.job_id}).first()
        if row is None:
            raise JobNotFound(self.job_id)
        rows = connection.execute(_NEWER_METRICS, {"job_id": self.job_id, "after": after}).all()
        return row, rows

    def _apply(self, row, rows) -> None:
        epochs = list(self.state.epochs) if self.state else []
        newest = epochs[-1][0] if epochs else 0
        epochs += [(r.epoch, _json(metric_view(r))) for r in rows if r.epoch > newest]
        self.state = JobState(
            job=_json(job_view(row)),
            status=str(row.status),
            attempt=int(row.attempt),
            cancel=bool(row.cancel_requested),
            epochs=epochs,
        )
        self.owner_id = row.owner_id
        for watcher in self.watchers:
            watcher.wake.set()

    def push_progress(self, payload: bytes) -> None:
        if self._dirty or self._lock.locked():
            # Published after a change still being read: keep the trainer's order.
            self._held_progress = payload
            return
        self._deliver_progress(payload)

    def _deliver_progress(self, payload: bytes) -> None:
        self._held_progress = None
        for watcher in self.watchers:
            watcher.progress = payload
            watcher.wake.set()

    def add(self, watcher: Watcher) -> None:
        self.watchers.add(watcher)
        if self._recheck is None:
            self._recheck = asyncio.create_task(self._recheck_loop())

    def remove(self, watcher: Watcher) -> None:
        self.watchers.discard(watcher)
        if not self.watchers:
            if self._recheck is not None:
                self._recheck.cancel()
            if self.hub.channels.get(self.job_id) is self:
                del self.hub.channels[self.job_id]

    async def _recheck_loop(self) -> None:
        interval = get_settings().events_recheck_s
        while True:
            await asyncio.sleep(interval)
            try:
                await self.refresh()
            except Exception as error:  # noqa: BLE001 - the database is down: try again later
                log.warning("events: could not re-read job %s: %s", self.job_id, error)


class EventHub:
    """This process's (event loop's) pub/sub subscriber and its watched jobs."""

    def __init__(self) -> None:
        self.channels: dict[str, JobChannel] = {}
        self.closing = False
        self._listener: asyncio.Task | None = None
        self.subscribed = asyncio.Event()  # the tests wait on it before publishing

    def channel(self, job_id: str) -> JobChannel:
        channel = self.channels.get(job_id)
        if channel is None:
            channel = self.channels[job_id] = JobChannel(self, job_id)
        if self._listener is None:
            self._listener = asyncio.create_task(self._listen())
            _end_streams_on_shutdown(self)
        return channel

    def close(self) -> None:
        """The server is stopping: every stream ends (its client reconnects to the next one)."""
        self.closing = True
        for channel in list(self.channels.values()):
            for watcher in channel.watchers:
                watcher.wake.set()

    async def _listen(self) -> None:
        address = redis_address(get_settings().broker_url)
        if address is None:
            return  # no Redis: the channels' re-reads alone
        import redis.asyncio

        while True:
            client = redis.asyncio.Redis.from_url(
                address, socket_connect_timeout=PUBLISH_TIMEOUT_S, health_check_interval=30
            )
            try:
                async with client.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.psubscribe(CHANNEL_PATTERN)
                    self.subscribed.set()
                    # A message may have been missed while (re)subscribing.
                    for channel in list(self.channels.values()):
                        asyncio.create_task(channel.refresh())
                    async for message in pubsub.listen():
                        self._dispatch(message)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - Redis restarting: resubscribe
                self.subscribed.clear()
                log.warning("events: pub/sub connection lost (%s); resubscribing", error)
            finally:
                with contextlib.suppress(Exception):
                    await client.aclose()
            await asyncio.sleep(RESUBSCRIBE_S)

    def _dispatch(self, message: dict) -> None:
        if message.get("type") != "pmessage":
            return
        name = message["channel"]
        name = name.decode() if isinstance(name, bytes) else name
        channel = self.channels.get(name.removeprefix(CHANNEL_PREFIX))
        if channel is None:
            return
        try:
            body = json.loads(message["data"])
        except (ValueError, TypeError):
            return
        if body.get("kind") == PROGRESS and isinstance(body.get("progress"), dict):
            channel.push_progress(_json(body["progress"]))
        elif body.get("kind") == CHANGED:
            channel.notify_changed()


async def _refresh_quietly(channel: JobChannel) -> None:
    try:
        await channel.refresh()
    except Exception as error:  # noqa: BLE001 - the periodic re-read tries again
        log.warning("events: could not read job %s: %s", channel.job_id, error)


_hubs: dict[int, EventHub] = {}


def hub() -> EventHub:
    """The hub of the running event loop (a TestClient runs each app in a loop of its own)."""
    loop = asyncio.get_running_loop()
    found = _hubs.get(id(loop))
    if found is None or found.closing:
        found = _hubs[id(loop)] = EventHub()
    return found


def _end_streams_on_shutdown(event_hub: EventHub) -> None:
    """uvicorn waits for open responses before it stops, and an event stream does not end by
    itself: on SIGTERM/SIGINT, end the streams too (then uvicorn's own handler runs)."""
    if threading.current_thread() is not threading.main_thread():
        return
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(signum)
        if not callable(previous):
            continue

        def handler(number, frame, previous=previous):
            loop.call_soon_threadsafe(event_hub.close)
            previous(number, frame)

        signal.signal(signum, handler)


async def open_stream(principal, job_id: str, last_event_id: str | None) -> AsyncIterator[bytes]:
    """Check the job (404 before the response starts) and return its event stream."""
    event_hub = hub()
    channel = event_hub.channel(job_id)
    watcher = Watcher()
    channel.add(watcher)
    try:
        state = await channel.refresh()
        if not access.may_read_job(principal, channel.owner_id):
            raise JobNotFound(job_id)
    except BaseException:
        channel.remove(watcher)
        raise
    cursor = Cursor.parse(last_event_id) if last_event_id else None
    return _stream(event_hub, channel, watcher, state, cursor)


async def _stream(
    event_hub: EventHub, channel: JobChannel, watcher: Watcher, state: JobState, cursor
) -> AsyncIterator[bytes]:
    settings = get_settings()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.stream_max_s if settings.stream_max_s else None
    progress_count = 0
    try:
        yield b"retry: %d\n\n" % RETRY_MS
        if cursor is None:
            cursor = state.cursor()
            metrics = b"[" + b",".join(data for _, data in state.epochs) + b"]"
            snapshot = b'{"job":%s,"metrics":%s}' % (state.job, metrics)
            yield sse("snapshot", snapshot, cursor.event_id())
            if state.final:
                yield sse("end", state.job, cursor.event_id())
                return
        while True:
            watcher.wake.clear()
            events, cursor = events_after(cursor, channel.state)
            if events:
                yield b"".join(events)
            if channel.state.final:
                return
            if watcher.progress is not None:
                progress, watcher.progress = watcher.progress, None
                progress_count += 1
                yield sse("progress", progress, cursor.event_id(progress_count))
            if event_hub.closing:
                return
            timeout = settings.events_heartbeat_s
            if deadline is not None:
                timeout = min(timeout, deadline - loop.time())
                if timeout <= 0:
                    return
            try:
                await asyncio.wait_for(watcher.wake.wait(), timeout)
            except TimeoutError:
                if deadline is None or loop.time() < deadline:
                    yield b": ping\n\n"
    finally:
        channel.remove(watcher)
