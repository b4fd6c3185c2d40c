"""The job's event stream (`GET /v1/jobs/{id}/events`) and log (`GET /v1/jobs/{id}/log`) through a
TestClient, on SQLite and PostgreSQL; the log's bounding and the event diff as plain functions.

A TestClient returns a streaming response only once it has ended, so a live job's stream is
cut by `stream_max_s` (0.3 s in conftest; longer where a thread writes meanwhile). The live path
with real processes is tests/integration/test_events.py.
"""

from __future__ import annotations

import json
import os
import threading
import time

from api.events import Cursor, JobState, events_after
from jobstore import db, events, joblog, jobs
from jobstore.tables import JobStatus

QUICK = {"dataset": "synthetic", "architecture": "mlp", "epochs": 3}


def parse_sse(text: str) -> list[dict]:
    """The events of a body: dicts with id, event, data (parsed); comments as {"comment"}."""
    found = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        event: dict = {}
        for line in block.split("\n"):
            if line.startswith(":"):
                event["comment"] = line[1:].strip()
            elif line.startswith("retry:"):
                event["retry"] = int(line[6:])
            else:
                name, _, value = line.partition(": ")
                event[name] = json.loads(value) if name == "data" else value
        found.append(event)
    return [e for e in found if "event" in e or "comment" in e]


def epoch(n: int) -> dict:
    return {"epoch": n, "test_accuracy": 0.1 * n, "train_loss": 1.0 / n, "seconds": 0.5}


def run_job(session, job_id: str, *, epochs: int = 0) -> None:
    assert jobs.claim_job(session, job_id, worker="w") is not None
    if epochs:
        jobs.record_epochs(session, job_id, [epoch(n) for n in range(1, epochs + 1)])


# --- the stream --------------------------------------------------------------------------------


def test_a_final_job_streams_its_snapshot_and_end(client, session, make_job):
    job_id = make_job(**QUICK)
    run_job(session, job_id, epochs=3)
    jobs.finish_job(session, job_id, status=JobStatus.SUCCEEDED)
    response = client.get(f"/v1/jobs/{job_id}/events")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    stream = parse_sse(response.text)
    assert [e["event"] for e in stream] == ["snapshot", "end"]
    snapshot = stream[0]["data"]
    assert snapshot["job"]["status"] == "succeeded"
    assert [m["epoch"] for m in snapshot["metrics"]] == [1, 2, 3]
    assert stream[0]["id"] == stream[1]["id"] == "3-succeeded-1-0"
    assert stream[1]["data"]["id"] == job_id


def test_a_resume_sends_only_what_was_missed(client, session, make_job):
    job_id = make_job(**QUICK)
    run_job(session, job_id, epochs=3)
    jobs.finish_job(session, job_id, status=JobStatus.FAILED, error="boom")
    response = client.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "1-running-1-0"})
    stream = parse_sse(response.text)
    assert [(e["event"], e["id"]) for e in stream] == [
        ("epoch", "2-running-1-0"),
        ("epoch", "3-running-1-0"),
        ("status", "3-failed-1-0"),
        ("end", "3-failed-1-0"),
    ]
    assert stream[0]["data"]["epoch"] == 2 and stream[2]["data"]["error"] == "boom"
    # Resuming from the last id again gives the end alone: nothing twice.
    again = client.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "3-failed-1-0"})
    assert [e["event"] for e in parse_sse(again.text)] == ["end"]


def test_a_live_stream_gets_status_and_epochs_from_a_notification(
    client, session, make_job, configure
):
    # A re-read every 30 s: what arrives within the stream's 3 s came through Redis pub/sub.
    configure(stream_max_s=3, events_recheck_s=30, events_heartbeat_s=1)
    job_id = make_job(**QUICK)

    def worker():
        time.sleep(0.8)
        with db.session_scope() as own:
            run_job(own, job_id, epochs=1)
        events.publish_changed(job_id)
        events.publish_progress(job_id, {"epoch": 2, "step": 1, "steps": 4, "fraction": 0.4})
        time.sleep(0.3)
        with db.session_scope() as own:
            jobs.record_epochs(own, job_id, [epoch(2)])
        events.publish_changed(job_id)

    thread = threading.Thread(target=worker)
    thread.start()
    started = time.monotonic()
    response = client.get(f"/v1/jobs/{job_id}/events")
    thread.join()
    stream = parse_sse(response.text)
    names = [e.get("event", "ping") for e in stream]
    assert names[0] == "snapshot" and stream[0]["data"]["job"]["status"] == "queued"
    assert stream[0]["data"]["metrics"] == []
    assert names[1:4] == ["status", "epoch", "progress"], names
    assert stream[1]["data"]["status"] == "running" and stream[1]["id"] == "0-running-1-0"
    assert stream[2]["id"] == "1-running-1-0" and stream[3]["id"] == "1-running-1-0-p1"
    assert stream[3]["data"]["fraction"] == 0.4
    assert [e["data"]["epoch"] for e in stream if e.get("event") == "epoch"] == [1, 2]
    assert "ping" in names  # heartbeats every second while nothing happens
    assert "end" not in names and time.monotonic() - started >= 3


def test_a_lost_notification_is_covered_by_the_re_read(client, session, make_job, configure):
    configure(stream_max_s=2, events_recheck_s=0.3)
    job_id = make_job(**QUICK)

    def worker():
        time.sleep(0.5)
        with db.session_scope() as own:
            run_job(own, job_id, epochs=2)  # and no publish at all

    thread = threading.Thread(target=worker)
    thread.start()
    stream = parse_sse(client.get(f"/v1/jobs/{job_id}/events").text)
    thread.join()
    assert [e["event"] for e in stream if "event" in e] == ["snapshot", "status", "epoch", "epoch"]


def test_bad_requests_get_the_uniform_error(client, make_job, configure):
    missing = client.get(f"/v1/jobs/{'0' * 32}/events")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "job_not_found"
    assert client.get("/v1/jobs/nope/events").status_code == 404
    job_id = make_job(**QUICK)
    bad = client.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "x; DROP"})
    assert bad.status_code == 422 and bad.json()["error"]["fields"]
    configure(auth_required=True)
    assert client.get(f"/v1/jobs/{job_id}/events").status_code == 401


def test_events_after_orders_status_epochs_and_end():
    state = JobState(job=b"{}", status="running", attempt=2, cancel=False,
                     epochs=[(1, b"1"), (2, b"2")])  # fmt: skip
    sent, cursor = events_after(Cursor(1, "running", 1, False), state)
    assert [s.split(b"\n")[1] for s in sent] == [b"event: status", b"event: epoch"]
    assert cursor == Cursor(2, "running", 2, False)
    assert events_after(cursor, state) == ([], cursor)  # nothing twice
    assert Cursor.parse(cursor.event_id(7)) == cursor and Cursor.parse("1-x") is None


# --- the log -----------------------------------------------------------------------------------


def write_log(job_id: str, text: bytes) -> None:
    path = joblog.log_path(job_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as handle:
        handle.write(text)


def test_the_log_reads_by_offset_and_says_when_it_is_complete(client, session, make_job):
    job_id = make_job(**QUICK)
    empty = client.get(f"/v1/jobs/{job_id}/log")
    assert empty.status_code == 200 and empty.text == ""
    assert empty.headers["x-log-next-offset"] == "0" and empty.headers["x-log-complete"] == "false"
    run_job(session, job_id)
    write_log(job_id, "=== attempt 1 ===\nepoch 1 ✓\n".encode())
    first = client.get(f"/v1/jobs/{job_id}/log")
    assert first.headers["content-type"] == "text/plain; charset=utf-8"
    assert first.text == "=== attempt 1 ===\nepoch 1 ✓\n"
    assert first.headers["x-log-complete"] == "false"
    next_offset = int(first.headers["x-log-next-offset"])
    assert next_offset == len(first.content)
    write_log(job_id, b"Traceback: boom\n")
    jobs.finish_job(session, job_id, status=JobStatus.FAILED, error="boom")
    rest = client.get(f"/v1/jobs/{job_id}/log", params={"offset": next_offset})
    assert rest.text == "Traceback: boom\n" and rest.headers["x-log-complete"] == "true"
    beyond = client.get(f"/v1/jobs/{job_id}/log", params={"offset": next_offset + 100})
    assert beyond.status_code == 422 and beyond.json()["error"]["fields"][0]["field"] == "offset"
    assert client.get(f"/v1/jobs/{job_id}/log", params={"offset": -1}).status_code == 422
    assert client.get(f"/v1/jobs/{'f' * 32}/log").status_code == 404


def test_following_the_log_streams_until_the_job_ends(client, session, make_job, configure):
    configure(stream_max_s=20)
    job_id = make_job(**QUICK)
    run_job(session, job_id)
    write_log(job_id, b"start\n")

    def trainer():
        for n in range(3):
            time.sleep(0.3)
            write_log(job_id, f"line {n}\n".encode())
        with db.session_scope() as own:
            jobs.finish_job(own, job_id, status=JobStatus.SUCCEEDED)

    thread = threading.Thread(target=trainer)
    thread.start()
    started = time.monotonic()
    response = client.get(f"/v1/jobs/{job_id}/log", params={"offset": 2, "follow": "true"})
    thread.join()
    assert response.headers["x-log-offset"] == "2"
    assert response.text == "art\nline 0\nline 1\nline 2\n"
    assert time.monotonic() - started < 5  # ended with the job, not at stream_max_s


def test_the_log_is_bounded_and_offsets_survive_a_cut(tmp_path, settings):
    path = tmp_path / "trainer.log"
    max_bytes = 64 * 1024
    lines = [f"line {n:06d}\n".encode() for n in range(20_000)]  # 12 bytes each
    with open(path, "ab") as handle:
        for n, line in enumerate(lines):
            handle.write(line)
            if n % 1000 == 999:
                handle.flush()
                joblog.cut_log(path, max_bytes)
    hole = joblog.read_hole(path)
    assert hole is not None and hole.start == max_bytes // 4
    assert path.stat().st_size == 12 * 20_000  # offsets unchanged
    assert os.stat(path).st_blocks * 512 <= max_bytes + 16 * 4096  # the disk holds the bound
    head = joblog.read_log(path, 0, 1 << 30)
    assert head.data == b"".join(lines)[: hole.start] and head.next_offset == hole.start
    after = joblog.read_log(path, hole.start + 5, 1 << 30)  # inside the dropped range
    assert after.start == hole.end and after.data.startswith(b"\n[jumpout: ")
    assert after.data.endswith(lines[-1]) and after.next_offset == path.stat().st_size
    tail = after.data.split(b"log_max_bytes]\n", 1)[1]
    assert b"".join(lines).endswith(tail) and len(tail) > max_bytes // 3
