"""The fair order of the queued jobs (`jobstore.fairshare`): what `jobs.claim_next` takes, and the
place in line a queued job is shown; on SQLite and on PostgreSQL (127.0.0.1:5432)."""

from __future__ import annotations

import random
import threading
import uuid
from collections import Counter

import pytest
from sqlalchemy import text, update

from jobstore import db, fairshare, jobs
from jobstore.settings import get_settings
from jobstore.tables import ApiToken, Job

SPEC = {"dataset": "digits", "architecture": "mlp", "epochs": 1}
TABLES = ("epoch_metrics", "checkpoints", "jobs", "experiments", "api_tokens")


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path, monkeypatch):
    """A migrated, empty store selected through the settings (`db.call` reaches it)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'jumpout.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    monkeypatch.setenv("JUMPOUT_HOME", str(tmp_path))
    monkeypatch.setenv("JUMPOUT_DATABASE_URL", url)
    monkeypatch.setenv("JUMPOUT_MAX_QUEUED_PER_TOKEN", "1000")
    get_settings.cache_clear()
    if request.param == "sqlite":
        db.migrate()
    else:
        with db.get_engine(url).begin() as connection:
            connection.execute(text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))
    yield db
    db.dispose_engines()
    get_settings.cache_clear()


def owner(store, name: str) -> int:
    def add(session) -> int:
        token = ApiToken(name=name, token_hash=uuid.uuid4().hex * 2, is_admin=False)
        session.add(token)
        session.flush()
        return token.id

    return store.call(add)


def submit(store, owner_id: int | None, count: int = 1, *, priority: int = 0) -> list[str]:
    return [
        store.call(jobs.create_job, spec=SPEC, owner_id=owner_id, priority=priority).id
        for _ in range(count)
    ]


def claim(store, worker: str = "w") -> str | None:
    job = store.call(jobs.claim_next, worker=worker)
    return None if job is None else job.id


def finish(store, job_id: str) -> None:
    assert store.call(jobs.finish_job, job_id, status="succeeded")


def run_one_at_a_time(store) -> list[str]:
    """A single worker: claim the next job, finish it, until nothing is queued."""
    order = []
    while (job_id := claim(store)) is not None:
        order.append(job_id)
        finish(store, job_id)
    return order


def owner_of(store, job_ids: list[str]) -> list[int | None]:
    return [store.call(jobs.get_job, job_id).owner_id for job_id in job_ids]


def position(store, job_id: str) -> dict | None:
    def read(session):
        return fairshare.queue_position(session, session.get(Job, job_id))

    return store.call(read)


# --- claim_next ----------------------------------------------------------------------------------


def test_a_colleagues_job_starts_after_the_running_one_not_after_the_whole_backlog(store):
    alice, bob = owner(store, "alice"), owner(store, "bob")
    backlog = submit(store, alice, 50)
    first = claim(store)
    assert first == backlog[0]
    (single,) = submit(store, bob)
    finish(store, first)
    assert claim(store) == single  # the next completion
    order = run_one_at_a_time(store)
    assert order == backlog[1:]  # then alice's, in submission order


def test_owners_take_turns_on_one_worker(store):
    alice, bob, carol = owner(store, "alice"), owner(store, "bob"), owner(store, "carol")
    a = submit(store, alice, 3)
    b = submit(store, bob, 3)
    c = submit(store, carol, 2)
    order = run_one_at_a_time(store)
    assert order == [a[0], b[0], c[0], a[1], b[1], c[1], a[2], b[2]]


def test_the_owner_with_fewest_running_jobs_goes_first(store):
    alice, bob = owner(store, "alice"), owner(store, "bob")
    a = submit(store, alice, 3)
    b = submit(store, bob, 3)
    assert claim(store, "w1") == a[0]  # nobody has started: the oldest queued job's owner
    assert claim(store, "w2") == b[0]
    finish(store, b[0])
    # Bob started last, but alice still has a job running on w1: bob's turn again.
    assert claim(store, "w2") == b[1]
    finish(store, a[0])
    assert claim(store, "w1") == a[1]


def test_priority_orders_an_owners_own_jobs_but_never_jumps_a_colleague(store):
    alice, bob = owner(store, "alice"), owner(store, "bob")
    low, normal = submit(store, alice, priority=-5), submit(store, alice)
    urgent = submit(store, alice, priority=100)
    first = claim(store)
    assert first == urgent[0]
    (bobs,) = submit(store, bob, priority=-100)
    finish(store, first)
    assert run_one_at_a_time(store) == [bobs, normal[0], low[0]]


def test_anonymous_submitters_are_one_owner(store):
    alice = owner(store, "alice")
    anonymous = submit(store, None, 3)
    alices = submit(store, alice, 2)
    order = run_one_at_a_time(store)
    assert order == [anonymous[0], alices[0], anonymous[1], alices[1], anonymous[2]]


def test_nothing_to_claim_and_cancelled_jobs_are_skipped(store):
    assert claim(store) is None
    cancelled, kept = submit(store, None, 2)
    admin = type("Admin", (), {"id": None, "is_admin": True})
    store.call(jobs.request_cancel, cancelled, token=admin)
    assert store.call(jobs.count_claimable) == 1
    assert claim(store) == kept
    assert claim(store) is None
    assert store.call(jobs.count_claimable) == 0


def test_a_requeued_job_is_claimed_again_in_its_owners_turn(store):
    alice, bob = owner(store, "alice"), owner(store, "bob")
    a = submit(store, alice, 2)
    b = submit(store, bob, 1)
    assert claim(store) == a[0]
    # The worker shut down: a[0] goes back to queued, as the oldest of alice's jobs.
    job = store.call(jobs.get_job, a[0])
    store.call(jobs.requeue_job, a[0], attempt=job.attempt, error="shutdown", count_attempt=False)
    assert claim(store) == b[0]  # alice had the last turn
    assert claim(store) == a[0]


def test_concurrent_workers_claim_each_job_exactly_once(store):
    owners = [owner(store, f"user{i}") for i in range(3)]
    submitted = [job for owner_id in owners for job in submit(store, owner_id, 8)]
    claimed: list[str] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker(name: str) -> None:
        try:
            while (job_id := claim(store, name)) is not None:
                with lock:
                    claimed.append(job_id)
        except BaseException as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    assert sorted(claimed) == sorted(submitted)  # every job once, none twice
    rows = [store.call(jobs.get_job, job_id) for job_id in submitted]
    assert {(row.status, row.attempt) for row in rows} == {("running", 1)}


# --- a queued job's place in line --------------------------------------------------------------


def test_position_and_reason_of_a_colleagues_job_behind_a_backlog(store):
    alice, bob = owner(store, "alice"), owner(store, "bob")
    backlog = submit(store, alice, 50)
    assert claim(store) == backlog[0]
    (single,) = submit(store, bob)
    assert position(store, single) == {
        "position": 1,
        "ahead": 0,
        "reason": "next in line: starts as soon as a worker is free",
    }
    second = position(store, backlog[1])
    assert (second["position"], second["ahead"]) == (2, 1)
    assert second["reason"] == (
        "waiting for a free worker: 1 job ahead (1 in the round-robin turns of another owner)"
    )
    last = position(store, backlog[-1])
    assert (last["position"], last["ahead"]) == (50, 49)
    assert "48 of the same owner's" in last["reason"]
    assert position(store, backlog[0]) is None  # running


def test_positions_foretell_the_claim_order_of_one_worker(store):
    """Before any new submission, the place each queued job is shown is the order in which one
    worker then runs them (owners taking turns, priorities within an owner), with a job of one
    owner already running."""
    rng = random.Random(9)
    owners = [None, *(owner(store, f"user{i}") for i in range(3))]
    running = submit(store, owners[1])[0]
    assert claim(store) == running
    queued = []
    for _ in range(30):
        owner_id = rng.choice(owners)
        queued += submit(store, owner_id, priority=rng.choice([-1, 0, 0, 3]))
    places = {job_id: position(store, job_id) for job_id in queued}
    assert sorted(place["position"] for place in places.values()) == list(range(1, 31))
    finish(store, running)
    order = run_one_at_a_time(store)
    assert [places[job_id]["position"] for job_id in order] == list(range(1, 31))
    # And the order is fair: no owner starts two jobs in a row while another is waiting.
    owners_in_order = owner_of(store, order)
    waiting = Counter(owners_in_order)
    for previous, current in zip(owners_in_order, owners_in_order[1:], strict=False):
        waiting[previous] -= 1
        others_waiting = any(count for who, count in waiting.items() if who != previous)
        assert not (current == previous and others_waiting)


def test_jobs_taken_before_plays_the_round_robin_forward():
    from datetime import UTC, datetime, timedelta

    now = datetime.now(UTC)
    turns = [
        fairshare.OwnerTurn(1, queued=5, oldest_queued=now, running=1, last_started=now),
        fairshare.OwnerTurn(2, queued=1, oldest_queued=now + timedelta(seconds=1)),
        fairshare.OwnerTurn(3, queued=3, oldest_queued=now + timedelta(seconds=2)),
    ]
    turns.sort(key=fairshare.OwnerTurn.sort_key)
    # Owner 3's third job: owners 2 and 3 have nothing running, 1 has one job running.
    # Claims: 2, 3, 1, 3, 1, (3's third) -> 2 of owner 1, 1 of owner 2, 2 of its own.
    assert fairshare.jobs_taken_before(turns, owner_id=3, own_earlier=2) == {2: 1, 3: 2, 1: 2}
    assert fairshare.jobs_taken_before(turns, owner_id=2, own_earlier=0) == {}
    assert fairshare.jobs_taken_before(turns, owner_id=99, own_earlier=0) == {}


def test_owner_turns_reads_running_jobs_and_last_start(store):
    alice, bob = owner(store, "alice"), owner(store, "bob")
    a = submit(store, alice, 2)
    submit(store, bob, 1)
    assert claim(store) == a[0]
    turns = store.call(fairshare.owner_turns)
    assert [turn.owner_id for turn in turns] == [bob, alice]
    bobs, alices = turns
    assert (bobs.queued, bobs.running, bobs.last_started) == (1, 0, None)
    assert (alices.queued, alices.running) == (1, 1)
    assert alices.last_started == store.call(jobs.get_job, a[0]).started_at


def test_a_job_whose_cancel_is_pending_has_no_place(store):
    (job_id,) = submit(store, None)

    def flag(session):
        session.execute(update(Job).where(Job.id == job_id).values(cancel_requested=True))

    store.call(flag)
    assert position(store, job_id) is None
    assert claim(store) is None


# --- the worker's side: a message means "claim the next fair job" ------------------------------


@pytest.fixture
def worker_side(store, monkeypatch):
    """`supervisor.run` with the trainer's supervision and the broker replaced by recorders."""
    from jobstore import queue
    from worker import supervisor

    calls = {"supervised": [], "top_up": []}

    def supervise(job_id, *, attempt, **_budget):
        calls["supervised"].append(job_id)
        finish(store, job_id)
        return "succeeded"

    monkeypatch.setattr(supervisor, "supervise", supervise)
    monkeypatch.setattr(queue, "top_up", lambda claimable: calls["top_up"].append(claimable) or 0)
    return supervisor, calls


def test_a_message_runs_the_next_fair_job_whatever_job_it_names(store, worker_side):
    supervisor, calls = worker_side
    alice, bob = owner(store, "alice"), owner(store, "bob")
    a = submit(store, alice, 3)
    assert supervisor.run(a[0]) == "succeeded"
    (b,) = submit(store, bob)
    # The message was sent by alice's third job; bob's turn comes first all the same.
    assert supervisor.run(a[2]) == "succeeded"
    assert supervisor.run("") == "succeeded"
    assert calls["supervised"] == [a[0], b, a[1]]
    # After each claim and each finish: the claimable jobs left, for the broker's top-up.
    assert calls["top_up"] == [2, 2, 2, 2, 1, 1]


def test_a_message_with_nothing_to_claim_returns_quietly(store, worker_side):
    supervisor, calls = worker_side
    assert supervisor.run("0" * 32) is None
    assert calls == {"supervised": [], "top_up": []}


def test_a_worker_shutting_down_claims_nothing(store, worker_side, monkeypatch):
    supervisor, calls = worker_side
    (job_id,) = submit(store, None)
    monkeypatch.setattr(supervisor, "_shutdown_requested", True)
    assert supervisor.run(job_id) is None
    assert calls["supervised"] == []
    assert calls["top_up"] == [1]  # its message is acknowledged: another must wake a worker
    assert store.call(jobs.get_job, job_id).status == "queued"


def test_a_broker_failure_does_not_fail_the_job(store, worker_side, monkeypatch):
    from jobstore import queue

    supervisor, calls = worker_side
    submit(store, None, 2)

    def unreachable(claimable):
        raise ConnectionError("broker down")

    monkeypatch.setattr(queue, "top_up", unreachable)
    assert supervisor.run("") == "succeeded"
    assert len(calls["supervised"]) == 1
