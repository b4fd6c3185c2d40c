"""The broker queue: its names, the dispatch messages that wake the workers, and the broker's
and workers' health.

The database is the queue; the broker only wakes workers. A `run_job` message means "a worker
that receives this claims the next job in the fair order" (`jobstore.jobs.claim_next`,
`jobstore.fairshare`): the job id it carries (the job whose submission or requeue sent it) is a
label for the logs, not an order, so the broker's FIFO never decides who runs next. The queue holds
at most `dispatch_depth` waiting messages: a submission publishes only below that
(`enqueue_job`, one atomic Lua script: check the length, push), a worker that claims or finishes
a job tops the queue up to min(claimable jobs, `dispatch_depth`) (`top_up`), and so does the
reaper, which also covers a broker that was down or lost its data. A message that finds nothing to
claim is acknowledged and does nothing, so a spare one costs a worker one query.

The API never imports `worker/`: it sends the task by name. Job state lives in the database, so
the message's result is never read (Celery reports PENDING for ids it has never seen).

On a Redis broker (every deployment of this project) the message, Celery's task protocol 2 in the
envelope kombu's Redis transport writes, is pushed by that one script (`kombu_envelope`;
`job_ids` reads the same layout back). `send_task` made a new Redis client inside kombu for every
publish, about 2.5 ms of CPU per submission, a third of the submit route's, and importing Celery
was half of the API's start-up; the envelope is checked against a real `send_task` by a test.
Any other broker URL goes through `send_task`, one message per submitted or requeued job (its
length cannot be read, so there is no depth limit and no top-up there).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import socket
import threading
import uuid
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Any

from jobstore.settings import get_settings

logger = logging.getLogger(__name__)

# The names the API, the reaper and the Celery worker agree on, declared once.
QUEUE = "jobs"
RUN_JOB_TASK = "jumpout.run_job"
REAP_TASK = "jumpout.reap"
TASK_PATTERN = "jumpout.*"
# Fail fast when the broker is down: the job row is already committed and a reconciler (or a
# later re-submit) can enqueue it again, so the request must not hang on retries.
PUBLISH_RETRY_POLICY = {
    "max_retries": 2,
    "interval_start": 0,
    "interval_step": 0.2,
    "interval_max": 0.5,
}


@lru_cache(maxsize=4)
def _celery_app(broker_url: str, visibility_timeout: float):
    from celery import Celery

    app = Celery("jumpout-api", broker=broker_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        broker_connection_timeout=2,
        broker_connection_retry_on_startup=False,
        broker_transport_options={
            "visibility_timeout": visibility_timeout,
            # A hung Redis (it accepts connections, never answers) must not hold a thread of the
            # API for ever: the health's worker ping, a publish to another broker.
            "socket_timeout": PUBLISH_TIMEOUT_S,
            "socket_connect_timeout": PUBLISH_TIMEOUT_S,
        },
    )
    return app


def celery_app():
    settings = get_settings()
    return _celery_app(settings.broker_url, settings.visibility_timeout)


# How long a publish may wait for Redis: a hung broker must not hold a request (the job row is
# committed already; the reaper sends it later).
PUBLISH_TIMEOUT_S = 1.0

_redis_clients: dict[tuple[str, int], Any] = {}
_redis_clients_lock = threading.Lock()


def redis_address(url: str) -> str | None:
    """The broker URL as redis-py reads it (Celery spells a unix socket ``redis+socket://``), or
    None when the broker is not Redis."""
    if url.startswith("redis+socket://"):
        return "unix://" + url.removeprefix("redis+socket://")
    return url if url.startswith(("redis://", "rediss://", "unix://")) else None


def _redis_client(address: str):
    """One client (a connection pool) per Redis address and process."""
    key = (address, os.getpid())  # a pooled connection must never cross a fork
    with _redis_clients_lock:
        client = _redis_clients.get(key)
        if client is None:
            import redis

            client = _redis_clients[key] = redis.Redis.from_url(
                address, socket_connect_timeout=PUBLISH_TIMEOUT_S, socket_timeout=PUBLISH_TIMEOUT_S
            )
        return client


def _origin() -> str:
    # What Celery writes for a client that is not a worker (celery.utils.nodenames.anon_nodename).
    return f"gen{os.getpid()}@{socket.gethostname()}"


def kombu_envelope(job_id: str) -> str:
    """The `run_job(job_id)` message as Celery's `send_task` would write it into the queue's list
    on a Redis broker: Celery's task protocol 2 (headers, and a body of args, kwargs and an empty
    workflow) in kombu's Redis envelope. Written out here so that the API neither imports Celery
    (half a second of start-up, 60 MB) nor builds a kombu client per publish (2.5 ms of CPU per
    submission); tests/test_queue.py checks it against `send_task`'s message byte for byte, bar the
    ids."""
    task_id = str(uuid.uuid4())
    headers = {
        "lang": "py",
        "task": RUN_JOB_TASK,
        "id": task_id,
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": task_id,
        "parent_id": None,
        "argsrepr": repr([job_id]),
        "kwargsrepr": "{}",
        "origin": _origin(),
        "ignore_result": None,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
    }
    workflow = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    body = json.dumps([[job_id], {}, workflow]).encode()
    return json.dumps(
        {
            "body": base64.b64encode(body).decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": headers,
            "properties": {
                "correlation_id": task_id,
                "reply_to": "",
                "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": QUEUE},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
            },
        }
    )


def job_ids(raw_messages: Iterable[bytes | str]) -> Iterator[str]:
    """The job ids of `run_job` messages in kombu's Redis envelope (what `kombu_envelope` and
    `send_task` write); anything else is skipped."""
    for raw in raw_messages:
        try:
            message = json.loads(raw)
            body = message["body"]
            if message.get("properties", {}).get("body_encoding") == "base64":
                body = base64.b64decode(body)
            args = json.loads(body)[0]
            if args:
                yield str(args[0])
        except (ValueError, KeyError, IndexError, TypeError):
            continue


# Pushes messages (ARGV[2:]) until the list KEYS[1] holds ARGV[1], in one atomic step: concurrent
# submissions cannot all see a short queue and all push. Returns how many it pushed.
_PUSH_UP_TO = """
local missing = tonumber(ARGV[1]) - redis.call('LLEN', KEYS[1])
local pushed = 0
for i = 2, #ARGV do
  if pushed >= missing then break end
  redis.call('LPUSH', KEYS[1], ARGV[i])
  pushed = pushed + 1
end
return pushed
"""


def dispatch_depth() -> int:
    """The most dispatch messages that may wait in the queue (the `dispatch_depth` setting)."""
    return get_settings().dispatch_depth


def enqueue_job(job_id: str) -> bool:
    """Make sure a worker will come for the queued jobs: publish one `jumpout.run_job(job_id)`
    message unless the queue already holds `dispatch_depth` of them (any worker that receives one
    claims the next job in the fair order, not necessarily `job_id`). True when a message was
    published. Raises when the broker is unreachable (within `PUBLISH_TIMEOUT_S` on Redis)."""
    address = redis_address(get_settings().broker_url)
    if address is None:
        celery_app().send_task(
            RUN_JOB_TASK, args=[job_id], queue=QUEUE, retry=True, retry_policy=PUBLISH_RETRY_POLICY
        )
        return True
    client = _redis_client(address)
    return bool(client.eval(_PUSH_UP_TO, 1, QUEUE, dispatch_depth(), kombu_envelope(job_id)))


def top_up(claimable: int, *, requeued: Sequence[str] = ()) -> int:
    """Publish messages until the queue holds min(`claimable`, `dispatch_depth`) of them (a
    worker after a claim or a finish, the reaper on every pass); returns how many were published.

    `requeued`: jobs just put back to queued (by the reaper). On Redis the first one labels the
    messages; on another broker, whose queue cannot be measured, each gets a message of its own
    (as every submitted job does there) and nothing else is published. Raises when the broker is
    unreachable."""
    address = redis_address(get_settings().broker_url)
    if address is None:
        for job_id in requeued:
            enqueue_job(job_id)
        return len(requeued)
    target = min(claimable, dispatch_depth())
    if target <= 0:
        return 0
    label = requeued[0] if requeued else ""
    envelopes = [kombu_envelope(label) for _ in range(target)]
    return int(_redis_client(address).eval(_PUSH_UP_TO, 1, QUEUE, target, *envelopes))


def waiting_messages() -> int | None:
    """How many dispatch messages wait in the queue (not yet delivered to a worker); None when
    the broker is not Redis. Raises when the broker is unreachable."""
    address = redis_address(get_settings().broker_url)
    if address is None:
        return None
    return int(_redis_client(address).llen(QUEUE))


_async_clients: dict[tuple[str, int], Any] = {}


def _async_redis_client(address: str):
    """The asyncio twin of `_redis_client`, one per Redis address and event loop."""
    import asyncio

    import redis.asyncio

    key = (address, id(asyncio.get_running_loop()))
    client = _async_clients.get(key)
    if client is None:
        client = _async_clients[key] = redis.asyncio.Redis.from_url(
            address, socket_connect_timeout=PUBLISH_TIMEOUT_S, socket_timeout=PUBLISH_TIMEOUT_S
        )
    return client


async def enqueue_job_async(job_id: str) -> bool:
    """`enqueue_job` for an event loop: a slow or hung broker holds neither the loop nor a
    thread of the server's pool, only this request, for at most `PUBLISH_TIMEOUT_S`. Another
    broker than Redis is published to by `send_task` in `_publish_threads` (its own few threads)."""
    address = redis_address(get_settings().broker_url)
    if address is None:
        return await _in_publish_thread(enqueue_job, job_id)
    client = _async_redis_client(address)
    return bool(await client.eval(_PUSH_UP_TO, 1, QUEUE, dispatch_depth(), kombu_envelope(job_id)))


# The API's publishes after a commit are bounded, so that a broker that hangs (a SIGSTOPped Redis
# still accepts TCP connections: a connect succeeds, the answer never comes) cannot hold the
# requests that submitted, nor pile them up: each publish is abandoned after
# `PUBLISH_DEADLINE_S` whatever the client library does, and while `MAX_PUBLISHES_IN_FLIGHT`
# are still waiting a new one is skipped at once. A skipped or failed publish loses nothing: the
# job is committed as queued and the reaper publishes for it (`worker.reaper`, after
# `reconcile_after`). No quiet period after a failure: a broker that is back answers the next
# submission at once rather than leaving its job to the reaper.
PUBLISH_DEADLINE_S = PUBLISH_TIMEOUT_S + 0.25
MAX_PUBLISHES_IN_FLIGHT = 4
PUBLISH_THREADS = 2


class PublishSkipped(RuntimeError):
    """The API did not try to publish: earlier publishes are still waiting for the broker."""


class _PublishGate:
    """This process's publishes in flight, and its publishing threads in use (a thread's
    call can outlive its caller's wait; it is counted until it returns)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.in_flight = 0
        self.threads_busy = 0

    def enter(self) -> None:
        with self.lock:
            if self.in_flight >= MAX_PUBLISHES_IN_FLIGHT:
                raise PublishSkipped(f"{self.in_flight} earlier publishes still wait for it")
            self.in_flight += 1

    def leave(self) -> None:
        with self.lock:
            self.in_flight -= 1


_gate = _PublishGate()
_publish_threads: ThreadPoolExecutor | None = None


async def _in_publish_thread(fn, *args):
    """``fn(*args)`` in `_publish_threads`, never in the server's thread pool (shared with the
    sync routes). A call still running there after its caller gave up keeps its thread; while
    all `PUBLISH_THREADS` are taken, PublishSkipped at once instead of queueing behind them."""
    global _publish_threads
    with _gate.lock:
        if _gate.threads_busy >= PUBLISH_THREADS:
            raise PublishSkipped("earlier publishes still hold the publishing threads")
        _gate.threads_busy += 1
        if _publish_threads is None:
            _publish_threads = ThreadPoolExecutor(PUBLISH_THREADS, thread_name_prefix="publish")

    def release(_future) -> None:
        with _gate.lock:
            _gate.threads_busy -= 1

    future = _publish_threads.submit(fn, *args)
    future.add_done_callback(release)  # when the thread is done, not when the caller gives up
    return await asyncio.wrap_future(future)


async def _bounded_publish(job_id: str) -> bool:
    """`enqueue_job_async` under `_gate`, abandoned after `PUBLISH_DEADLINE_S`; raises
    PublishSkipped, TimeoutError or the broker's error."""
    _gate.enter()
    try:
        return await asyncio.wait_for(enqueue_job_async(job_id), PUBLISH_DEADLINE_S)
    finally:
        _gate.leave()


def _log_unpublished(what: str, error: Exception) -> None:
    if isinstance(error, PublishSkipped):
        logger.info("%s: not published (%s); the reaper will", what, error)
    else:
        reason = str(error) or type(error).__name__
        logger.warning("%s: could not reach the broker (%s); the reaper will publish", what, reason)


async def try_enqueue(job_id: str) -> bool:
    """After committing queued jobs (one submission, or an experiment's jobs: call it once), wake
    a worker from the API's event loop, logging (not raising) a broker failure: the jobs stay
    queued in the database and the reaper publishes for them later. Bounded (`_gate`): at most
    `PUBLISH_DEADLINE_S`, and nothing at all while earlier publishes still hang. False only on a
    failure or a skip (a full queue is not one: the waiting messages will claim these jobs in
    their turn)."""
    try:
        await _bounded_publish(job_id)
    except Exception as exc:  # any broker/transport error; the row is the source of truth
        _log_unpublished(f"job {job_id} stays queued", exc)
        return False
    return True


async def try_enqueue_all(job_ids: Sequence[str]) -> bool:
    """`try_enqueue` for several jobs committed together (an experiment's): a message per job
    until the broker's queue is full (on Redis `dispatch_depth` messages; the workers top it up as
    they claim, so publishing more would only be refused), and on a failure none after it (waiting
    out the timeout once per job would hold the request for minutes; the reaper publishes later).
    False only on a failure or a skip."""
    for job_id in job_ids:
        try:
            if not await _bounded_publish(job_id):
                return True  # full: the waiting messages will claim the rest in their turn
        except Exception as exc:  # any broker/transport error; the rows are the source of truth
            _log_unpublished(f"jobs from {job_id} on stay queued", exc)
            return False
    return True


def warm_up() -> None:
    """Import the asyncio Redis client at start-up rather than in the first submission."""
    import redis.asyncio  # noqa: F401


def broker_ping(timeout: float = 1.0) -> bool:
    """True when the broker's Redis answers PING."""
    import redis

    address = redis_address(get_settings().broker_url)
    if address is None:
        return False
    try:
        client = redis.Redis.from_url(
            address, socket_connect_timeout=timeout, socket_timeout=timeout
        )
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception as exc:
        logger.warning("broker health check failed: %s", exc)
        return False


def worker_devices(timeout: float | None = None) -> dict[str, dict[str, Any]]:
    """Each Celery worker that answers within `timeout` seconds, by node name, with its device
    plan (`worker.devices.DevicePlan.summary`: device, slots, usable, reason). A worker that does
    not know the command (an older version) counts as usable with one slot. Always waits the
    whole timeout, like `count_workers`."""
    settings = get_settings()
    app = celery_app()
    try:
        # Its own connection, closed here (see `count_workers`).
        with app.connection_for_write() as connection:
            replies = app.control.broadcast(
                "jumpout_devices",
                reply=True,
                timeout=timeout or settings.health_ping_timeout,
                connection=connection,
            )
    except Exception as exc:
        logger.warning("worker device query failed: %s", exc)
        return {}
    plans: dict[str, dict[str, Any]] = {}
    for reply in replies or []:
        for name, plan in reply.items():
            known = isinstance(plan, dict) and "usable" in plan
            plans[name] = plan if known else {"usable": True, "slots": ["0"]}
    return plans


def count_workers(timeout: float | None = None) -> int:
    """How many Celery workers answer a broadcast ping within `timeout` seconds (the call always
    waits the whole timeout, since the number of workers is not known in advance)."""
    settings = get_settings()
    app = celery_app()
    try:
        # Its own connection, closed here: a pooled one would stay in the process with its reply
        # channel mid-BRPOP, and kombu's after-fork cleanup in any child forked later (a
        # DataLoader worker) would block for ever reading that reply.
        with app.connection_for_write() as connection:
            replies = app.control.ping(
                timeout=timeout or settings.health_ping_timeout, connection=connection
            )
    except Exception as exc:
        logger.warning("worker ping failed: %s", exc)
        return 0
    return len(replies or [])
