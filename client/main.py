"""``jumpout-client``: the service from a terminal.

Commands: ``submit`` (the job spec's fields as options, built from and checked by
`jumpout.spec`, as ``python -m jumpout train`` takes them), ``ls``, ``show``, ``watch`` (a live
progress bar from the event stream), ``logs [-f]``, ``cancel``, ``download`` (checksum verified),
and ``experiment submit|ls|show|report|cancel``. ``--json`` on the read commands prints the API's
JSON as it is.

The server and token come from ``--server``/``--token``, else ``JUMPOUT_SERVER``/
``JUMPOUT_TOKEN``, else the config file (`client.config`). What a script needs goes to stdout
(``submit`` prints the new id alone, so ``J=$(jumpout-client submit ...)`` works); messages go to
stderr. A failure is one line, ``error: ...``, and an exit status from the table in
`client.http` (``watch``: 0 succeeded, 1 failed, 3 cancelled, 4 the server was lost).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import quote

import httpx
from rich import box
from rich.console import Console
from rich.table import Table

from client.config import ConfigFileError, resolve_connection
from client.format import duration, percent, scalar, timestamp
from client.http import EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE, ApiClient, ClientError
from client.watch import LostConnection, watch_job
from jumpout.spec import FIELDS, ConfigError
from jumpout.spec_options import add_spec_options, spec_values

__all__ = ["build_parser", "main"]

PROG = "jumpout-client"
STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
METHODS = FIELDS["method"].choices
CLIENT_FIELDS = tuple(name for name, spec in FIELDS.items() if not spec.operator)
"""The spec fields an API client may set (the rest are the server's: paths, device, loaders)."""
PRIORITY_RANGE = (-100, 100)
REPORT_FORMATS = ("markdown", "csv", "json")
EXPERIMENT_KEYS = ("name", "base", "grid", "rows", "preset", "seeds", "baseline", "priority")


class UsageError(Exception):
    """A bad command line caught before anything is sent (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line like every other error of the client."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"error: {message} (see `{self.prog} --help`)\n")


# --------------------------------------------------------------------------------------------
# Output


def _stdout() -> Console:
    # Not a terminal (a pipe, a file): wide, so that ids and tables are never cut or wrapped.
    return Console(width=None if sys.stdout.isatty() else 200, highlight=False)


def _stderr() -> Console:
    return Console(stderr=True, highlight=False)


def _say(message: str) -> None:
    """A human line on stderr (stdout is kept for what scripts read)."""
    print(message, file=sys.stderr)


def _print_json(body: Any) -> None:
    print(json.dumps(body, indent=2, sort_keys=False))


def _job_path(job_id: str, *rest: str) -> str:
    return "/v1/jobs/" + quote(job_id, safe="") + "".join("/" + part for part in rest)


def _experiment_path(experiment_id: str, *rest: str) -> str:
    return "/v1/experiments/" + quote(experiment_id, safe="") + "".join("/" + p for p in rest)


def _job_accuracy(job: dict[str, Any]) -> float | None:
    result = job.get("result") or {}
    if result.get("final_accuracy") is not None:
        return result["final_accuracy"]
    return result.get("latest_accuracy")


def _job_line(job: dict[str, Any]) -> str:
    spec = job.get("spec") or {}
    method = job.get("method") or spec.get("method")
    if spec.get("ablation"):
        method = f"jumpout ({spec['ablation']})"
    epochs = (job.get("progress") or {}).get("epochs") or spec.get("epochs")
    return f"{job.get('architecture')} on {job.get('dataset')} with {method}, {epochs} epochs"


# --------------------------------------------------------------------------------------------
# Jobs


def _submit(api: ApiClient, args: argparse.Namespace) -> int:
    body = {name: value for name, value in spec_values(args).items() if name in CLIENT_FIELDS}
    if args.priority is not None:
        body["priority"] = args.priority
    job = api.post_json("/v1/jobs", body)
    if args.json:
        _print_json(job)
    else:
        print(job["id"])
    _say(f"submitted job {job['id']}: {_job_line(job)} ({job['status']})")
    if args.watch:
        return watch_job(api, job["id"], console=_stderr(), reconnect_for=args.reconnect_for)
    return EXIT_OK


def _list(api: ApiClient, args: argparse.Namespace) -> int:
    params: list[tuple[str, str | int]] = []
    for name in ("status", "method", "dataset", "owner", "experiment_id"):
        params += [(name, value) for value in getattr(args, name) or ()]
    params.append(("limit", args.limit))
    if args.cursor:
        params.append(("cursor", args.cursor))
    page = api.get_json("/v1/jobs", params=params)
    if args.json:
        _print_json(page)
        return EXIT_OK
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("ID", "STATUS", "METHOD", "DATASET", "ARCH", "EPOCH", "TEST ACC", "OWNER"):
        table.add_column(column, no_wrap=True)
    table.add_column("CREATED", no_wrap=True)
    for job in page["items"]:
        progress = job.get("progress") or {}
        status = job["status"] + (" (cancel requested)" if _cancelling(job) else "")
        table.add_row(
            job["id"],
            status,
            job.get("method") or "-",
            job.get("dataset") or "-",
            job.get("architecture") or "-",
            f"{progress.get('epoch', 0)}/{progress.get('epochs', '?')}",
            percent(_job_accuracy(job)),
            job.get("owner") or "-",
            timestamp(job.get("created_at")),
        )
    if page["items"]:
        _stdout().print(table)
    else:
        _say("no jobs")
    if page.get("next_cursor"):
        _say(f"more: {PROG} ls --cursor {page['next_cursor']} (same filters)")
    return EXIT_OK


def _cancelling(job: dict[str, Any]) -> bool:
    return bool(job.get("cancel_requested")) and job["status"] in ("queued", "running")


def _show(api: ApiClient, args: argparse.Namespace) -> int:
    job = api.get_json(_job_path(args.job_id))
    if args.json:
        _print_json(job)
        return EXIT_OK
    progress = job.get("progress") or {}
    result = job.get("result") or {}
    lines = [
        ("job", job["id"]),
        ("status", job["status"] + (", cancel requested" if _cancelling(job) else "")),
        ("what", _job_line(job)),
        ("owner", job.get("owner") or "-"),
        ("attempt", f"{job.get('attempt', 0)} of {job.get('max_attempts', '?')}"),
        ("created", timestamp(job.get("created_at"))),
        ("started", timestamp(job.get("started_at"))),
        ("finished", timestamp(job.get("finished_at"))),
        (
            "progress",
            f"epoch {progress.get('epoch', 0)}/{progress.get('epochs', '?')} "
            f"({100 * (progress.get('fraction') or 0):.0f}%), ETA "
            f"{duration(progress.get('eta_seconds'))}",
        ),
    ]
    if job.get("experiment_id"):
        lines.append(("experiment", job["experiment_id"]))
    queue = job.get("queue")
    if queue:
        lines.append(("queue", f"position {queue['position']} ({queue['reason']})"))
    lines.append(("final test acc", percent(result.get("final_accuracy"))))
    if "latest_accuracy" in result:
        lines.append(("latest test acc", percent(result.get("latest_accuracy"))))
    if result.get("best_epoch") is not None:
        lines.append(
            (
                "best (validation)",
                f"epoch {result['best_epoch']}: val {percent(result.get('best_val_accuracy'))}, "
                f"test {percent(result.get('test_accuracy_at_best'))}",
            )
        )
    if job.get("error"):
        lines.append(("error", job["error"]))
    width = max(len(key) for key, _ in lines)
    for key, value in lines:
        print(f"{key + ':':<{width + 1}} {value}")
    spec = job.get("spec") or {}
    if spec:
        print("spec:")
        for key, value in spec.items():
            print(f"  {key} = {scalar(value)}")
    return EXIT_OK


def _watch(api: ApiClient, args: argparse.Namespace) -> int:
    return watch_job(api, args.job_id, console=_stderr(), reconnect_for=args.reconnect_for)


def _cancel(api: ApiClient, args: argparse.Namespace) -> int:
    job = api.post_json(_job_path(args.job_id, "cancel"))
    if args.json:
        _print_json(job)
    if job["status"] == "cancelled":
        _say(f"job {job['id']} cancelled")
    else:
        _say(f"cancel requested for job {job['id']} ({job['status']}): it stops at its next check")
    return EXIT_OK


LOG_READ_TIMEOUT = 60.0  # a quiet follow is re-opened (cheaply) rather than trusted forever


def _logs(api: ApiClient, args: argparse.Namespace) -> int:
    """Plain reads page with ``X-Log-Next-Offset`` until nothing is left; ``-f`` follows (the
    body is contiguous from ``X-Log-Offset``), and whenever a follow closes (the job ended, the
    server's time limit, a range dropped to bound the file, a broken connection) the plain
    reads say what is left and whether that is all (``X-Log-Complete``)."""
    path = _job_path(args.job_id, "log")
    offset, complete = _read_log_pages(api, path, args.offset)
    if not args.follow or complete:
        return EXIT_OK
    timeout = httpx.Timeout(10.0, read=LOG_READ_TIMEOUT)
    out = sys.stdout.buffer
    while True:
        try:
            with api.http.stream(
                "GET", path, params={"offset": offset, "follow": "true"}, timeout=timeout
            ) as response:
                api.check(response)
                offset = int(response.headers.get("X-Log-Offset", offset))
                for chunk in response.iter_bytes():
                    out.write(chunk)
                    out.flush()
                    offset += len(chunk)
        except httpx.HTTPError as error:
            if not isinstance(error, httpx.ReadTimeout):
                _say(f"(reconnecting: {str(error) or type(error).__name__})")
                time.sleep(1.0)
        offset, complete = _read_log_pages(api, path, offset)
        if complete:
            return EXIT_OK


def _read_log_pages(api: ApiClient, path: str, offset: int) -> tuple[int, bool]:
    """Print the log from `offset` as it is now; the next offset and whether the log is whole."""
    out = sys.stdout.buffer
    while True:
        response = api.request("GET", path, params={"offset": offset})
        out.write(response.content)
        out.flush()
        next_offset = int(response.headers.get("X-Log-Next-Offset", offset + len(response.content)))
        complete = response.headers.get("X-Log-Complete", "").lower() == "true"
        if complete or next_offset <= offset:
            return next_offset, complete
        offset = next_offset


def _checkpoint_choice(args: argparse.Namespace) -> tuple[str, str]:
    """The guessable name of the checkpoint asked for, and how to say it."""
    if args.epoch is not None:
        return f"epoch/{args.epoch}", f"the epoch-{args.epoch} checkpoint"
    if args.best:
        return "best", "the best checkpoint (chosen on the validation split)"
    return "latest", "the latest checkpoint"


def _download(api: ApiClient, args: argparse.Namespace) -> int:
    name, described = _checkpoint_choice(args)
    path = _job_path(args.job_id, "checkpoints", name, "file")
    try:
        return _download_file(api, path, args.output)
    except ClientError as error:
        if not _route_missing(error):
            raise
    # A server without the guessable names: pick the checkpoint from the list.
    checkpoints = api.get_json(_job_path(args.job_id, "checkpoints"))["items"]
    if args.epoch is not None:
        chosen = [item for item in checkpoints if item["epoch"] == args.epoch]
    elif args.best:
        chosen = [item for item in checkpoints if item.get("is_best")]
    else:
        chosen = sorted(checkpoints, key=lambda item: (item["epoch"], item["id"]))[-1:]
    if not chosen:
        raise ClientError(f"job {args.job_id} has no {described.removeprefix('the ')}")
    return _download_file(api, _job_path(args.job_id, "checkpoints", str(chosen[-1]["id"]), "file"),
                          args.output)  # fmt: skip


def _route_missing(error: ClientError) -> bool:
    # An older server: `/checkpoints/latest/file` meets the numeric `{checkpoint_id}` route
    # (a 422 on checkpoint_id) and `/checkpoints/epoch/3/file` no route at all.
    return "checkpoint_id" in error.message or "(is it an older version?)" in error.message


def _download_file(api: ApiClient, path: str, output: str | None) -> int:
    with api.stream("GET", path) as response:
        expected = response.headers.get("X-Checksum-SHA256")
        if not expected:
            raise ClientError(f"the server sent no X-Checksum-SHA256 for {path}: not saved")
        name = _attachment_name(response.headers.get("Content-Disposition")) or "checkpoint.pt"
        target = Path(output) if output else Path(name)
        if output and (output.endswith(os.sep) or target.is_dir()):
            target = target / name
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.part")
        digest = hashlib.sha256()
        size = 0
        try:
            with open(partial, "wb") as file:
                for chunk in response.iter_bytes():
                    file.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
            if digest.hexdigest() != expected.lower():
                raise ClientError(
                    f"the downloaded file's sha256 {digest.hexdigest()} does not match the "
                    f"server's {expected}: not saved (try again)"
                )
            os.replace(partial, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()
    print(target)
    _say(f"downloaded {target} ({size} bytes), sha256 {expected[:12]}... verified")
    return EXIT_OK


def _attachment_name(header: str | None) -> str | None:
    """The file name of a Content-Disposition header, reduced to a safe base name."""
    if not header:
        return None
    match = re.search(r"filename\*=utf-8''([^;]+)|filename=\"?([^\";]+)\"?", header, re.I)
    if not match:
        return None
    name = Path(match.group(1) or match.group(2)).name
    return name if re.fullmatch(r"[\w.+-]{1,200}", name) and not name.startswith(".") else None


# --------------------------------------------------------------------------------------------
# Experiments


def _field_value(name: str, text: str, where: str) -> Any:
    if name not in CLIENT_FIELDS:
        raise ConfigError(f"{where}.{name}", f"unknown field; accepted: {', '.join(CLIENT_FIELDS)}")
    return FIELDS[name].parse(text)


def _assignments(items: Sequence[str], where: str) -> list[tuple[str, str]]:
    pairs = []
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise UsageError(f"--{where} takes FIELD=VALUE, got {item!r}")
        pairs.append((name.strip().replace("-", "_"), value))
    return pairs


def _seeds(text: str) -> int | list[int]:
    try:
        if "," in text:
            return [int(part) for part in text.split(",") if part.strip()]
        return int(text)
    except ValueError:
        raise UsageError(
            f"--seeds takes a count (5) or a list of seeds (0,1,2), got {text!r}"
        ) from None


def _experiment_request(args: argparse.Namespace) -> dict[str, Any]:
    """The request from the JSON file (if any), with the options on top of it."""
    request: dict[str, Any] = {}
    if args.file:
        try:
            text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
            request = json.loads(text)
        except OSError as error:
            raise UsageError(f"cannot read {args.file}: {error.strerror}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise UsageError(f"{args.file} is not JSON: {error}") from None
        if not isinstance(request, dict):
            raise UsageError(f"{args.file} must hold a JSON object (an experiment)")
    base = dict(request.get("base") or {})
    for name, text in _assignments(args.base or (), "base"):
        base[name] = _field_value(name, text, "base")
    if base or "base" in request:
        request["base"] = base
    grid = dict(request.get("grid") or {})
    for name, text in _assignments(args.grid or (), "grid"):
        # A grid's values are separated by commas; a milestones list's epochs then by ';'.
        separator = ";" if FIELDS.get(name) and FIELDS[name].kind == "epochs" else ","
        parts = [part.replace(";", ",") for part in text.split(separator) if part.strip()]
        grid[name] = [_field_value(name, part, "grid") for part in parts]
    if grid:
        request["grid"] = grid
    for key in ("name", "preset", "baseline", "priority"):
        value = getattr(args, key)
        if value is not None:
            request[key] = None if key == "baseline" and value.lower() == "none" else value
    if args.seeds is not None:
        request["seeds"] = _seeds(args.seeds)
    if "base" not in request:
        raise UsageError("an experiment needs a base spec: --base dataset=... --base "
                         "architecture=... (or a JSON file)")  # fmt: skip
    if "seeds" not in request:
        request["seeds"] = 1
    return request


def _experiment_submit(api: ApiClient, args: argparse.Namespace) -> int:
    experiment = api.post_json("/v1/experiments", _experiment_request(args))
    if args.json:
        _print_json(experiment)
    else:
        print(experiment["id"])
    name = f" {experiment['name']!r}" if experiment.get("name") else ""
    _say(
        f"submitted experiment{name} {experiment['id']}: {len(experiment.get('rows') or [])} "
        f"rows x {len(experiment.get('seeds') or [])} seeds = {experiment['job_count']} jobs"
    )
    return EXIT_OK


def _experiment_list(api: ApiClient, args: argparse.Namespace) -> int:
    page = api.get_json("/v1/experiments", params={"limit": args.limit})
    if args.json:
        _print_json(page)
        return EXIT_OK
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("ID", "NAME", "PRESET", "JOBS", "DONE", "RUNNING", "FAILED", "ETA", "CREATED"):
        table.add_column(column, no_wrap=True)
    for item in page["items"]:
        counts, progress = item["counts"], item["progress"]
        table.add_row(
            item["id"],
            item.get("name") or "-",
            item.get("preset") or "-",
            str(item["job_count"]),
            f"{progress['finished']}/{progress['total']}",
            str(counts["running"]),
            str(counts["failed"]),
            duration(progress.get("eta_seconds")),
            timestamp(item.get("created_at")),
        )
    if page["items"]:
        _stdout().print(table)
    else:
        _say("no experiments")
    return EXIT_OK


def _experiment_show(api: ApiClient, args: argparse.Namespace) -> int:
    experiment = api.get_json(_experiment_path(args.experiment_id))
    if args.json:
        _print_json(experiment)
        return EXIT_OK
    counts, progress = experiment["counts"], experiment["progress"]
    print(f"experiment: {experiment['id']}" + (f" ({experiment['name']})" if experiment.get(
        "name") else ""))  # fmt: skip
    print(f"owner: {experiment.get('owner') or '-'}")
    print(f"base: {', '.join(f'{k}={scalar(v)}' for k, v in experiment['base'].items())}")
    print(f"rows: {', '.join(row['label'] for row in experiment['rows'])}")
    print(f"seeds: {', '.join(str(seed) for seed in experiment['seeds'])}")
    print(f"baseline: {experiment.get('baseline') or '-'}")
    print("jobs: " + ", ".join(f"{counts[status]} {status}" for status in STATUSES))
    print(
        f"progress: {progress['finished']}/{progress['total']} finished, epochs "
        f"{progress['epochs_done']}/{progress['epochs_total']}, ETA "
        f"{duration(progress.get('eta_seconds'))}"
        + (" (cancel requested)" if experiment.get("cancel_requested") else "")
    )
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("JOB", "ROW", "SEED", "STATUS", "EPOCH", "FINAL TEST ACC"):
        table.add_column(column, no_wrap=True)
    for job in experiment["jobs"]:
        table.add_row(
            job["id"],
            job.get("row_label") or "-",
            "-" if job.get("seed") is None else str(job["seed"]),
            job["status"],
            f"{job['epoch']}/{job['epochs']}",
            percent(job.get("final_accuracy")),
        )
    _stdout().print(table)
    return EXIT_OK


def _experiment_report(api: ApiClient, args: argparse.Namespace) -> int:
    response = api.request(
        "GET", _experiment_path(args.experiment_id, "report"), params={"format": args.format}
    )
    if args.format == "json":
        _print_json(response.json())
    else:
        sys.stdout.write(response.text)
        if not response.text.endswith("\n"):
            sys.stdout.write("\n")
    return EXIT_OK


def _experiment_cancel(api: ApiClient, args: argparse.Namespace) -> int:
    experiment = api.post_json(_experiment_path(args.experiment_id, "cancel"))
    if args.json:
        _print_json(experiment)
    counts = experiment["counts"]
    _say(
        f"cancel requested for experiment {experiment['id']}: {counts['cancelled']} cancelled, "
        f"{counts['running']} running (they stop at their next check)"
    )
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# The parser


def _connection_options() -> argparse.ArgumentParser:
    # SUPPRESS: the options work before or after the command; the last one given wins.
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("server")
    group.add_argument(
        "--server",
        default=argparse.SUPPRESS,
        help="the API's base URL (else $JUMPOUT_SERVER, the config file, http://127.0.0.1:8000)",
    )
    group.add_argument(
        "--token",
        default=argparse.SUPPRESS,
        help="the API token (else $JUMPOUT_TOKEN, the config file's `token`)",
    )
    return parent


def _int_in(low: int, high: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in [{low}, {high}], got {value}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    connection = _connection_options()
    parser = _Parser(
        prog=PROG,
        description="The jumpout training service from a terminal. Exit status: 0 success; "
        "1 refused by the server (or, for watch, the job failed); 2 usage; 3 the watched job "
        "was cancelled; 4 server unreachable or lost.",
        parents=[connection],
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     parser_class=_Parser)  # fmt: skip

    def command(name: str, func, help_text: str, *, under=commands, **kwargs):
        sub = under.add_parser(name, help=help_text, parents=[connection], **kwargs)
        sub.set_defaults(func=func)
        return sub

    def json_option(sub) -> None:
        sub.add_argument("--json", action="store_true", help="print the API's JSON as it is")

    def reconnect_option(sub) -> None:
        sub.add_argument(
            "--reconnect-for",
            type=float,
            default=30.0,
            metavar="SECONDS",
            help="how long to keep trying to resume a dropped event stream (default 30)",
        )

    submit = command(
        "submit",
        _submit,
        "submit a training job; prints its id",
        description="Submit a job. Every field of the job spec is an option, with the bounds "
        "and choices of `python -m jumpout train` and the API; unset ones take the recipe's "
        "defaults. Prints the job id on stdout.",
    )
    add_spec_options(submit, CLIENT_FIELDS)
    submit.add_argument(
        "--priority",
        type=_int_in(*PRIORITY_RANGE),
        help=f"an integer in [{PRIORITY_RANGE[0]}, {PRIORITY_RANGE[1]}]: higher starts first "
        "among your own queued jobs (default 0)",
    )
    submit.add_argument("--watch", action="store_true", help="then watch it (as `watch`)")
    json_option(submit)
    reconnect_option(submit)

    ls = command("ls", _list, "list jobs, newest first")
    ls.add_argument("--status", action="append", choices=STATUSES, help="repeatable")
    ls.add_argument("--method", action="append", choices=METHODS, help="repeatable")
    ls.add_argument("--dataset", action="append", help="repeatable")
    ls.add_argument("--owner", action="append", help="a token name; repeatable")
    ls.add_argument("--experiment", dest="experiment_id", action="append", help="repeatable")
    ls.add_argument("--limit", type=_int_in(1, 500), default=20, help="default 20")
    ls.add_argument("--cursor", help="the next page (printed after a full page)")
    json_option(ls)

    show = command("show", _show, "a job: status, progress, result, error and spec")
    show.add_argument("job_id", metavar="JOB_ID")
    json_option(show)

    watch = command(
        "watch",
        _watch,
        "follow a job live to its end (exit 0 succeeded, 1 failed, 3 cancelled, 4 lost)",
    )
    watch.add_argument("job_id", metavar="JOB_ID")
    reconnect_option(watch)

    logs = command("logs", _logs, "the trainer's output (-f: follow until the job ends)")
    logs.add_argument("job_id", metavar="JOB_ID")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new output")
    logs.add_argument("--offset", type=_int_in(0, 2**53), default=0, help="start at this byte")

    cancel = command("cancel", _cancel, "cancel a job (it stops at its next check)")
    cancel.add_argument("job_id", metavar="JOB_ID")
    json_option(cancel)

    download = command(
        "download", _download, "download a checkpoint, its sha256 verified; prints the path"
    )
    download.add_argument("job_id", metavar="JOB_ID")
    which = download.add_mutually_exclusive_group()
    which.add_argument("--epoch", type=_int_in(1, 2**31 - 1), help="the checkpoint of epoch N")
    which.add_argument("--best", action="store_true", help="the best on the validation split")
    which.add_argument("--latest", action="store_true", help="the newest (the default)")
    download.add_argument(
        "-o", "--output", metavar="PATH", help="file or directory (default: the server's name)"
    )

    experiment = commands.add_parser(
        "experiment", help="experiments: submit, ls, show, report, cancel", parents=[connection]
    )
    experiment_commands = experiment.add_subparsers(
        dest="experiment_command", required=True, metavar="COMMAND", parser_class=_Parser
    )
    exp_submit = command(
        "submit",
        _experiment_submit,
        "submit rows x seeds as jobs; prints the experiment's id",
        under=experiment_commands,
        description="An experiment from a JSON file (the body of POST /v1/experiments) and/or "
        "options, which override the file's keys. Example: experiment submit --base "
        "dataset=digits --base architecture=mlp --base epochs=5 --preset table2 --seeds 3",
    )
    exp_submit.add_argument("file", nargs="?", metavar="FILE", help="JSON file, - for stdin")
    exp_submit.add_argument("--name")
    exp_submit.add_argument("--preset", choices=("table1", "table2"))
    exp_submit.add_argument(
        "--base", action="append", metavar="FIELD=VALUE", help="a job spec field; repeatable"
    )
    exp_submit.add_argument(
        "--grid",
        action="append",
        metavar="FIELD=V1,V2",
        help="a field and its values (rows: every combination); repeatable",
    )
    exp_submit.add_argument("--seeds", help="a count n (seeds 0..n-1) or a list 0,1,2 (default 1)")
    exp_submit.add_argument("--baseline", help="the row compared against (none: no comparison)")
    exp_submit.add_argument("--priority", type=_int_in(*PRIORITY_RANGE))
    json_option(exp_submit)

    exp_ls = command("ls", _experiment_list, "list experiments", under=experiment_commands)
    exp_ls.add_argument("--limit", type=_int_in(1, 500), default=20)
    json_option(exp_ls)

    exp_show = command(
        "show", _experiment_show, "an experiment and its jobs", under=experiment_commands
    )
    exp_show.add_argument("experiment_id", metavar="EXPERIMENT_ID")
    json_option(exp_show)

    exp_report = command(
        "report",
        _experiment_report,
        "print the report table (mean, 95%% CI, paired comparison with the baseline)",
        under=experiment_commands,
    )
    exp_report.add_argument("experiment_id", metavar="EXPERIMENT_ID")
    exp_report.add_argument("--format", choices=REPORT_FORMATS, default="markdown")

    exp_cancel = command(
        "cancel", _experiment_cancel, "cancel every unfinished job", under=experiment_commands
    )
    exp_cancel.add_argument("experiment_id", metavar="EXPERIMENT_ID")
    json_option(exp_cancel)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``jumpout-client`` script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        connection = resolve_connection(getattr(args, "server", None), getattr(args, "token", None))
        with ApiClient(connection) as api:
            return args.func(api, args)
    except ConfigError as error:  # a spec value refused before sending, as `jumpout train` does
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (UsageError, ConfigFileError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except ClientError as error:
        print(f"error: {error.message}", file=sys.stderr)
        return error.exit_code
    except LostConnection as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        print("interrupted (a job on the server goes on)", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `jumpout-client ls | head`: the reader left; say nothing more.
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - flushed at exit, never read
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
