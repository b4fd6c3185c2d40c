"""Experiments: a grid of training runs over seeds, planned and validated in one place.

An experiment request names a ``base`` job spec (data set, architecture and any overrides, no
seed), its rows (exactly one of a ``grid``, explicit ``rows`` or a ``preset`` of the paper's
tables) and its ``seeds``. `plan_experiment` checks the whole request before anything is stored
or trained: every row is resolved once with `jumpout.spec.resolve_config`, and every refusal is an
`ExperimentError` whose ``location`` names the part of the request at fault, e.g.
``("rows", 2, "sigma")``, ``("grid", "sigma")``, ``("base", "seed")``, ``("seeds",)``.

The resulting `ExperimentPlan` is what the service stores (`ExperimentPlan.to_dict`) and what both
the service and ``python -m jumpout ablation`` expand into runs (`ExperimentPlan.runs`): one client
job spec per (row, seed), ``{**base, **row.params, "seed": seed}``. The fields set by whoever runs
the training (``data_dir``, ``out_dir``, ``device``, ``num_workers``) are not part of an
experiment; the runner adds its own, as the server adds its fields to a job.

`paper_accuracy` gives the paper's Table 1 and Table 2 figures, so a report can put ours beside
them. This module imports neither torch nor numpy: the API process uses it.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from jumpout.spec import (
    FIELDS,
    REQUIRED,
    TABLE1_ROWS,
    ConfigError,
    Method,
    canonical_ablation,
    resolve_config,
)

__all__ = [
    "MAX_LABEL_LENGTH",
    "MAX_NAME_LENGTH",
    "MAX_ROWS",
    "MAX_SEEDS",
    "METRIC",
    "PAPER_TABLE1",
    "PAPER_TABLE2",
    "PRESETS",
    "ExperimentError",
    "ExperimentPlan",
    "Row",
    "Run",
    "paper_accuracy",
    "plan_experiment",
]

PRESETS = ("table1", "table2")
METRIC = "final_test_accuracy"
MAX_NAME_LENGTH = 128
MAX_LABEL_LENGTH = 128
# Hard ceilings whatever the caller's max_jobs: a grid is expanded in memory, so its size is
# checked before it is built.
MAX_ROWS = 1000
MAX_SEEDS = 1000

REQUEST_KEYS = ("name", "base", "grid", "rows", "preset", "seeds", "baseline")
_ROW_SOURCES = ("grid", "rows", "preset")
_SEED_SPEC = FIELDS["seed"]

# --------------------------------------------------------------------------------------------
# The paper's figures (test accuracy in percent). Columns are (dataset, architecture) pairs.

_CIFAR10_SMALL = ("cifar10", "cnn_small")
_CIFAR10 = ("cifar10", "wrn_28_10")
_CIFAR100 = ("cifar100", "wrn_28_10")
_STL10 = ("stl10", "wrn_16_8")
_FASHION = ("fashion_mnist", "resnet_preact_20")
_SVHN = ("svhn", "wrn_16_8")
_IMAGENET = ("imagenet", "resnet18")

PAPER_COLUMNS: dict[tuple[str, str], str] = {
    _CIFAR10_SMALL: "CIFAR10(s)",
    _CIFAR10: "CIFAR10",
    _CIFAR100: "CIFAR100",
    _FASHION: "Fashion",
    _STL10: "STL10",
    _SVHN: "SVHN",
    _IMAGENET: "ImageNet",
}
"""The paper's column heading of each (dataset, architecture) pair of Tables 1 and 2."""


def _table1_column(values: tuple[float, ...]) -> dict[str, float]:
    # The paper's row order: Dropout, +I, +I+II, +II, +II+III, +III, +III+I, Jumpout.
    names = (
        "dropout",
        "dropout+I",
        "dropout+I+II",
        "dropout+II",
        "dropout+II+III",
        "dropout+III",
        "dropout+I+III",
        "jumpout",
    )
    return dict(zip(names, values, strict=True))


PAPER_TABLE1: dict[tuple[str, str], dict[str, float]] = {
    _CIFAR10_SMALL: _table1_column((86.50, 87.56, 90.06, 87.14, 89.64, 87.70, 87.36, 90.24)),
    _CIFAR10: _table1_column((95.23, 96.06, 96.35, 95.67, 96.74, 96.20, 96.45, 96.82)),
    _CIFAR100: _table1_column((79.41, 79.89, 81.70, 80.24, 80.61, 80.59, 81.20, 82.48)),
    _STL10: _table1_column((81.37, 81.76, 82.09, 81.94, 82.22, 81.69, 82.18, 84.02)),
}
"""Table 1 (ablation of modifications I, II and III), by column, by `TABLE1_ROWS` name."""

PAPER_TABLE2: dict[tuple[str, str], dict[str, float]] = {
    _CIFAR10_SMALL: {"dropout": 86.50, "jumpout": 90.24},
    _CIFAR10: {"dropout": 95.23, "jumpout": 96.82},
    _CIFAR100: {"dropout": 79.41, "jumpout": 82.48},
    _FASHION: {"dropout": 96.09, "jumpout": 97.17},
    _STL10: {"dropout": 81.37, "jumpout": 84.02},
    _SVHN: {"dropout": 98.22, "jumpout": 98.51},
    _IMAGENET: {"dropout": 71.15, "jumpout": 71.48},
}
"""Table 2 (dropout against jumpout), by column. Its OCR has a stray ':' column; the values
here follow the headings: Fashion is 96.09 / 97.17."""


def paper_accuracy(label: str, dataset: str, architecture: str) -> float | None:
    """The paper's test accuracy (percent) for a Table-1/2 row name on a (dataset,
    architecture) pair, or None where the paper has no such cell.

    ``label`` is any spelling `jumpout.spec.canonical_ablation` accepts ("Dropout+III+I" too).
    """
    row = canonical_ablation(label) if isinstance(label, str) else None
    if row is None:
        return None
    column = (dataset, architecture)
    value = PAPER_TABLE1.get(column, {}).get(row)
    if value is None:
        value = PAPER_TABLE2.get(column, {}).get(row)
    return value


# --------------------------------------------------------------------------------------------
# The plan


class ExperimentError(ValueError):
    """An experiment request that cannot be accepted.

    Args:
        location: where in the request, e.g. ``("rows", 2, "sigma")``, ``("seeds",)``.
        message: what is wrong and what would be accepted.
    """

    def __init__(self, location: tuple[str | int, ...], message: str) -> None:
        self.location = tuple(location)
        self.message = message
        super().__init__(f"{'.'.join(str(part) for part in self.location)}: {message}")


@dataclass(frozen=True)
class Row:
    """One row of an experiment: its label and its overrides on top of the base spec."""

    label: str
    params: dict[str, Any]


@dataclass(frozen=True)
class Run:
    """One training run of an experiment: a row with one seed, and its client job spec
    (``{**base, **row.params, "seed": seed}``, as ``POST /v1/jobs`` takes it)."""

    row: Row
    seed: int
    spec: dict[str, Any]


@dataclass(frozen=True)
class ExperimentPlan:
    """A validated experiment: the rows x seeds to train and the row to compare against."""

    name: str | None
    preset: str | None
    base: dict[str, Any]
    rows: tuple[Row, ...]
    seeds: tuple[int, ...]
    baseline: str | None
    metric: str = METRIC

    @property
    def dataset(self) -> str:
        return self.base["dataset"]

    @property
    def architecture(self) -> str:
        return self.base["architecture"]

    @property
    def job_count(self) -> int:
        return len(self.rows) * len(self.seeds)

    def row(self, label: str) -> Row:
        """The row labelled ``label`` (KeyError if none)."""
        for row in self.rows:
            if row.label == label:
                return row
        raise KeyError(label)

    def runs(self) -> list[Run]:
        """Every run, row-major (all seeds of the first row, then the next row's)."""
        return [
            Run(row=row, seed=seed, spec={**self.base, **row.params, "seed": seed})
            for row in self.rows
            for seed in self.seeds
        ]

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON values (what ``experiments.spec`` stores); `from_dict` reads it."""
        return {
            "name": self.name,
            "preset": self.preset,
            "base": dict(self.base),
            "rows": [{"label": row.label, "params": dict(row.params)} for row in self.rows],
            "seeds": list(self.seeds),
            "baseline": self.baseline,
            "metric": self.metric,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExperimentPlan:
        """Rebuild a plan recorded by `to_dict` (a stored plan was validated when it was made)."""
        return cls(
            name=data.get("name"),
            preset=data.get("preset"),
            base=dict(data["base"]),
            rows=tuple(Row(label=row["label"], params=dict(row["params"])) for row in data["rows"]),
            seeds=tuple(int(seed) for seed in data["seeds"]),
            baseline=data.get("baseline"),
            metric=data.get("metric", METRIC),
        )


def plan_experiment(request: Mapping[str, Any], *, max_jobs: int | None = None) -> ExperimentPlan:
    """Validate an experiment request and expand it into a plan.

    ``request``: ``{"name"?, "base", exactly one of "grid" | "rows" | "preset", "seeds",
    "baseline"?}``:

    * ``base``: a job spec without the seed (``dataset``, ``architecture``, any overrides);
    * ``grid``: field -> non-empty list of values; the rows are the Cartesian product, in the
      order given (first field slowest), labelled like ``sigma=0.1,p_max=0.6``;
    * ``rows``: a list of overrides, each with an optional ``label`` (default: from its params);
    * ``preset``: ``table1`` (the eight rows of Table 1 as ``{"ablation": name}``) or ``table2``
      (``dropout`` and ``jumpout``, both as ablation rows so both log the same statistics);
    * ``seeds``: a list of distinct seeds, or a count n meaning 0 .. n-1;
    * ``baseline``: a row label; absent: the plain-dropout row if there is one; null: none.

    Raises:
        ExperimentError: the first problem found, with its location in the request.
    """
    if not isinstance(request, Mapping):
        raise ExperimentError((), "an experiment must be an object with base, seeds and one of "
                              "grid, rows or preset")  # fmt: skip
    unknown = [key for key in request if key not in REQUEST_KEYS]
    if unknown:
        raise ExperimentError(
            (str(unknown[0]),), f"unknown key; accepted: {', '.join(REQUEST_KEYS)}"
        )
    name = _check_name(request.get("name"))
    base = _check_base(request.get("base"))
    sources = [key for key in _ROW_SOURCES if key in request]
    if len(sources) != 1:
        given = " and ".join(sources) if sources else "none"
        raise ExperimentError(
            (sources[1] if len(sources) > 1 else "rows",),
            f"give exactly one of grid, rows or preset (got {given})",
        )
    source = sources[0]
    seeds = _check_seeds(request.get("seeds"))
    if source == "grid":
        rows, locations = _grid_rows(request["grid"])
        preset = None
    elif source == "rows":
        rows, locations = _explicit_rows(request["rows"])
        preset = None
    else:
        preset = _check_preset(request["preset"], base)
        rows = _preset_rows(preset)
        locations = [("preset",) for _ in rows]
    job_count = len(rows) * len(seeds)
    if max_jobs is not None and job_count > max_jobs:
        raise ExperimentError(
            ("seeds",),
            f"{len(rows)} rows x {len(seeds)} seeds = {job_count} jobs; at most {max_jobs} jobs "
            "are allowed per experiment",
        )
    configs = _resolve_rows(base, rows, locations)
    baseline = _check_baseline(request, rows, configs)
    return ExperimentPlan(
        name=name, preset=preset, base=base, rows=tuple(rows), seeds=seeds, baseline=baseline
    )


# --------------------------------------------------------------------------------------------
# The parts of a request


def _check_name(name: Any) -> str | None:
    if name is None:
        return None
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME_LENGTH:
        raise ExperimentError(
            ("name",), f"must be a non-empty string of at most {MAX_NAME_LENGTH} characters"
        )
    if not name.isprintable():
        raise ExperimentError(("name",), "must be printable characters (no newlines or controls)")
    return name


def _check_override(location: tuple[str | int, ...], field: Any, value: Any) -> Any:
    """One override of a base, grid or row: a known client field, checked by its `FieldSpec`
    (so it is stored canonically: ablation names spelt as Table 1, floats as floats)."""
    if not isinstance(field, str) or field not in FIELDS:
        accepted = ", ".join(name for name, spec in FIELDS.items() if not spec.operator)
        raise ExperimentError(location, f"unknown field; accepted: {accepted}")
    spec = FIELDS[field]
    if field == "seed":
        raise ExperimentError(location, "the seeds are the experiment's; use 'seeds' instead")
    if spec.operator:
        raise ExperimentError(
            location, "is set by whoever runs the training, not by an experiment's spec"
        )
    if value is None and not spec.nullable:
        return None  # as in resolve_config: None keeps the recipe's value
    try:
        return spec.check(value)
    except ConfigError as error:
        raise ExperimentError(location, error.message) from None


def _check_base(base: Any) -> dict[str, Any]:
    if not isinstance(base, Mapping):
        raise ExperimentError(
            ("base",), "is required: a job spec with dataset, architecture and any overrides"
        )
    checked: dict[str, Any] = {}
    for field in REQUIRED:
        if base.get(field) is None:
            raise ExperimentError(("base", field), "is required")
    for field, value in base.items():
        checked[field] = _check_override(("base", field), field, value)
    # Required fields first, like a job spec.
    return {
        **{field: checked[field] for field in REQUIRED},
        **{k: v for k, v in checked.items() if k not in REQUIRED},
    }


def _check_seeds(seeds: Any) -> tuple[int, ...]:
    accepted = (
        f"a count n in [1, {MAX_SEEDS}] (seeds 0 .. n-1) or a list of 1 to {MAX_SEEDS} "
        f"distinct integers in [0, {_SEED_SPEC.high:g}]"
    )
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        if not 1 <= seeds <= MAX_SEEDS:
            raise ExperimentError(("seeds",), f"must be {accepted}, got {seeds}")
        return tuple(range(seeds))
    if not isinstance(seeds, list | tuple) or not 1 <= len(seeds) <= MAX_SEEDS:
        shown = f"{len(seeds)} seeds" if isinstance(seeds, list | tuple) else repr(seeds)[:64]
        raise ExperimentError(("seeds",), f"must be {accepted}, got {shown}")
    seen: set[int] = set()
    for index, seed in enumerate(seeds):
        try:
            _SEED_SPEC.check(seed)
        except ConfigError:
            raise ExperimentError(
                ("seeds", index), f"must be an integer in [0, {_SEED_SPEC.high:g}], got {seed!r}"
            ) from None
        if seed in seen:
            raise ExperimentError(("seeds", index), f"seed {seed} is listed twice")
        seen.add(seed)
    return tuple(seeds)


def _format_value(value: Any) -> str:
    """A value as it appears in a row label: JSON's spelling, lists without commas."""
    if isinstance(value, list | tuple):
        return "[" + " ".join(_format_value(item) for item in value) + "]"
    if isinstance(value, str):
        return value
    return json.dumps(value)


def default_label(params: Mapping[str, Any]) -> str:
    """A row's label from its overrides: ``sigma=0.1,p_max=0.6``; ``base`` for none; a row of
    only an ablation is named by it (``dropout+I``)."""
    if not params:
        return "base"
    if list(params) == ["ablation"] and params["ablation"] is not None:
        return params["ablation"]
    return ",".join(f"{field}={_format_value(value)}" for field, value in params.items())


def _grid_rows(grid: Any) -> tuple[list[Row], list[tuple[str | int, ...]]]:
    if not isinstance(grid, Mapping) or not grid:
        raise ExperimentError(("grid",), "must be an object: field -> non-empty list of values")
    axes: dict[str, list[Any]] = {}
    size = 1
    for field, values in grid.items():
        location = ("grid", field)
        if not isinstance(values, list | tuple) or not values:
            raise ExperimentError(location, "must be a non-empty list of values")
        checked = [_check_override(location, field, value) for value in values]
        if len({json.dumps(value) for value in checked}) != len(checked):
            raise ExperimentError(location, "lists the same value twice")
        axes[field] = checked
        size *= len(checked)
        if size > MAX_ROWS:
            raise ExperimentError(location, f"the grid has more than {MAX_ROWS} rows")
    rows = []
    for combination in itertools.product(*axes.values()):
        params = dict(zip(axes, combination, strict=True))
        rows.append(Row(label=default_label(params), params=params))
    locations: list[tuple[str | int, ...]] = [("grid",)] * len(rows)
    return rows, locations


def _explicit_rows(rows: Any) -> tuple[list[Row], list[tuple[str | int, ...]]]:
    if not isinstance(rows, list | tuple) or not rows:
        raise ExperimentError(("rows",), "must be a non-empty list of overrides")
    if len(rows) > MAX_ROWS:
        raise ExperimentError(("rows",), f"at most {MAX_ROWS} rows, got {len(rows)}")
    result: list[Row] = []
    labels: dict[str, int] = {}
    for index, item in enumerate(rows):
        if not isinstance(item, Mapping):
            raise ExperimentError(("rows", index), "must be an object of overrides")
        params = {
            field: _check_override(("rows", index, field), field, value)
            for field, value in item.items()
            if field != "label"
        }
        label = item.get("label")
        if label is None:
            label = default_label(params)
        elif (
            not isinstance(label, str)
            or not label.strip()
            or len(label) > MAX_LABEL_LENGTH
            or not label.isprintable()
        ):
            raise ExperimentError(
                ("rows", index, "label"),
                f"must be a non-empty printable string of at most {MAX_LABEL_LENGTH} characters",
            )
        if label in labels:
            raise ExperimentError(
                ("rows", index, "label"),
                f"label {label!r} is also row {labels[label]}'s; labels must be unique",
            )
        labels[label] = index
        result.append(Row(label=label, params=params))
    return result, [("rows", index) for index in range(len(result))]


def _check_preset(preset: Any, base: Mapping[str, Any]) -> str:
    if preset not in PRESETS:
        raise ExperimentError(
            ("preset",), f"unknown preset {preset!r}; accepted: {', '.join(PRESETS)}"
        )
    if base.get("ablation") is not None:
        raise ExperimentError(("base", "ablation"), f"the {preset} rows set the ablation")
    if base.get("method") not in (None, Method.JUMPOUT):
        raise ExperimentError(
            ("base", "method"),
            f"the {preset} rows are jumpout variants (Table-1 ablations); leave method out",
        )
    return preset


def _preset_rows(preset: str) -> list[Row]:
    names = list(TABLE1_ROWS) if preset == "table1" else ["dropout", "jumpout"]
    return [Row(label=name, params={"ablation": name}) for name in names]


def _resolve_rows(
    base: dict[str, Any], rows: list[Row], locations: list[tuple[str | int, ...]]
) -> list[Any]:
    """Resolve every row once; a refusal is located where its field was set."""
    dataset, architecture = base["dataset"], base["architecture"]
    base_overrides = {k: v for k, v in base.items() if k not in REQUIRED}
    try:
        resolve_config(dataset, architecture, **base_overrides)
        base_error = None
    except ConfigError as error:
        base_error = error
    configs = []
    for row, location in zip(rows, locations, strict=True):
        try:
            configs.append(
                resolve_config(dataset, architecture, **{**base_overrides, **row.params})
            )
        except ConfigError as error:
            if error.field in row.params or base_error is None:
                if location[0] == "grid":
                    where = ("grid", error.field)
                elif location[0] == "preset":
                    where = ("preset",)
                else:
                    where = (*location, error.field)
                raise ExperimentError(where, f"row {row.label!r}: {error.message}") from None
            raise ExperimentError(("base", base_error.field), base_error.message) from None
    return configs


def _is_plain_dropout(config: Any) -> bool:
    if config.ablation is None:
        return config.method == Method.DROPOUT
    return config.ablation == "dropout"


def _check_baseline(request: Mapping[str, Any], rows: list[Row], configs: list[Any]) -> str | None:
    labels = [row.label for row in rows]
    if "baseline" not in request:
        if "dropout" in labels:
            return "dropout"
        for row, config in zip(rows, configs, strict=True):
            if _is_plain_dropout(config):
                return row.label
        return None
    baseline = request["baseline"]
    if baseline is None:
        return None
    if baseline not in labels:
        shown = ", ".join(labels[:20]) + (", ..." if len(labels) > 20 else "")
        raise ExperimentError(
            ("baseline",), f"unknown row {str(baseline)[:64]!r}; accepted: {shown} or null"
        )
    return baseline
