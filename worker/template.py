"""The trainer template: a process that has imported torch, jumpout and the store once, and forks
one trainer per job, so that a job does not pay for a fresh interpreter importing torch (about
4 s of a small job's 5 on a 2-core machine, see docs/benchmarks.md).

``python -m worker.template PARENT_PID FD PADDING`` is started by the supervisor (one per Celery
pool process, see ``TrainerTemplate``), talks to it over the ``SOCK_SEQPACKET`` socket ``FD`` and
never touches CUDA: it imports, asserts ``not torch.cuda.is_initialized()``, says it is ready,
and then only forks. It keeps one child forked ahead (a spare, waiting for its job: the fork of
a process with torch loaded takes 15-20 ms), hands it the next job and forks the next spare.
Each child, once it has its job, is what ``python -m worker.trainer JOB_ID`` was:

* its own session and process group (the supervisor stops it and its DataLoader workers with
  ``killpg``), stdin ``/dev/null``, stdout and stderr the job's ``trainer.log`` (the file
  descriptor comes with the request), the supervisor's environment and working directory (sent
  with each request, so a template outlives changes to ``JUMPOUT_*``), fresh database engines;
* ``worker.trainer.main([JOB_ID])``, whose exit code the template reports back as a
  ``subprocess.Popen`` would (negative: killed by that signal);
* ``/proc/PID/cmdline`` reads ``python -m worker.trainer JOB_ID`` (``ps``, ``pgrep`` and the
  operator see which job it trains; the template starts with ``PADDING`` to make room for it);
* it gets SIGTERM when the template dies (``train`` sets the parent-death signal), as the
  template does when the supervisor dies: a lost worker leaves no training behind.

The protocol, one JSON object per message: template -> supervisor ``{"ready": true}`` once;
supervisor -> template ``{"job_id", "env", "cwd"}`` with the log file's descriptor
(``SCM_RIGHTS``); template -> supervisor ``{"started": PID}`` (or ``{"error": TEXT}``), later
``{"exited": PID, "returncode": N}``: the exit code the trainer sends on its channel just
before ``os._exit`` (``{"returncode": N}``; the kernel's teardown of a process with torch
mapped takes 20 ms that no one need wait for), or, for a trainer that died without one, the
status its reaping gives. The template is a child subreaper, so whatever a trainer leaves
behind is reaped here rather than by init.

A spare does the store's first-time work while it waits (``_warm_up``); the template itself
caches the digits arrays and, without CUDA, the provenance record's per-machine part.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("worker.template")

MAX_MESSAGE = 64 * 1024
# Room in the template's argv for the child's "python -m worker.trainer JOB_ID" (a job id is
# 32 hex digits).
TITLE_PADDING = 48
# Below the heartbeat timeout: the supervisor writes no heartbeat while it waits.
READY_TIMEOUT_S = 45.0
WAIT_SLICE_S = 1.0
REPLY_TIMEOUT_S = 30.0
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


class TemplateError(RuntimeError):
    """The template could not start a trainer (not running, not answering, fork failed)."""


# --------------------------------------------------------------------------------------------
# The supervisor's side


class ForkedTrainer:
    """A trainer forked by the template, waited on like a ``subprocess.Popen``: ``pid``,
    ``wait(timeout)`` (raises ``subprocess.TimeoutExpired``), ``returncode``."""

    # The template died while this trainer ran: its exit status went with it. The trainer got
    # SIGTERM (parent-death signal) and checkpointed; the supervisor counts it as a crash.
    LOST = 128 + 64

    def __init__(self, template: TrainerTemplate, pid: int) -> None:
        self.template = template
        self.pid = pid
        self.returncode: int | None = None
        self._template_gone = False

    def poll(self) -> int | None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.wait(timeout=0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is not None:
            return self.returncode
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if not self._template_gone:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    message = self.template.receive(remaining)
                except TemplateError:
                    log.warning("trainer template died while trainer %d ran", self.pid)
                    self._template_gone = True
                    continue
                if message is not None and message.get("exited") == self.pid:
                    self.returncode = int(message["returncode"])
                    return self.returncode
            elif not _alive(self.pid):
                self.returncode = self.LOST
                return self.returncode
            else:
                left = 0.05 if deadline is None else deadline - time.monotonic()
                time.sleep(max(0.0, min(0.05, left)))
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"trainer {self.pid}", timeout)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class TrainerTemplate:
    """The supervisor's handle on its template process (started by ``start``, non-blocking)."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.socket: socket.socket | None = None
        self.ready = False

    def start(self) -> None:
        """Start the template; it imports in the background and says when it is ready."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.process = subprocess.Popen(
                [
                    sys.executable, "-m", "worker.template",
                    str(os.getpid()), str(theirs.fileno()), "-" * TITLE_PADDING,
                ],
                stdin=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )  # fmt: skip
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.socket = ours
        self.ready = False

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """End the template (its trainers get SIGTERM from their parent-death signal)."""
        if self.socket is not None:
            self.socket.close()
            self.socket = None
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def receive(self, timeout: float | None) -> dict | None:
        """The next message, or None after ``timeout`` seconds; TemplateError when the template
        is gone."""
        if self.socket is None:
            raise TemplateError("the trainer template is not running")
        self.socket.settimeout(timeout)
        try:
            data = self.socket.recv(MAX_MESSAGE)
        except TimeoutError:
            return None
        except OSError as error:
            raise TemplateError(f"the trainer template is gone: {error}") from error
        if not data:
            raise TemplateError("the trainer template exited")
        return json.loads(data)

    def fork(
        self,
        job_id: str,
        log_fd: int,
        env: dict[str, str] | None = None,
        *,
        while_waiting: Callable[[], object] | None = None,
    ) -> ForkedTrainer:
        """Fork a trainer for ``job_id`` writing to ``log_fd``, with ``env`` added to its
        environment (its device slots: CUDA is initialised only in the trainer, so its
        ``CUDA_VISIBLE_DEVICES`` applies); raises TemplateError. ``while_waiting`` is called
        about once a second while the template is still importing (the job's heartbeat: on a
        loaded machine the imports took longer than the reaper's heartbeat timeout)."""
        if not self.alive() or self.socket is None:
            raise TemplateError("the trainer template is not running")
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self.ready:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TemplateError(f"the trainer template was not ready in {READY_TIMEOUT_S}s")
            message = self.receive(min(WAIT_SLICE_S, remaining))
            if message is None:
                if while_waiting is not None:
                    while_waiting()
                continue
            self.ready = bool(message.get("ready"))
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        request = json.dumps({"job_id": job_id, "env": env, "cwd": os.getcwd()})
        try:
            socket.send_fds(self.socket, [request.encode()], [log_fd])
        except OSError as error:
            raise TemplateError(f"could not reach the trainer template: {error}") from error
        message = self.receive(REPLY_TIMEOUT_S)
        if message is None:
            raise TemplateError(f"the trainer template did not answer in {REPLY_TIMEOUT_S}s")
        if "started" not in message:
            raise TemplateError(f"the trainer template could not fork: {message.get('error')}")
        return ForkedTrainer(self, int(message["started"]))


# --------------------------------------------------------------------------------------------
# The template's side


def _prctl(option: int, value: int) -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(option, value)


def _set_command_line(words: list[str]) -> None:
    """Rewrite this process's ``/proc/PID/cmdline`` in place (what setproctitle does): the
    original argv strings lie between ``arg_start`` and ``arg_end`` of ``/proc/self/stat``."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        arg_start, arg_end = int(fields[45]), int(fields[46])  # fields 48 and 49
    except (OSError, IndexError, ValueError):
        return
    text = "\0".join(words).encode() + b"\0"
    size = arg_end - arg_start
    if len(text) > size:
        return
    ctypes.memmove(arg_start, text.ljust(size, b"\0"), size)


_CHILD_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)


def _run_child(job_id: str, log_fd: int, env: dict[str, str], cwd: str) -> int:
    """In the forked child, once its job came: become ``python -m worker.trainer JOB_ID`` and
    train."""
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    _set_command_line([sys.executable, "-m", "worker.trainer", job_id])

    from jobstore import db
    from jobstore.settings import get_settings
    from worker import trainer

    get_settings.cache_clear()
    db.forget_inherited_engines()
    return trainer.main([job_id])


_CHILD_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)


class _Spare:
    """A child forked ahead of its job, waiting on ``channel`` for it: forking a process that
    has imported torch takes 15-20 ms, which a job then does not wait for."""

    def __init__(self, inherited: list[int]) -> None:
        """Fork; ``inherited``: the template's descriptors the child closes. Signals are
        blocked across the fork, so that the child never runs the template's handlers (a
        SIGTERM there would exit it as if it had trained)."""
        template_pid = os.getpid()
        self.channel, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sys.stdout.flush()
        sys.stderr.flush()
        signal.pthread_sigmask(signal.SIG_BLOCK, _CHILD_SIGNALS)
        try:
            self.pid = os.fork()
        except BaseException:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _CHILD_SIGNALS)
            self.channel.close()
            theirs.close()
            raise
        if self.pid:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _CHILD_SIGNALS)
            theirs.close()
            return
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            for sig in _CHILD_SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _CHILD_SIGNALS)
            for fd in [*inherited, self.channel.fileno()]:
                with contextlib.suppress(OSError):
                    os.close(fd)
            os.setsid()
            # Idle, it dies with the template (SIGTERM, default action); training sets its own.
            _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
            if os.getppid() != template_pid:
                code = 0
            else:
                _warm_up()
                code = _wait_and_train(theirs)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
            if not isinstance(exit_.code, int | None):
                print(exit_.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            # Skips the interpreter's teardown (and the template's atexit handlers): the exit
            # code is all the supervisor needs, and tearing torch down costs a few hundred ms.
            code = code if isinstance(code, int) else 1
            with contextlib.suppress(BaseException):
                logging.shutdown()
                sys.stdout.flush()
                sys.stderr.flush()
            # The exit code, told before exiting: the kernel's teardown of a process with
            # torch mapped takes 20 ms on a 2-core machine before the template could reap it,
            # and the supervisor (and the next job) need not wait for that.
            with contextlib.suppress(BaseException):
                theirs.send(json.dumps({"returncode": code & 0xFF}).encode())
            os._exit(code)

    def hand(self, data: bytes, log_fd: int) -> None:
        """Give the spare its job (the request and the log's descriptor); OSError if it died.
        The channel stays open: the trainer sends its exit code on it before it exits."""
        try:
            socket.send_fds(self.channel, [data], [log_fd])
        except BaseException:
            self.channel.close()
            raise


def _warm_up() -> None:
    """In a spare, before it waits for its job (the previous job trains meanwhile): the store's
    first-time work every trainer did after its job came, which does not depend on the job
    (about 15 ms of a small job on a 2-core machine, see docs/benchmarks.md). Never fails:
    whatever it misses, the job does.

    The engine, one pooled connection and the trainer's first reads (of a job that does not
    exist: nothing is written; SQLAlchemy compiles each statement once per process), for the
    database the template's environment names: the trainer keeps them when its job's
    environment names the same database (the engines are per process, see `jobstore.db`), else
    it opens its own. No torch here: a spare running torch beside a training job slowed that
    job's epochs by more than it saved (measured, docs/benchmarks.md).
    """
    try:
        from jobstore import db, jobs

        db.get_engine().raw_connection().close()  # back to the engine's pool, open
        nobody = "0" * 32
        with contextlib.suppress(LookupError):
            db.call(jobs.get_job, nobody, retry_for_s=0)
        db.call(jobs.newest_valid_checkpoint, nobody, retry_for_s=0)
        db.call(jobs.cancel_requested, nobody, retry_for_s=0)
    except Exception:  # noqa: BLE001 - a warm-up only; the job does whatever failed here
        log.debug("the spare's warm-up failed", exc_info=True)


def _wait_and_train(channel: socket.socket) -> int:
    data, fds, _, _ = socket.recv_fds(channel, MAX_MESSAGE, 4)
    if not data or len(fds) != 1:
        return 0  # the template is gone (or sent nonsense): nothing was started
    request = json.loads(data)
    return _run_child(request["job_id"], fds[0], request["env"], request["cwd"])


def _send(control: socket.socket, message: dict) -> None:
    with contextlib.suppress(OSError):
        control.send(json.dumps(message).encode())


def serve(control: socket.socket) -> int:
    """Hand each request to a spare child (forking the next spare right after) until the
    supervisor hangs up; report each trainer's exit: the exit code it sends just before it
    exits, or, when it died without one (killed), the status its reaping gives."""
    trainers: dict[int, socket.socket] = {}  # each running trainer's channel
    wakeup_read, wakeup_write = os.pipe()
    os.set_blocking(wakeup_read, False)
    os.set_blocking(wakeup_write, False)
    signal.set_wakeup_fd(wakeup_write)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    selector = selectors.DefaultSelector()
    selector.register(control, selectors.EVENT_READ, "request")
    selector.register(wakeup_read, selectors.EVENT_READ, "child")
    ours = [control.fileno(), wakeup_read, wakeup_write, selector.fileno()]

    def inherited() -> list[int]:
        return [*ours, *(channel.fileno() for channel in trainers.values())]

    spare: _Spare | None = None
    _send(control, {"ready": True})
    while True:
        if spare is None:
            with contextlib.suppress(OSError):
                spare = _Spare(inherited())
        for key, _ in selector.select(timeout=1.0):
            if key.data == "child":
                with contextlib.suppress(BlockingIOError):
                    os.read(wakeup_read, 4096)
                continue
            if key.data != "request":
                _trainer_said(key.data, trainers, selector, control)
                continue
            try:
                data, fds, _, _ = socket.recv_fds(control, MAX_MESSAGE, 4)
            except OSError:
                data, fds = b"", []
            if not data:
                return 0  # the supervisor is gone; our trainers get SIGTERM as we exit
            try:
                if len(fds) != 1:
                    raise ValueError(f"expected one log file descriptor, got {len(fds)}")
                for tries_left in (1, 0):
                    if spare is None:
                        spare = _Spare(inherited())
                    try:
                        spare.hand(data, fds[0])
                        break
                    except OSError:  # it died waiting (killed, out of memory): a fresh one
                        spare = None
                        if not tries_left:
                            raise
                started, channel, spare = spare.pid, spare.channel, None
            except Exception as error:  # noqa: BLE001 - reported to the supervisor, which falls back
                _send(control, {"error": f"{type(error).__name__}: {error}"})
            else:
                trainers[started] = channel
                selector.register(channel, selectors.EVENT_READ, started)
                _send(control, {"started": started})
            finally:
                for fd in fds:
                    with contextlib.suppress(OSError):
                        os.close(fd)
        _reap(trainers, selector, control)


def _forget(pid: int, trainers: dict[int, socket.socket], selector: selectors.BaseSelector) -> None:
    channel = trainers.pop(pid)
    selector.unregister(channel)
    channel.close()


def _trainer_said(
    pid: int,
    trainers: dict[int, socket.socket],
    selector: selectors.BaseSelector,
    control: socket.socket,
) -> None:
    """A trainer's channel is readable: its exit code (it is exiting), or its end closed."""
    try:
        message = json.loads(trainers[pid].recv(MAX_MESSAGE) or b"null")
    except (OSError, ValueError):
        message = None
    if isinstance(message, dict) and isinstance(message.get("returncode"), int):
        _forget(pid, trainers, selector)
        _send(control, {"exited": pid, "returncode": message["returncode"]})
    elif message is None:
        # Closed without a word (it died): the reaping reports it; stop watching the channel.
        selector.unregister(trainers[pid])


def _reap(
    trainers: dict[int, socket.socket],
    selector: selectors.BaseSelector,
    control: socket.socket,
) -> None:
    """Collect every exited child (trainers and whatever they orphaned); report the trainers
    that did not report themselves."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        if pid in trainers:
            with contextlib.suppress(KeyError, ValueError):
                selector.unregister(trainers[pid])
            trainers.pop(pid).close()
            _send(control, {"exited": pid, "returncode": os.waitstatus_to_exitcode(status)})


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2:
        print("usage: python -m worker.template PARENT_PID FD [PADDING]", file=sys.stderr)
        return 2
    parent_pid, fd = int(args[0]), int(args[1])
    # Die with the supervisor, and never fork for an orphaned request.
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent_pid:
        return 0
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # Makes torch.cuda.is_available() use NVML instead of initialising CUDA (see celery_app).
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    control = socket.socket(fileno=fd)

    # What every trainer imports, once. Nothing here may run a torch operation: OpenMP's
    # thread pool does not survive a fork, and CUDA must stay untouched.
    import importlib.readers  # noqa: F401 - opens a package's data files (the digits' CSV)

    import torch
    import torch.utils.serialization  # noqa: F401 - imported by the first torch.save

    import jumpout.data
    import jumpout.engine
    import jumpout.models  # noqa: F401
    import worker.trainer  # noqa: F401
    from jobstore import db, jobs  # noqa: F401

    with contextlib.suppress(ImportError):
        import numpy as np
        import sklearn.datasets  # noqa: F401 - the digits dataset's loader
        import sklearn.model_selection

        # Its first call discovers dataframe plugins (entry points): about 10 ms per trainer.
        labels = np.arange(8) % 2
        sklearn.model_selection.train_test_split(labels, test_size=0.5, stratify=labels)
        # The digits dataset (0.5 MB, numpy only: no torch operation), read and split once and
        # shared copy-on-write by every trainer (25-35 ms each otherwise).
        jumpout.data.digits_arrays(jumpout.data.dataset_info("digits").test_size, 0)
    # The git commit of the code every trainer runs, asked once (two git commands per job
    # otherwise): the code a forked trainer runs is the code imported here.
    with contextlib.suppress(ImportError, AttributeError):
        from jumpout.provenance import git_state

        git_state()
    # Work every trainer's first query and provenance record would repeat: the ORM's mapper
    # configuration and importlib.metadata's scan of the installed packages (cached per path).
    import importlib.metadata

    from sqlalchemy.orm import configure_mappers

    configure_mappers()
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        importlib.metadata.version("jumpout")
    # The provenance record's per-machine part for the CPU (14 ms: cuDNN's version loads its
    # library, the CPU's name), on a machine without CUDA only: on a GPU machine
    # torch.backends.cudnn.version() initialises CUDA, and a forked child could not use CUDA
    # then (seen on an H200); trainers work it out there.
    if not torch.cuda.is_available():
        from jumpout.provenance import environment

        environment(None, device="cpu")

    if torch.cuda.is_initialized():
        raise AssertionError("the trainer template initialised CUDA; it must only fork")
    return serve(control)


if __name__ == "__main__":
    sys.exit(main())
