"""One box's device slots (issue 11 §3): which job a box with some free slots claims, that no slot
is given to two jobs, that a job needing several slots waits for all of them, and that 1-slot jobs
do not starve it (`jobstore.devicefit`, `worker.devices`). Simulated CPU slots, a real store."""

from __future__ import annotations

import multiprocessing
import time
from datetime import timedelta

import pytest
from sqlalchemy import update

from jobstore import devicefit, jobs
from jobstore.tables import Job, utcnow
from worker import devices

pytestmark = pytest.mark.timeout(60)


def make_job(job_store, *, devices_needed: int = 1, age_s: float = 0.0, owner_id=None) -> str:
    """A queued digits job needing ``devices_needed`` slots, submitted ``age_s`` seconds ago.
    (`devices` is written into the stored spec: the submission's own field is helper I4's.)"""
    job = job_store.call(
        jobs.create_job, spec={"dataset": "digits", "architecture": "mlp"}, owner_id=owner_id
    )

    def patch(session) -> None:
        spec = {**job.spec, "devices": devices_needed}
        created = utcnow() - timedelta(seconds=age_s)
        session.execute(update(Job).where(Job.id == job.id).values(spec=spec, created_at=created))

    job_store.call(patch)
    return job.id


def claim(job_store, *, free: int, total: int = 2, reserve_after_s: float = 600.0):
    job, need = job_store.call(
        devicefit.claim_fitting,
        worker="box",
        free=free,
        total=total,
        reserve_after_s=reserve_after_s,
    )
    return (job.id if job else None), need


def test_devices_default_to_one():
    assert devicefit.devices_of({}) == 1
    assert devicefit.devices_of({"devices": 2}) == 2
    assert devicefit.devices_of(None) == 1


def test_a_two_slot_job_waits_until_both_slots_are_free(job_store):
    big = make_job(job_store, devices_needed=2)
    assert claim(job_store, free=1) == (None, 0)  # one slot is not enough
    assert claim(job_store, free=2) == (big, 2)


def test_free_slots_are_backfilled_while_the_big_job_is_young(job_store):
    big = make_job(job_store, devices_needed=2, age_s=5)
    small = make_job(job_store, devices_needed=1)
    assert claim(job_store, free=1) == (small, 1)  # the big one does not fit yet
    assert job_store.call(jobs.get_job, big).status == "queued"


def test_a_big_job_waiting_too_long_reserves_the_box(job_store):
    big = make_job(job_store, devices_needed=2, age_s=700)
    small = make_job(job_store, devices_needed=1)
    # Past device_reserve_after: the free slot idles rather than go to the small job...
    assert claim(job_store, free=1, reserve_after_s=600) == (None, 0)
    assert job_store.call(jobs.get_job, small).status == "queued"
    # ...and once both are free the big job starts, ahead of the small one.
    assert claim(job_store, free=2, reserve_after_s=600) == (big, 2)
    assert claim(job_store, free=0 + 1, reserve_after_s=600) == (small, 1)


def test_a_job_bigger_than_the_box_is_left_to_another_box(job_store):
    make_job(job_store, devices_needed=4, age_s=700)
    small = make_job(job_store, devices_needed=1)
    assert claim(job_store, free=2, total=2, reserve_after_s=600) == (small, 1)


def test_one_slot_jobs_follow_the_fair_order(job_store):
    first = make_job(job_store, age_s=2)
    second = make_job(job_store, age_s=1)
    assert claim(job_store, free=2)[0] == first
    assert claim(job_store, free=1)[0] == second
    assert claim(job_store, free=1) == (None, 0)


def slots(tmp_path, count: int) -> devices.DeviceSlots:
    plan = devices.DevicePlan(device="cpu", slots=[str(index) for index in range(count)])
    return devices.DeviceSlots(plan, tmp_path / "slots")


def test_leases_never_share_a_slot_and_release_frees_it(tmp_path):
    box = slots(tmp_path, 2)
    first_job, first = box.lease(lambda free, total: ("a", 1))
    second_job, second = box.lease(lambda free, total: ("b", 1))
    assert (first.slots, second.slots) == (["0"], ["1"])
    seen: list[int] = []
    third_job, third = box.lease(lambda free, total: seen.append(free) or ("c", 1))
    assert third_job is None and third.slots == [] and seen == []  # no slot free: no claim
    first.release()
    assert box.free_slots() == ["0"]
    _, again = box.lease(lambda free, total: ("d", 1))
    assert again.slots == ["0"]
    assert again.environment() == {devices.SLOTS_ENV: "0"}  # no CUDA_VISIBLE_DEVICES on CPU


def test_a_lease_takes_as_many_slots_as_the_job_needs(tmp_path):
    box = slots(tmp_path, 3)
    job, lease = box.lease(lambda free, total: ("big", 2) if free >= 2 else (None, 0))
    assert (job, lease.slots, box.free_slots()) == ("big", ["0", "1"], ["2"])
    lease.release()
    assert box.free_slots() == ["0", "1", "2"]


def test_gpu_slots_set_cuda_visible_devices():
    env = devices.job_environment("cuda", ["GPU-3f2a", "5"])
    assert env == {devices.SLOTS_ENV: "GPU-3f2a,5", "CUDA_VISIBLE_DEVICES": "GPU-3f2a,5"}


def _hold_a_slot(directory: str, ready) -> None:
    box = devices.DeviceSlots(devices.DevicePlan(device="cpu", slots=["0", "1"]), directory)
    _, lease = box.lease(lambda free, total: ("other process", 1))
    ready.put(lease.slots)
    time.sleep(30)  # killed before


def test_a_slot_held_by_another_process_is_not_free(tmp_path):
    """The slots are flocks: another pool process's slot is taken; a dead holder's is free."""
    context = multiprocessing.get_context("fork")
    ready = context.Queue()
    holder = context.Process(target=_hold_a_slot, args=(str(tmp_path / "slots"), ready))
    holder.start()
    try:
        assert ready.get(timeout=20) == ["0"]
        box = slots(tmp_path, 2)
        assert box.free_slots() == ["1"]
        _, lease = box.lease(lambda free, total: ("mine", 1))
        assert lease.slots == ["1"]
        holder.kill()  # died without releasing: the kernel drops its flock
        holder.join(10)
        assert box.free_slots() == ["0"]
    finally:
        holder.kill()
        holder.join(10)
