"""Command line: ``python -m jumpout {demo,train,ablation,fetch}``.

* ``demo``: trains the mlp on the offline digits set with dropout and with jumpout on the CPU and
  prints both test accuracies side by side (well under a minute; the wall time it prints includes
  start-up and warm-up and is no speed comparison).
* ``train``: one run of any (dataset, architecture, method) with the recipe's defaults, every value
  overridable, a live progress bar, checkpoints in ``--out`` and ``--resume`` from the newest one.
* ``ablation``: the eight rows of the paper's Table 1 over ``--seeds N`` seeds, planned by
  `jumpout.experiment` and summarised by `jumpout.report` (mean, intervals, paired comparison to
  the dropout row, the paper's figures) as Markdown, CSV or JSON; ``--rows`` trains a subset.
* ``fetch``: downloads data sets' files into a data directory (the only command that reaches the
  network; ``train --download`` too).

A bad option value or missing dataset files print one line naming the field or files and exit
with status 2 (no traceback). Ctrl-C (or SIGTERM) during ``train`` stops cooperatively after
writing a checkpoint (exit status 130; ``--resume`` continues at that step); a second Ctrl-C
aborts at once.

``train --devices N`` (N > 1) launches N ranks with PyTorch's elastic launcher
(`jumpout.distributed.launch`), each running this same command line; rank 0 prints and writes
the checkpoints, the others train quietly. ``torchrun --standalone --nproc-per-node N -m jumpout
train --devices N ...`` does the same. ``ablation`` trains each run on one device.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

from jumpout.spec import (
    ABLATIONS,
    FIELDS,
    ConfigError,
    TrainConfig,
    canonical_ablation,
    resolve_config,
)
from jumpout.spec_options import add_spec_options, spec_values

__all__ = ["main", "build_parser"]

# The command line's own defaults for fields (the spec leaves data_dir to whoever trains).
_CLI_DEFAULTS = {"data_dir": "data"}


def _add_run_options(parser: argparse.ArgumentParser, *, method: bool = True) -> None:
    """One option per field of the spec (`jumpout.spec_options`, shared with the service's
    client); unset ones keep the recipe's value. Values are parsed and checked by the spec, not
    by argparse, so a bad one gets the spec's message (and exit status 2, see `main`)."""
    names = [name for name in FIELDS if method or name not in ("method", "ablation")]
    add_spec_options(parser, names, defaults=_CLI_DEFAULTS)
    parser.add_argument("--download", action="store_true", help="let torchvision fetch the data")


def _fields_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The spec's fields given on the command line, each string parsed by its `FieldSpec`."""
    return spec_values(args)


def _config_from_args(args: argparse.Namespace, **extra: Any) -> TrainConfig:
    """The spec's fields from the command line, each string parsed by its `FieldSpec`."""
    values = _fields_from_args(args)
    values.update(extra)
    return resolve_config(values.pop("dataset"), values.pop("architecture"), **values)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jumpout",
        description="Jumpout: improved dropout for ReLU networks (train, compare, ablate).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo", help="dropout vs jumpout on the offline digits set, on the CPU (< 1 min)"
    )
    demo.add_argument("--epochs", type=int, default=6)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)

    train = commands.add_parser("train", help="train one model with a recipe")
    _add_run_options(train)
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    train.set_defaults(func=_train)

    ablation = commands.add_parser(
        "ablation",
        help="the eight Table-1 variants over seeds, with honest statistics",
        description="Trains the eight rows of the paper's Table 1 ("
        + ", ".join(ABLATIONS)
        + ") with seeds SEED .. SEED+N-1 and prints each row's mean with its 95% CI, the "
        "seed-paired difference to the dropout row (t-test, Wilcoxon, bootstrap CI, wins/ties/"
        "losses) and the paper's figure. Progress goes to stderr, the table to stdout.",
    )
    _add_run_options(ablation, method=False)
    ablation.add_argument(
        "--rows",
        metavar="ROW[,ROW...]",
        help="train only these Table-1 rows (any case; default: all eight): "
        + ", ".join(ABLATIONS)
        + " (dropout is the baseline of the comparison: keep it in)",
    )
    ablation.add_argument(
        "--seeds",
        type=int,
        default=1,
        metavar="N",
        help="train every row with N seeds, SEED .. SEED+N-1 (--seed is the first; default 1)",
    )
    ablation.add_argument(
        "--format",
        choices=("markdown", "csv", "json"),
        default="markdown",
        help="how the report is printed (default: markdown)",
    )
    ablation.set_defaults(func=_ablation)

    fetch = commands.add_parser(
        "fetch",
        help="download data sets' files into --data-dir (torchvision; needs internet access)",
        description="Fills a data directory (a server's JUMPOUT_DATA_DIR, or train's --data-dir) "
        "with the files the loaders read, through torchvision's download, and checks them. "
        "imagenet cannot be downloaded; digits and synthetic need no files.",
    )
    fetch.add_argument(
        "datasets",
        nargs="+",
        metavar="DATASET",
        help="one or more of: " + ", ".join(FIELDS["dataset"].choices),
    )
    fetch.add_argument(
        "--data-dir", default=_CLI_DEFAULTS["data_dir"], help="where to put them (default: data)"
    )
    fetch.add_argument(
        "--svhn-extra",
        action="store_true",
        help="svhn: also its extra split (531,131 images, the paper's train + extra)",
    )
    fetch.set_defaults(func=_fetch)
    return parser


# --------------------------------------------------------------------------------------------
# Progress


class _Progress:
    """A tqdm bar over all steps of a run: epoch, step, running loss, last test accuracy, ETA."""

    def __init__(self, config: TrainConfig, label: str = "", *, verbose: bool = True) -> None:
        self.config = config
        self.label = label
        self.verbose = verbose
        self.bar = None
        self.last_accuracy: float | None = None
        self.stop_requested = False

    def on_step(self, epoch: int, step: int, steps: int, loss: float | None) -> None:
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=self.config.epochs * steps,
                initial=(epoch - 1) * steps + step - 1,
                desc=self.label,
                unit="step",
                dynamic_ncols=True,
                leave=self.verbose,
                file=sys.stderr,
            )
        self.bar.set_description(
            f"{self.label}epoch {epoch}/{self.config.epochs} step {step}/{steps}", refresh=False
        )
        if loss is not None:
            postfix = {"loss": f"{loss:.4f}"}
            if self.last_accuracy is not None:
                postfix["test_acc"] = f"{100 * self.last_accuracy:.2f}%"
            self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)

    def on_epoch_end(self, metrics: dict) -> None:
        self.last_accuracy = metrics["test_accuracy"]
        if self.verbose:
            train_accuracy = 100 * metrics["train_accuracy"]
            test_accuracy = 100 * metrics["test_accuracy"]
            validation = ""
            if metrics.get("val_accuracy") is not None:
                validation = f"  val acc {100 * metrics['val_accuracy']:6.2f}%"
            line = (
                f"epoch {metrics['epoch']:>3}/{self.config.epochs}  "
                f"train loss {metrics['train_loss']:.4f} acc {train_accuracy:6.2f}%"
                f"  test loss {metrics['test_loss']:.4f} acc {test_accuracy:6.2f}%{validation}"
                f"  lr {metrics['lr']:.4g}  {metrics['seconds']:.1f}s"
                f" ({metrics['images_per_second']:.0f} img/s)"
            )
            if self.bar is not None:
                self.bar.write(line, file=sys.stderr)
            else:
                print(line, file=sys.stderr)

    def should_stop(self) -> bool:
        return self.stop_requested

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _percent(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.2f}"


# --------------------------------------------------------------------------------------------
# Commands


def _demo(args: argparse.Namespace) -> int:
    from jumpout.engine import fit

    print(
        f"Training the mlp on scikit-learn's digits for {args.epochs} epochs on the CPU, "
        "once with dropout and once with jumpout (same seed).",
        file=sys.stderr,
    )
    results = {}
    started = time.perf_counter()
    for method in ("dropout", "jumpout"):
        config = resolve_config(
            "digits", "mlp", method=method, epochs=args.epochs, seed=args.seed, device="cpu"
        )
        progress = _Progress(config, f"{method:>7} ", verbose=False)
        try:
            results[method] = fit(config, progress)
        finally:
            progress.close()
    elapsed = time.perf_counter() - started
    print()
    # The last epoch's test accuracy: no epoch is picked on the test set (and the demo holds
    # out no validation split to pick one on). No time per method: a run of seconds is mostly
    # start-up and warm-up (the first run pays the imports and the allocator's), so a seconds
    # column read as "dropout is slower" when it only ran first.
    print("| method  | final test acc % |")
    print("|---------|-----------------:|")
    for method, result in results.items():
        print(f"| {method:<7} | {_percent(result.final_accuracy):>16} |")
    print(
        f"wall time {elapsed:.1f} s for both runs, start-up and warm-up included: not a speed "
        "comparison (for that see benchmarks/ and docs/benchmarks.md)",
        file=sys.stderr,
    )
    return 0


def _prepare_data(config: TrainConfig, download: bool) -> None:
    """Fail early (and fetch, if asked) before a model is built: the same files the training
    reads (on SVHN, the extra split too when svhn_extra is on)."""
    from jumpout.engine import load_config_dataset

    load_config_dataset(config, augment=False, download=download)


def _train_rank(argv: list[str]) -> None:
    """A rank of ``train --devices N`` (the launcher's entry point): this command line again."""
    status = main(argv)
    if status:
        sys.exit(status)  # the launcher sees the failure and stops the other ranks


def _launch_ranks(args: argparse.Namespace, devices: int) -> int:
    """``train --devices N``: N ranks of this command line under PyTorch's launcher; the exit
    status is the failed ranks' (130 when they stopped on Ctrl-C), 0 when all finished."""
    from torch.distributed.elastic.multiprocessing.api import SignalException

    from jumpout.distributed import RanksFailed, launch

    print(f"launching {devices} ranks (torch.distributed)", file=sys.stderr)
    try:
        launch(_train_rank, (args.argv,), devices)
    except RanksFailed as failed:
        codes = set(failed.exit_codes.values())
        if codes == {130}:
            return 130
        print(f"error: {failed}", file=sys.stderr)
        return 1
    except SignalException:  # Ctrl-C reached the ranks too: they checkpointed and stopped
        return 130
    return 0


class _QuietRank:
    """The callback of a rank other than 0: no output, only a stop to notice."""

    stop_requested = False

    def should_stop(self) -> bool:
        return self.stop_requested


def _train_quietly(config: TrainConfig, resume: bool) -> int:
    """A rank other than 0 of ``train --devices N``: rank 0 prints and writes checkpoints."""
    from jumpout.engine import find_resumable_checkpoint, fit

    rank = _QuietRank()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda signum, frame: setattr(rank, "stop_requested", True))
    resume_from = find_resumable_checkpoint(config.out_dir) if resume and config.out_dir else None
    result = fit(config, rank, resume_from=resume_from)
    return 130 if result.stopped else 0


def _train(args: argparse.Namespace) -> int:
    from jumpout.distributed import in_launched_rank
    from jumpout.engine import find_resumable_checkpoint, fit, resolve_device

    config = _config_from_args(args)
    if config.devices > 1 and not in_launched_rank():
        return _launch_ranks(args, config.devices)
    if in_launched_rank() and os.environ["RANK"] != "0":
        return _train_quietly(config, args.resume)
    device = resolve_device(config.device)
    resume_from = None
    if args.resume:
        if not config.out_dir:
            raise ConfigError("out_dir", "--resume needs --out, the directory of the checkpoints")
        resume_from = find_resumable_checkpoint(config.out_dir)
        if resume_from is None:
            print(f"no checkpoint to resume in {config.out_dir}; starting afresh", file=sys.stderr)
        else:
            print(f"resuming from {resume_from}", file=sys.stderr)
    _prepare_data(config, args.download)

    method = config.method if config.ablation is None else f"jumpout ({config.ablation})"
    print(
        f"{config.architecture} on {config.dataset} with {method}: {config.epochs} epochs, "
        f"batch {config.batch_size}, lr {config.lr:g} ({config.schedule}), device {device}",
        file=sys.stderr,
    )
    progress = _Progress(config)
    previous = {}

    def request_stop(signum, frame):
        progress.stop_requested = True
        # A second signal aborts at once.
        signal.signal(signum, previous.get(signum, signal.SIG_DFL))
        print("\nstopping after a checkpoint (again to abort)...", file=sys.stderr)

    for signum in (signal.SIGINT, signal.SIGTERM):
        previous[signum] = signal.signal(signum, request_stop)
    started = time.perf_counter()
    try:
        result = fit(config, progress, resume_from=resume_from)
    finally:
        progress.close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    elapsed = time.perf_counter() - started

    status = "stopped early" if result.stopped else "finished"
    summary = (
        f"{status}: {result.epochs_completed}/{config.epochs} epochs in {elapsed:.1f}s; "
        f"final test accuracy {_percent(result.final_accuracy)}%"
    )
    if result.best_epoch is not None:  # only with a validation split: chosen on it
        summary += (
            f"; best on validation: epoch {result.best_epoch} "
            f"(val {_percent(result.best_val_accuracy)}%, "
            f"test {_percent(result.test_accuracy_at_best)}%)"
        )
    print(summary)
    if result.init_source is not None:
        init = result.init_source
        print(f"started from {init['source']} (sha256 {init['sha256'][:12]}...)")
    env = result.environment
    commit = env.get("git_commit")
    code = f"git {commit[:12]}{' (dirty)' if env.get('git_dirty') else ''}" if commit else "no git"
    print(
        f"environment: jumpout {env.get('jumpout_version')}, {code}, torch {env.get('torch')}, "
        f"{env.get('device')} ({env.get('device_name')}), seed {env.get('seed')}"
        + ("; the full record is in each checkpoint's 'environment'" if config.out_dir else ""),
        file=sys.stderr,
    )
    if result.last_checkpoint:
        print(f"last checkpoint: {result.last_checkpoint}")
    return 130 if result.stopped else 0


def _table1_rows(text: str) -> list[str]:
    """``--rows``: Table-1 row names, comma-separated, any case, each once, in the given order."""
    rows = []
    for part in text.split(","):
        row = canonical_ablation(part)
        if row is None:
            shown = repr(part.strip()[:64])
            raise ConfigError(
                "rows", f"unknown Table-1 row {shown}; accepted: {', '.join(ABLATIONS)}"
            )
        if row not in rows:
            rows.append(row)
    return rows


def _ablation(args: argparse.Namespace) -> int:
    """The Table-1 preset through the one experiment planner and report: each run trained here."""
    import json
    from pathlib import Path

    from jumpout.engine import NonFiniteLossError, fit
    from jumpout.experiment import ExperimentError, plan_experiment
    from jumpout.report import RunOutcome, build_report, mean_layers, report_csv, report_markdown

    values = _fields_from_args(args)
    first_seed = values.pop("seed", 0)
    # An experiment is a client's spec; where and on what it trains is this machine's business.
    operator = {name: values.pop(name) for name in list(values) if FIELDS[name].operator}
    seeds = args.seeds if first_seed == 0 else list(range(first_seed, first_seed + args.seeds))
    request: dict[str, Any] = {"base": values, "preset": "table1", "seeds": seeds}
    if args.rows is not None:
        del request["preset"]
        request["rows"] = [{"label": row, "ablation": row} for row in _table1_rows(args.rows)]
    try:
        plan = plan_experiment(request)
    except ExperimentError as error:
        # The command line's name for the place: the option (seeds, sigma), not a list index.
        field = next(part for part in reversed(error.location) if isinstance(part, str))
        raise ConfigError(field, error.message) from None
    _prepare_data(resolve_config(**plan.base, **operator), args.download)

    runs = plan.runs()
    print(
        f"Table-1 ablation: {plan.architecture} on {plan.dataset}, {len(plan.rows)} rows x "
        f"{len(plan.seeds)} seeds = {len(runs)} runs",
        file=sys.stderr,
    )
    outcomes = []
    for number, run in enumerate(runs, 1):
        out_dir = operator.get("out_dir")
        if out_dir:
            out_dir = str(Path(out_dir) / run.row.label / f"seed{run.seed}")
        config = resolve_config(**{**run.spec, **operator, "out_dir": out_dir})
        progress = _Progress(config, f"{run.row.label:<15} seed {run.seed} ", verbose=False)
        try:
            result = fit(config, progress)
        except NonFiniteLossError as error:
            # A diverged row is a finding (the report lists it as excluded), not a crash.
            outcomes.append(RunOutcome(run.row.label, run.seed, "failed", None))
            print(
                f"[{number}/{len(runs)}] {run.row.label} seed {run.seed}: {error}", file=sys.stderr
            )
            continue
        finally:
            progress.close()
        succeeded = not result.stopped and result.final_accuracy is not None
        outcomes.append(
            RunOutcome(
                run.row.label,
                run.seed,
                "succeeded" if succeeded else "stopped",
                result.final_accuracy,
                layers=mean_layers(metrics.get("layers") for metrics in result.history),
            )
        )
        print(
            f"[{number}/{len(runs)}] {run.row.label} seed {run.seed}: final test accuracy "
            f"{_percent(result.final_accuracy)}%",
            file=sys.stderr,
        )

    report = build_report(plan, outcomes)
    if args.format == "json":
        print(json.dumps(report, indent=2))
    elif args.format == "csv":
        print(report_csv(report), end="")
    else:
        print()
        print(report_markdown(report), end="")
    return 0


def _fetch(args: argparse.Namespace) -> int:
    """Download each named data set's files with torchvision, then check them as the service
    does at submission (`jumpout.catalog.availability`)."""
    from jumpout import catalog
    from jumpout.data import load_dataset

    names = [FIELDS["dataset"].check(name) for name in args.datasets]
    for name in names:
        item = catalog.entry(name)
        extra = name == "svhn" and args.svhn_extra
        if not item.needs_files:
            print(f"{name}: nothing to fetch ({item.how_to_get})", file=sys.stderr)
            continue
        if not item.can_download:
            raise ConfigError("dataset", f"{name} cannot be fetched here: {item.how_to_get}")
        print(f"{name}: fetching into {args.data_dir} ...", file=sys.stderr)
        try:
            load_dataset(
                name,
                args.data_dir,
                download=True,
                augment=False,
                **({"extra": True} if extra else {}),
            )
        except OSError as error:  # no network, a refused connection, a full disk
            raise ConfigError("dataset", f"could not fetch {name}: {error}") from None
        available, reason = catalog.availability(name, args.data_dir, extra=extra)
        if not available:
            raise ConfigError("dataset", reason or name)
        print(f"{name}: ready in {args.data_dir}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m jumpout`` and the ``jumpout`` script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what `train --devices N` relaunches
    from jumpout.data import DatasetNotFoundError
    from jumpout.engine import NonFiniteLossError

    try:
        return args.func(args)
    except (ConfigError, DatasetNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
