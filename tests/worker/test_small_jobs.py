"""Small jobs without the per-job overhead: trainers forked by the trainer template
(``worker.template``) behave like ``python -m worker.trainer JOB_ID`` processes, and epochs
shorter than ``checkpoint_interval`` are checkpointed and recorded in batches without a crash
losing an epoch. Real processes, real training (digits/mlp on the CPU), SQLite store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from jobstore import jobs
from jobstore.settings import get_settings
from worker import supervisor
from worker.supervisor import EXIT_FAILED, EXIT_STOPPED, EXIT_SUCCEEDED, EXIT_SUPERSEDED
from worker.template import ForkedTrainer, TrainerTemplate

pytestmark = pytest.mark.timeout(240)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def cpu(job_store, monkeypatch):
    monkeypatch.setenv("JUMPOUT_DEVICE", "cpu")
    monkeypatch.setenv("JUMPOUT_HEARTBEAT_INTERVAL", "0.5")
    get_settings.cache_clear()


@pytest.fixture
def enqueued(monkeypatch) -> list[str]:
    sent: list[str] = []
    monkeypatch.setattr(supervisor, "_enqueue", sent.append)
    monkeypatch.setattr(supervisor, "_dispatch_more", lambda: None, raising=False)
    return sent


@pytest.fixture
def template(cpu) -> TrainerTemplate:
    """This process's template, started from the main thread (it dies with the thread that
    started it, as it does with the supervisor)."""
    started = supervisor.start_template()
    assert started is not None and started.alive()
    return started


def new_job(job_store, *, epochs: int = 2, claim: bool = True, **spec) -> str:
    job = job_store.call(
        jobs.create_job,
        spec={"dataset": "digits", "architecture": "mlp", "epochs": epochs, **spec},
        owner_id=None,
    )
    if claim:
        assert job_store.call(jobs.claim_job, job.id, worker="test") is not None
    return job.id


def recorded_epochs(job_store, job_id: str) -> list[int]:
    return [row.epoch for row in job_store.call(jobs.list_metrics, job_id)]


def start(job_id: str):
    """A trainer for ``job_id`` from ``supervisor.start_trainer``, logging where supervise
    would."""
    out_dir = jobs.job_directory(job_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / supervisor.LOG_FILE, "ab") as log_file:
        return supervisor.start_trainer(job_id, log_file)


def command_line(pid: int) -> list[bytes]:
    return [word for word in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if word]


def wait_for(condition, *, timeout: float = 60.0, what: str):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
    return value


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def parent_id(pid: int) -> int:
    return int(_stat(pid)[1])


def session_id(pid: int) -> int:
    return int(_stat(pid)[3])


# --- the template forks trainers ---------------------------------------------------------------


def test_a_forked_trainer_trains_the_job_and_reports_success(job_store, template):
    job_id = new_job(job_store)
    trainer = start(job_id)
    assert isinstance(trainer, ForkedTrainer)
    # What `python -m worker.trainer JOB_ID` was: its own session, its job in its command line,
    # a child of the template (which dies with us), not of this process.
    # (The child renames itself once it has its job, just after the template's answer.)
    title = [b"-m", b"worker.trainer", job_id.encode()]
    wait_for(lambda: command_line(trainer.pid)[1:] == title, timeout=10, what="the title")
    assert session_id(trainer.pid) == trainer.pid
    assert parent_id(trainer.pid) == template.process.pid
    assert trainer.wait(timeout=120) == EXIT_SUCCEEDED
    assert recorded_epochs(job_store, job_id) == [1, 2]
    assert job_store.call(jobs.newest_valid_checkpoint, job_id).epoch == 2


def test_the_caller_is_called_back_while_a_new_template_still_imports(job_store, cpu):
    # supervise passes the job's heartbeat: a template importing torch on a loaded machine took
    # longer than the reaper's heartbeat timeout, and the job was given to a second attempt.
    supervisor.stop_template()
    job_id = new_job(job_store)
    calls: list[float] = []
    out_dir = jobs.job_directory(job_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / supervisor.LOG_FILE, "ab") as log_file:
        trainer = supervisor.start_trainer(
            job_id, log_file, while_waiting=lambda: calls.append(time.monotonic())
        )
    assert isinstance(trainer, ForkedTrainer)
    assert trainer.wait(timeout=120) == EXIT_SUCCEEDED
    assert calls, "a fresh template imports torch for more than a second"


def test_supervise_runs_consecutive_jobs_on_one_template(job_store, template, enqueued):
    first, second = new_job(job_store), new_job(job_store)
    assert supervisor.supervise(first, attempt=1) == "succeeded"
    assert supervisor.supervise(second, attempt=1) == "succeeded"
    assert supervisor.start_template() is template  # still the same process
    for job_id in (first, second):
        job = job_store.call(jobs.get_job, job_id)
        assert (job.status, job.epoch, job.final_accuracy is not None) == ("succeeded", 2, True)


def test_a_deterministic_failure_is_reported_with_its_exit_code(
    job_store, template, enqueued, unreadable_dataset
):
    unreadable_dataset("cifar10")  # accepted at submission, unreadable when it runs
    job_id = new_job(job_store, dataset="cifar10")
    trainer = start(job_id)
    assert isinstance(trainer, ForkedTrainer)
    assert trainer.wait(timeout=120) == EXIT_FAILED
    reason = (jobs.job_directory(job_id) / supervisor.RESULT_FILE).read_text()
    assert "dataset not found" in reason
    # Worded for an API client: the operator's remedy, no download=True, no server path.
    assert "operator" in reason and "download=True" not in reason
    assert str(get_settings().data_dir) not in reason


def test_a_killed_trainer_is_a_crash_and_the_job_is_requeued(job_store, template, enqueued):
    job_id = new_job(job_store, epochs=300)

    def kill_the_trainer() -> None:
        pids = wait_for(lambda: trainer_pids(job_id), what="the trainer")
        os.kill(pids[0], signal.SIGKILL)

    killer = threading.Thread(target=kill_the_trainer)
    killer.start()
    assert supervisor.supervise(job_id, attempt=1) == "queued"
    killer.join()
    job = job_store.call(jobs.get_job, job_id)
    assert job.status == "queued" and "killed by SIGKILL" in job.error
    assert job.attempt == 1  # counted: the next claim makes it attempt 2
    assert enqueued == [job_id]


def test_sigterm_makes_a_forked_trainer_checkpoint_and_stop(job_store, template):
    job_id = new_job(job_store, epochs=300)
    trainer = start(job_id)
    # Once training runs (an epoch recorded: at the first checkpoint, within the interval).
    wait_for(lambda: recorded_epochs(job_store, job_id), timeout=120, what="a recorded epoch")
    os.killpg(trainer.pid, signal.SIGTERM)
    assert trainer.wait(timeout=60) == EXIT_STOPPED
    newest = job_store.call(jobs.newest_valid_checkpoint, job_id)
    epochs = recorded_epochs(job_store, job_id)
    assert newest is not None and epochs == list(range(1, len(epochs) + 1))
    assert newest.epoch >= epochs[-1]  # the stop's checkpoint covers every recorded epoch


def test_a_trainer_whose_job_went_to_another_attempt_writes_nothing_more(job_store, template):
    # The reaper requeued the job (this attempt's heartbeats were late) and another worker
    # claimed it: the old trainer must neither record, prune nor checkpoint on its way out.
    job_id = new_job(job_store, epochs=400)
    out_dir = jobs.job_directory(job_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / supervisor.LOG_FILE, "ab") as log_file:
        trainer = supervisor.start_trainer(job_id, log_file, env={supervisor.ATTEMPT_ENV: "1"})
    wait_for(lambda: recorded_epochs(job_store, job_id), timeout=120, what="a recorded epoch")
    assert job_store.call(jobs.requeue_job, job_id, attempt=1, error="stale", count_attempt=True)
    assert job_store.call(jobs.claim_job, job_id, worker="another") is not None  # attempt 2
    epochs = recorded_epochs(job_store, job_id)
    records = {(row.path, row.sha256) for row in job_store.call(jobs.list_checkpoints, job_id)}
    assert trainer.wait(timeout=30) == EXIT_SUPERSEDED
    assert len(epochs) < 400, "the job ended before it was handed over"
    assert recorded_epochs(job_store, job_id) == epochs
    after = job_store.call(jobs.list_checkpoints, job_id)
    assert {(row.path, row.sha256) for row in after} == records
    for row in after:  # none pruned or overwritten by the old trainer
        jobs.verify_checkpoint_file(row)
    assert not list(out_dir.glob("checkpoint-*-step*.pt")), "a stop checkpoint was written"
    assert not (out_dir / supervisor.RESULT_FILE).exists()  # the new attempt's to write
    assert "no longer runs as attempt 1" in (out_dir / supervisor.LOG_FILE).read_text()


def test_a_dead_template_is_restarted(job_store, template, enqueued):
    template.process.kill()
    template.process.wait()
    job_id = new_job(job_store)
    assert supervisor.supervise(job_id, attempt=1) == "succeeded"
    restarted = supervisor.start_template()
    assert restarted is not template and restarted.alive()


def test_a_trainer_whose_template_dies_checkpoints_and_counts_as_a_crash(
    job_store, template, enqueued
):
    job_id = new_job(job_store, epochs=300)
    trainer = start(job_id)
    wait_for(lambda: recorded_epochs(job_store, job_id), timeout=120, what="a recorded epoch")
    template.process.kill()  # the trainer's parent-death signal is SIGTERM: it checkpoints
    assert trainer.wait(timeout=60) == ForkedTrainer.LOST
    assert job_store.call(jobs.newest_valid_checkpoint, job_id) is not None
    note = supervisor._describe_exit(ForkedTrainer.LOST)
    assert "template" in note
    supervisor.stop_template()


def test_when_the_template_cannot_fork_the_trainer_is_spawned(job_store, template, monkeypatch):
    from worker.template import TemplateError

    def refuse(self, job_id, log_fd, env=None, **waiting):
        raise TemplateError("no fork today")

    monkeypatch.setattr(TrainerTemplate, "fork", refuse)
    monkeypatch.setattr(supervisor, "_template_failed_in", None)  # restored after the test
    job_id = new_job(job_store)
    trainer = start(job_id)
    try:
        assert isinstance(trainer, subprocess.Popen)
        assert trainer.args == supervisor.trainer_command(job_id)
    finally:
        trainer.kill()
        trainer.wait()
    # A template that failed twice is not started again for every job: spawn from now on.
    assert supervisor._template_failed_in == os.getpid()
    assert supervisor.start_template() is None
    supervisor.stop_template()


def test_the_setting_turns_the_template_off(job_store, cpu, monkeypatch):
    monkeypatch.setenv("JUMPOUT_TRAINER_TEMPLATE", "false")
    get_settings.cache_clear()
    assert supervisor.start_template() is None


def test_the_template_imports_torch_without_initialising_cuda(tmp_path):
    probe = (
        "import os, socket, sys\n"
        "import worker.template as template\n"
        "def report(control):\n"
        "    import torch\n"
        "    print('torch' in sys.modules, torch.cuda.is_initialized())\n"
        "    return 0\n"
        "template.serve = report\n"
        "ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n"
        "sys.exit(template.main([str(os.getppid()), str(theirs.fileno())]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "False"]


def trainer_pids(job_id: str) -> list[int]:
    """Processes whose command line is ``... -m worker.trainer JOB_ID``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                argv = command_line(int(entry))
            except OSError:
                continue
            if b"worker.trainer" in argv and job_id.encode() in argv:
                found.append(int(entry))
    return found


# --- epochs shorter than the checkpoint interval --------------------------------------------------


def test_short_epochs_are_checkpointed_once_per_interval_and_every_epoch_is_recorded(
    job_store, template, enqueued, monkeypatch
):
    monkeypatch.setenv("JUMPOUT_CHECKPOINT_INTERVAL", "3600")
    get_settings.cache_clear()
    job_id = new_job(job_store, epochs=6)
    assert supervisor.supervise(job_id, attempt=1) == "succeeded"
    checkpoints = job_store.call(jobs.list_checkpoints, job_id)
    assert [checkpoint.epoch for checkpoint in checkpoints] == [6]  # only the last
    assert recorded_epochs(job_store, job_id) == [1, 2, 3, 4, 5, 6]
    assert job_store.call(jobs.get_job, job_id).epoch == 6


def test_a_crash_between_checkpoints_loses_no_epoch(job_store, template, enqueued, monkeypatch):
    monkeypatch.setenv("JUMPOUT_CHECKPOINT_INTERVAL", "0.3")
    get_settings.cache_clear()
    epochs = 40
    job_id = new_job(job_store, epochs=epochs)

    def kill_after_the_first_checkpoint() -> None:
        wait_for(
            lambda: job_store.call(jobs.newest_valid_checkpoint, job_id),
            timeout=120,
            what="a checkpoint",
        )
        for pid in trainer_pids(job_id):
            os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_after_the_first_checkpoint)
    killer.start()
    assert supervisor.supervise(job_id, attempt=1) == "queued"
    killer.join()
    kept = job_store.call(jobs.newest_valid_checkpoint, job_id).epoch
    assert kept < epochs
    # Nothing after the newest checkpoint was recorded; the next attempt trains it again.
    assert recorded_epochs(job_store, job_id) == list(range(1, kept + 1))

    assert job_store.call(jobs.claim_job, job_id, worker="test").attempt == 2
    assert supervisor.supervise(job_id, attempt=2) == "succeeded"
    assert recorded_epochs(job_store, job_id) == list(range(1, epochs + 1))
    log = (jobs.job_directory(job_id) / supervisor.LOG_FILE).read_text()
    assert f"checkpoint-epoch{kept:04d}.pt" in log.split("=== attempt 2 ===")[1]


def test_fit_checkpoints_the_last_epoch_and_a_stop_whatever_the_interval(tmp_path):
    from jumpout.engine import fit, list_checkpoints
    from jumpout.spec import resolve_config

    def config(out: Path, epochs: int):
        return resolve_config(
            "digits", "mlp", epochs=epochs, out_dir=str(out), device="cpu", keep_last=100
        )

    fit(config(tmp_path / "done", 3), checkpoint_every_s=3600)
    assert [p.name for p in list_checkpoints(tmp_path / "done")] == ["checkpoint-epoch0003.pt"]

    class StopAfterTwo:
        epochs = 0

        def on_epoch_end(self, metrics):
            self.epochs = metrics["epoch"]

        def should_stop(self):
            return self.epochs >= 2

    result = fit(config(tmp_path / "stopped", 5), [StopAfterTwo()], checkpoint_every_s=3600)
    assert result.stopped
    assert [p.name for p in list_checkpoints(tmp_path / "stopped")] == ["checkpoint-epoch0002.pt"]

    fit(config(tmp_path / "every", 3))  # the default: every epoch
    assert len(list_checkpoints(tmp_path / "every")) == 3


# --- the spare's warm-up and what every trainer shares ------------------------------------------


def test_a_job_whose_database_is_not_the_templates_trains_in_its_own(
    job_store, template, tmp_path, monkeypatch
):
    """The spare warmed up an engine for the template's database; a job whose environment
    names another database must be read and recorded there, not in the warmed one."""
    other_home = tmp_path / "other"
    monkeypatch.setenv("JUMPOUT_HOME", str(other_home))
    monkeypatch.setenv("JUMPOUT_DATABASE_URL", f"sqlite:///{other_home / 'jumpout.db'}")
    get_settings.cache_clear()
    job_store.migrate()
    job_id = new_job(job_store)
    assert start(job_id).wait(timeout=120) == EXIT_SUCCEEDED
    assert recorded_epochs(job_store, job_id) == [1, 2]
    assert job_store.call(jobs.newest_valid_checkpoint, job_id).epoch == 2

    monkeypatch.setenv("JUMPOUT_HOME", str(tmp_path))
    monkeypatch.setenv("JUMPOUT_DATABASE_URL", f"sqlite:///{tmp_path / 'jumpout.db'}")
    get_settings.cache_clear()
    with pytest.raises(LookupError):
        job_store.call(jobs.get_job, job_id)


def test_consecutive_trainers_report_their_exit_codes_in_order(
    job_store, template, enqueued, unreadable_dataset
):
    """Each trainer tells the template its exit code just before exiting (before the kernel
    has torn it down): a success, a deterministic failure and a success again, each reported
    for its own job."""
    unreadable_dataset("imagenet")  # class folders without images: a deterministic failure
    good, bad, good_again = (
        new_job(job_store),
        new_job(job_store, dataset="imagenet"),
        new_job(job_store),
    )
    codes = [start(job_id).wait(timeout=120) for job_id in (good, bad, good_again)]
    assert codes == [EXIT_SUCCEEDED, EXIT_FAILED, EXIT_SUCCEEDED]
    assert recorded_epochs(job_store, good_again) == [1, 2]


def test_the_digits_are_read_once_and_a_load_never_changes_them():
    from sklearn.datasets import load_digits

    from jumpout.data import dataset_info, digits_arrays, load_dataset

    info = dataset_info("digits")
    train, test, _ = load_dataset("digits", ".")
    assert digits_arrays(info.test_size, 0) is digits_arrays(info.test_size, 0)
    for tensor in (*train.tensors, *test.tensors):
        tensor.zero_()  # a caller that changes what it got must not change the next load
    train, test, _ = load_dataset("digits", ".")
    images = load_digits().images.reshape(-1, 64) / 16.0
    pixels = train.tensors[0].reshape(-1, 64).double() * info.std[0] + info.mean[0]
    # Every training image is one of scikit-learn's digits, exactly (to float32 rounding).
    nearest = torch_cdist_min(pixels, images)
    assert nearest.max() < 1e-5
    assert len(train) + len(test) == len(images)
    assert sorted(set(test.tensors[1].tolist())) == list(range(10))


def torch_cdist_min(rows, table):
    import torch

    return torch.cdist(rows, torch.as_tensor(table)).min(dim=1).values


def test_the_provenance_record_is_worked_out_once_per_device_and_copied_per_run():
    from types import SimpleNamespace

    from jumpout import provenance

    provenance._machine_record.cache_clear()
    first = provenance.environment(SimpleNamespace(seed=1), device="cpu")
    first["hostname"] = "changed by a caller"
    second = provenance.environment(
        SimpleNamespace(seed=2), device="cpu", init_source={"source": "x"}
    )
    info = provenance._machine_record.cache_info()
    assert (info.misses, info.hits) == (1, 1)
    assert (second["seed"], second["init_from"], second["device"]) == (2, {"source": "x"}, "cpu")
    assert second["hostname"] != "changed by a caller"
    assert list(second) == list(first)  # the same keys, in the documented order
    assert provenance.environment()["device"] is None


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path, monkeypatch):
    """A migrated store on SQLite (in tmp_path) or PostgreSQL (the session's, emptied)."""
    from jobstore import db

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'jumpout.db'}"
        db.migrate(url)
        yield url
        db.dispose_engines()
        return
    from sqlalchemy import text

    url = request.getfixturevalue("postgres_url")
    with db.get_engine(url).begin() as connection:
        connection.execute(text("TRUNCATE jobs, api_tokens RESTART IDENTITY CASCADE"))
    yield url
    db.dispose_engines()


def test_a_batch_of_epochs_is_upserted_in_one_statement(store_url, tmp_path, monkeypatch):
    from jobstore import db

    monkeypatch.setenv("JUMPOUT_HOME", str(tmp_path))
    monkeypatch.setenv("JUMPOUT_DATABASE_URL", store_url)
    get_settings.cache_clear()

    def epoch(number: int, accuracy: float, seconds: float) -> dict:
        layer = {"name": "fc1", "active_fraction": 0.5, "rate": 0.1, "mean_drift": None}
        return {
            "epoch": number, "train_loss": 1.0, "test_accuracy": accuracy, "test_loss": 1.0,
            "seconds": seconds, "lr": 0.1, "layers": [layer],
        }  # fmt: skip

    job = db.call(jobs.create_job, spec={"dataset": "digits", "architecture": "mlp"}, owner_id=None)
    db.call(jobs.record_epochs, job.id, [epoch(1, 0.5, 1.0), epoch(2, 0.6, 1.0)])
    # A resumed attempt records epoch 2 again (an upsert, not a duplicate) and then epoch 3.
    db.call(jobs.record_epochs, job.id, [epoch(2, 0.7, 2.0), epoch(3, 0.8, 3.0)])
    rows = db.call(jobs.list_metrics, job.id)
    assert [(row.epoch, row.test_accuracy) for row in rows] == [(1, 0.5), (2, 0.7), (3, 0.8)]
    assert rows[0].layers[0]["name"] == "fc1"
    stored = db.call(jobs.get_job, job.id)
    assert (stored.epoch, stored.final_accuracy) == (3, 0.8)
    assert stored.epoch_seconds == pytest.approx(2.0)
    get_settings.cache_clear()
