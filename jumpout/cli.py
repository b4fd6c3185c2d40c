"""Command line: ``python -m jumpout {demo,train,ablation}``.

* ``demo``: trains the mlp on the offline digits set with dropout and with jumpout on the CPU and
  prints both test accuracies side by side (well under a minute).
* ``train``: one run of any (dataset, architecture, method) with the recipe's defaults, every value
  overridable, a live progress bar, checkpoints in ``--out`` and ``--resume`` from the newest one.
* ``ablation``: the eight rows of the paper's Table 1 over ``--seeds N`` seeds, planned by
  `jumpout.experiment` and summarised by `jumpout.report` (mean, intervals, paired comparison to
  the dropout row, the paper's figures) as Markdown, CSV or JSON.

A bad option value or missing dataset files print one line naming the field or files and exit
with status 2 (no traceback). Ctrl-C (or SIGTERM) during ``train`` stops cooperatively after
writing a checkpoint (exit status 130; ``--resume`` continues at that step); a second Ctrl-C
aborts at once.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

from jumpout.spec import ABLATIONS, FIELDS, REQUIRED, ConfigError, TrainConfig, resolve_config

__all__ = ["main", "build_parser"]

# The command line's own defaults for fields (the spec leaves data_dir to whoever trains).
_CLI_DEFAULTS = {"data_dir": "data"}


def _add_run_options(parser: argparse.ArgumentParser, *, method: bool = True) -> None:
    """One option per field of the spec (`jumpout.spec.FIELDS`); unset ones keep the recipe's
    value. Values are parsed and checked by the spec, not by argparse, so a bad one gets the
    spec's message (and exit status 2, see `main`)."""
    groups = {
        "required": parser.add_argument_group("what to train"),
        "regularisation": parser.add_argument_group("regularisation"),
        "optimisation": parser.add_argument_group("optimisation (defaults: the recipe)"),
        "operator": parser.add_argument_group("data, output and device"),
    }
    for name, spec in FIELDS.items():
        if not method and name in ("method", "ablation"):
            continue
        flags = ["--" + name.replace("_", "-"), *spec.flags]
        help_text = f"{spec.help}: {spec.accepted()}"
        if spec.recipe:
            help_text += " (default: the recipe's)"
        if name in REQUIRED:
            group = groups["required"]
        elif name in ("method", "ablation", "dropout_rate", "sigma", "p_min", "p_max"):
            group = groups["regularisation"]
        elif spec.operator or name in ("keep_last", "keep_best", "compile"):
            group = groups["operator"]
        else:
            group = groups["optimisation"]
        if spec.kind == "bool":
            group.add_argument(
                *flags, dest=name, action=argparse.BooleanOptionalAction, help=help_text
            )
            continue
        short_choices = spec.choices and len(spec.choices) <= 4
        metavar = "{" + ",".join(spec.choices) + "}" if short_choices else name.upper()
        group.add_argument(
            *flags,
            dest=name,
            required=name in REQUIRED,
            default=_CLI_DEFAULTS.get(name),
            metavar=metavar,
            help=help_text.replace("%", "%%"),
        )
    parser.add_argument("--download", action="store_true", help="let torchvision fetch the data")


def _fields_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The spec's fields given on the command line, each string parsed by its `FieldSpec`."""
    values = {}
    for key, value in vars(args).items():
        if value is None or key not in FIELDS:  # not a spec field: --download, --resume
            continue
        values[key] = FIELDS[key].parse(value) if isinstance(value, str) else value
    return values


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
    for method in ("dropout", "jumpout"):
        config = resolve_config(
            "digits", "mlp", method=method, epochs=args.epochs, seed=args.seed, device="cpu"
        )
        progress = _Progress(config, f"{method:>7} ", verbose=False)
        started = time.perf_counter()
        try:
            result = fit(config, progress)
        finally:
            progress.close()
        results[method] = (result, time.perf_counter() - started)
    print()
    # The last epoch's test accuracy: no epoch is picked on the test set (and the demo holds
    # out no validation split to pick one on).
    print("| method  | final test acc % | seconds |")
    print("|---------|-----------------:|--------:|")
    for method, (result, seconds) in results.items():
        print(f"| {method:<7} | {_percent(result.final_accuracy):>16} | {seconds:>7.1f} |")
    return 0


def _prepare_data(config: TrainConfig, download: bool) -> None:
    """Fail early (and fetch, if asked) before a model is built."""
    from jumpout.data import load_dataset

    load_dataset(
        config.dataset,
        config.data_dir or ".",
        download=download,
        augment=False,
        train_size=config.train_size,
        test_size=config.test_size,
    )


def _train(args: argparse.Namespace) -> int:
    from jumpout.engine import find_resumable_checkpoint, fit, resolve_device

    config = _config_from_args(args)
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
    try:
        plan = plan_experiment({"base": values, "preset": "table1", "seeds": seeds})
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m jumpout`` and the ``jumpout`` script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
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
