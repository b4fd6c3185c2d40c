"""The training spec: every field of one training run, declared once, and the paper's recipes.

Each field of `TrainConfig` carries its `FieldSpec`: kind, bounds, choices, whether ``None`` is
a value, whether the (dataset, architecture) recipe fills its default, who may set it (anyone, or
only the operator of the machine that trains: paths, device, loader processes) and its help text.
Everything else is derived from that one declaration:

* `resolve_config` (the library, the command line, the worker) validates with `FieldSpec.check`;
* the command line's options are built from `FIELDS` (`jumpout.cli`), text parsed by
  `FieldSpec.parse`, so a bad value is the same one-line message;
* the API's request model (and so its OpenAPI schema) is generated from `FIELDS`
  (`api.schemas.JobCreate`) and validates each field with the same `FieldSpec.check`.

This module imports neither torch nor torchvision: the API process uses it. The names of the
datasets, architectures and Table-1 rows are declared here for the same reason; the registries of
`jumpout.data`, `jumpout.models` and `jumpout.layer` implement exactly these names (a test holds
them together).

Recipes (all values overridable; the fields marked ``recipe`` take them):

=====================  ==========================================================================
architecture family     defaults
=====================  ==========================================================================
``wrn_*``               SGD Nesterov momentum 0.9, lr 0.1, wd 5e-4, batch 128, 200 epochs,
                        lr x0.2 at epochs 60/120/160 (applied per iteration), dropout 0.3
``resnet_preact_*``     SGD Nesterov momentum 0.9, lr 0.1, wd 1e-4, batch 128, 160 epochs,
                        lr x0.1 at 80/120, dropout 0.3
``cnn*`` (small v3)     Nesterov, lr 0.01 halved every 10 epochs while momentum rises 0.9, 0.95,
                        0.975, ... (schedule ``"step_momentum"``), no wd, batch 128, 50 epochs,
                        dropout 0.5, no batch norm (``batch_norm=True`` for the Figure 2 variant)
``resnet*`` (ImageNet)  SGD Nesterov momentum 0.9, lr 0.1, wd 1e-4, batch 256, 90 epochs,
                        lr x0.1 at 30/60, dropout 0.3
``mlp`` and the small   20 epochs, batch 64, lr 0.05, Nesterov momentum 0.9, wd 5e-4, cosine
datasets ``digits``,    annealing to 0 (per iteration), dropout 0.3. These are ours, chosen so that
``synthetic``           a CPU run takes seconds to a minute.
=====================  ==========================================================================

Jumpout's own hyper-parameters default to the paper's sigma=0.1, p_min=0.01, p_max=0.6.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

__all__ = [
    "ABLATIONS",
    "ARCHITECTURES",
    "DATASETS",
    "FIELDS",
    "TABLE1_ROWS",
    "ConfigError",
    "Device",
    "FieldSpec",
    "Method",
    "PRECISIONS",
    "REQUIRED",
    "SERVER_PATH_FIELDS",
    "Schedule",
    "TrainConfig",
    "applicable_fields",
    "canonical_ablation",
    "default",
    "recipe_defaults",
    "resolve_config",
]


class Method(StrEnum):
    """What fills the model's dropout slots."""

    NONE = "none"
    DROPOUT = "dropout"
    JUMPOUT = "jumpout"


class Schedule(StrEnum):
    """How the learning rate moves, applied per iteration (see `jumpout.engine`)."""

    STEP = "step"
    COSINE = "cosine"
    CONSTANT = "constant"
    STEP_MOMENTUM = "step_momentum"


class Device(StrEnum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


DATASETS = (
    "cifar10",
    "cifar100",
    "digits",
    "fashion_mnist",
    "imagenet",
    "stl10",
    "svhn",
    "synthetic",
)
ARCHITECTURES = ("cnn_small", "mlp", "resnet18", "resnet_preact_20", "wrn_16_8", "wrn_28_10")
QUICK_DATASETS = ("digits", "synthetic")

# Table 1 of the paper: which of the three modifications each row switches on.
TABLE1_ROWS: dict[str, frozenset[str]] = {
    "dropout": frozenset(),
    "dropout+I": frozenset({"I"}),
    "dropout+II": frozenset({"II"}),
    "dropout+III": frozenset({"III"}),
    "dropout+I+II": frozenset({"I", "II"}),
    "dropout+II+III": frozenset({"II", "III"}),
    "dropout+I+III": frozenset({"I", "III"}),
    "jumpout": frozenset({"I", "II", "III"}),
}
ABLATIONS: tuple[str, ...] = tuple(TABLE1_ROWS)
# The paper's table spells one row "Dropout+III+I".
_ABLATION_ALIASES = {"dropout+iii+i": "dropout+I+III"}


def canonical_ablation(name: str) -> str | None:
    """The Table-1 row ``name`` stands for (any case, the paper's spelling accepted), or None."""
    key = name.strip().lower()
    return {row.lower(): row for row in ABLATIONS}.get(key) or _ABLATION_ALIASES.get(key)


class ConfigError(ValueError):
    """A training specification field has a value that cannot be accepted.

    Args:
        field: name of the `TrainConfig` field at fault.
        message: what is wrong and what would be accepted.
    """

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


# --------------------------------------------------------------------------------------------
# Field declarations

INT, FLOAT, BOOL, CHOICE, EPOCH_LIST, PATH = "int", "float", "bool", "choice", "epochs", "path"
# A starting point for the weights: ``job:<id>`` or a file path relative to the data directory.
SOURCE = "source"
SOURCE_MAX_LENGTH = 512
_JOB_SOURCE = re.compile(r"job:[0-9a-f]{32}")

# How the Table-1 rows with modification II but not I pick their fixed base rate (docs/fidelity.md).
II_BASE_RATES = ("matched", "mean_of_i", "dropout_rate")

MAX_MILESTONES = 64
MAX_DEVICES = 16  # devices of one data-parallel job (one box: torch.distributed's single node)

# `precision`: fp32 throughout, or autocast to bf16 / fp16 (docs/fidelity.md, "Precision").
PRECISIONS = ("fp32", "bf16", "fp16")
# The CPU has no fast fp16 kernels (a small CNN's epoch ran ~20x slower than in fp32 here).
FP16_NEEDS_CUDA = "fp16 needs a CUDA device; on the CPU use bf16 or fp32"


@dataclass(frozen=True)
class FieldSpec:
    """What one `TrainConfig` field accepts. ``name`` is filled from the dataclass field."""

    kind: str
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # (low, ...] instead of [low, ...]
    high_open: bool = False  # [..., high) instead of [..., high]
    choices: tuple[str, ...] = ()
    nullable: bool = False  # None is a value ("no cap", "no ablation"), not "keep the default"
    recipe: bool = False  # the (dataset, architecture) recipe fills the default
    operator: bool = False  # set by whoever runs the training, never by an API client
    flags: tuple[str, ...] = ()  # extra command-line spellings
    name: str = ""

    def accepted(self) -> str:
        """What the field accepts, in words: 'an integer in [1, 1000]', 'one of a, b'."""
        if self.kind in (INT, FLOAT):
            left = "(" if self.low_open else "["
            right = ")" if self.high_open else "]"
            noun = "an integer" if self.kind == INT else "a number"
            text = f"{noun} in {left}{self.low:g}, {self.high:g}{right}"
        elif self.kind == BOOL:
            text = "true or false"
        elif self.kind == CHOICE:
            text = "one of " + ", ".join(self.choices)
        elif self.kind == EPOCH_LIST:
            text = (
                f"a strictly increasing list of at most {MAX_MILESTONES} epochs in "
                f"[1, {FIELDS['epochs'].high:g}]"
            )
        elif self.kind == SOURCE:
            text = (
                "'job:<job id>' or a file path relative to the data directory "
                f"(no '..', at most {SOURCE_MAX_LENGTH} characters)"
            )
        else:
            text = "a directory path"
        return text + (" or null" if self.nullable else "")

    def _refuse(self, value: Any) -> ConfigError:
        shown = repr(value)
        if len(shown) > 64:
            shown = shown[:64] + "..."
        if self.kind == CHOICE and isinstance(value, str):
            accepted = ", ".join(self.choices) + (" or null" if self.nullable else "")
            return ConfigError(self.name, f"unknown {self.name} {shown}; accepted: {accepted}")
        return ConfigError(self.name, f"must be {self.accepted()}, got {shown}")

    def _in_bounds(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def check(self, value: Any) -> Any:
        """The value as stored (a JSON value), or `ConfigError` naming the field."""
        if value is None and self.nullable:
            return None
        if self.kind == INT:
            # 3.0 is refused as JSON's integers are: one rule for the API and the library.
            if isinstance(value, bool) or not isinstance(value, int) or not self._in_bounds(value):
                raise self._refuse(value)
            return value
        if self.kind == FLOAT:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise self._refuse(value)
            try:
                number = float(value)
            except OverflowError:  # an integer beyond any float
                raise self._refuse(value) from None
            if not math.isfinite(number) or not self._in_bounds(number):
                raise self._refuse(value)
            return number
        if self.kind == BOOL:
            if not isinstance(value, bool):
                raise self._refuse(value)
            return value
        if self.kind == CHOICE:
            if isinstance(value, str) and self.name == "ablation":
                value = canonical_ablation(value) or value
            if not isinstance(value, str) or value not in self.choices:
                raise self._refuse(value)
            return str(value)
        if self.kind == EPOCH_LIST:
            if (
                not isinstance(value, list | tuple)
                or len(value) > MAX_MILESTONES
                or any(isinstance(m, bool) or not isinstance(m, int) for m in value)
                or list(value) != sorted(set(value))
                or any(not 1 <= m <= FIELDS["epochs"].high for m in value)
            ):
                raise self._refuse(value)
            return list(value)
        if not isinstance(value, str):
            raise self._refuse(value)
        if self.kind == SOURCE and not _is_source(value):
            raise self._refuse(value)
        return value

    def parse(self, text: str) -> Any:
        """A command-line string as the value `check` expects (then checked)."""
        text = text.strip()
        if self.nullable and text.lower() in ("none", "null"):
            return None
        try:
            if self.kind == INT:
                return self.check(int(text))
            if self.kind == FLOAT:
                return self.check(float(text))
            if self.kind == EPOCH_LIST:
                return self.check([int(part) for part in text.split(",") if part.strip()])
        except ConfigError:
            raise
        except ValueError:
            raise self._refuse(text) from None
        if self.kind == BOOL:
            lowered = text.lower()
            if lowered not in ("true", "false", "yes", "no", "1", "0"):
                raise self._refuse(text)
            return lowered in ("true", "yes", "1")
        return self.check(text)


def _is_source(value: str) -> bool:
    """``job:<32 hex>``, or a relative path that stays inside the directory it is joined to."""
    if value.startswith("job:"):
        return _JOB_SOURCE.fullmatch(value) is not None
    parts = value.replace("\\", "/").split("/")
    return (
        0 < len(value) <= SOURCE_MAX_LENGTH
        and not value.startswith(("/", "~"))
        and ".." not in parts
        and all(part.strip() for part in parts)
        and value.isprintable()
    )


def _field(default: Any = dataclasses.MISSING, **spec: Any) -> Any:
    if isinstance(default, list):
        return dataclasses.field(
            default_factory=lambda: list(default), metadata={"spec": FieldSpec(**spec)}
        )
    return dataclasses.field(default=default, metadata={"spec": FieldSpec(**spec)})


@dataclass
class TrainConfig:
    """One training run, fully resolved. Every value is a JSON value.

    ``dataclasses.asdict(config)`` round-trips through JSON; `TrainConfig.from_dict` rebuilds and
    re-validates it. The defaults below are the quick recipe's; `resolve_config` replaces the
    fields marked ``recipe`` with the (dataset, architecture) pair's recipe.
    """

    dataset: str = _field(kind=CHOICE, choices=DATASETS, help="the data set")
    architecture: str = _field(
        kind=CHOICE, choices=ARCHITECTURES, flags=("--arch",), help="the model"
    )
    method: str = _field(
        Method.JUMPOUT.value,
        kind=CHOICE,
        choices=tuple(Method),
        help="what fills the model's dropout slots",
    )
    dropout_rate: float = _field(
        0.3,
        kind=FLOAT,
        low=0.0,
        high=0.99,
        recipe=True,
        flags=("--rate",),
        help="dropout's fixed rate (method dropout, and Table-1 rows without modification I)",
    )
    sigma: float = _field(
        0.1, kind=FLOAT, low=0.0, high=10.0, help="jumpout: std of the rate's half-normal"
    )
    p_min: float = _field(
        0.01, kind=FLOAT, low=0.0, high=1.0, high_open=True, help="jumpout: lowest base rate"
    )
    p_max: float = _field(
        0.6,
        kind=FLOAT,
        low=0.0,
        low_open=True,
        high=1.0,
        high_open=True,
        help="jumpout: highest base rate, above p_min",
    )
    ablation: str | None = _field(
        None,
        kind=CHOICE,
        choices=ABLATIONS,
        nullable=True,
        help="a row of the paper's Table 1 (a jumpout variant; any case)",
    )
    epochs: int = _field(20, kind=INT, low=1, high=1000, recipe=True, help="training epochs")
    batch_size: int = _field(64, kind=INT, low=1, high=4096, recipe=True, help="batch size")
    lr: float = _field(
        0.05, kind=FLOAT, low=0.0, low_open=True, high=10.0, recipe=True, help="learning rate"
    )
    momentum: float = _field(
        0.9, kind=FLOAT, low=0.0, high=1.0, high_open=True, recipe=True, help="SGD momentum"
    )
    nesterov: bool = _field(True, kind=BOOL, recipe=True, help="Nesterov momentum")
    weight_decay: float = _field(
        5e-4, kind=FLOAT, low=0.0, high=1.0, recipe=True, help="L2 weight decay"
    )
    schedule: str = _field(
        Schedule.COSINE.value,
        kind=CHOICE,
        choices=tuple(Schedule),
        recipe=True,
        help="learning-rate schedule (per iteration)",
    )
    milestones: list[int] = _field(
        [], kind=EPOCH_LIST, recipe=True, help="epochs at which a step schedule multiplies by gamma"
    )
    gamma: float = _field(
        0.1,
        kind=FLOAT,
        low=0.0,
        low_open=True,
        high=1.0,
        recipe=True,
        help="a step schedule's factor",
    )
    augment: bool = _field(True, kind=BOOL, help="the data set's training augmentation")
    batch_norm: bool = _field(
        True, kind=BOOL, recipe=True, help="cnn_small only: with batch norm (Figure 2's variant)"
    )
    seed: int = _field(0, kind=INT, low=0, high=2**31 - 1, help="seed of every random stream")
    val_fraction: float = _field(
        0.0,
        kind=FLOAT,
        low=0.0,
        high=0.5,
        help="fraction of the training set held out for validation, on which the best epoch "
        "is chosen (0: no validation split, no best epoch)",
    )
    ii_base_rate: str = _field(
        "matched",
        kind=CHOICE,
        choices=II_BASE_RATES,
        help="base rate of the Table-1 rows with II but not I: matched (dropout_rate x 0.5), "
        "mean_of_i (the mean of modification I's rate) or dropout_rate (unchanged; sits at the "
        "cap)",
    )
    svhn_extra: bool = _field(
        False,
        kind=BOOL,
        recipe=True,
        help="svhn only: train on train + extra (604,388 images, the paper's split)",
    )
    init_from: str | None = _field(
        None,
        kind=SOURCE,
        nullable=True,
        help="start from these weights: job:<id> (an earlier job's checkpoint) or a "
        "torchvision state-dict file under the data directory",
    )
    data_dir: str | None = _field(
        None, kind=PATH, nullable=True, operator=True, help="where the data sets are"
    )
    out_dir: str | None = _field(
        None,
        kind=PATH,
        nullable=True,
        operator=True,
        flags=("--out",),
        help="directory for checkpoints",
    )
    device: str = _field(
        Device.AUTO.value,
        kind=CHOICE,
        choices=tuple(Device),
        operator=True,
        help="where to train (auto: CUDA when there is a GPU)",
    )
    # A client's choice (an operator caps it with max_devices): how many processes train one
    # job data-parallel (`jumpout.distributed`).
    devices: int = _field(
        1,
        kind=INT,
        low=1,
        high=MAX_DEVICES,
        help="processes that train the job data-parallel with torch.distributed (one GPU each; "
        "gloo processes on the CPU); batch_size is the global batch, split evenly among them",
    )
    num_workers: int | None = _field(
        None,
        kind=INT,
        low=0,
        high=64,
        nullable=True,
        operator=True,
        help="data-loader processes (null: 0 on the CPU, min(8, CPUs) when a GPU reads from "
        "the loader)",
    )
    keep_last: int = _field(3, kind=INT, low=1, high=1000, help="checkpoints kept (newest)")
    keep_best: bool = _field(True, kind=BOOL, help="also keep the best epoch's checkpoint")
    compile: bool = _field(False, kind=BOOL, help="torch.compile the model")
    precision: str = _field(
        "fp32",
        kind=CHOICE,
        choices=PRECISIONS,
        help="arithmetic of forward and backward: fp32 (the paper's), or bf16 / fp16 autocast "
        "(fp16 with a loss scaler)",
    )
    train_size: int | None = _field(
        None,
        kind=INT,
        low=1,
        high=100_000_000,
        nullable=True,
        help="cap on the training samples (smoke tests)",
    )
    test_size: int | None = _field(
        None,
        kind=INT,
        low=1,
        high=100_000_000,
        nullable=True,
        help="cap on the test samples (smoke tests)",
    )

    def to_dict(self) -> dict[str, Any]:
        """The configuration as a plain dict of JSON values (a copy: the list is copied too)."""
        values = dict(self.__dict__)
        values["milestones"] = list(self.milestones)
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Rebuild and re-validate a configuration recorded by `to_dict`."""
        values = dict(values)
        try:
            dataset = values.pop("dataset")
            architecture = values.pop("architecture")
        except KeyError as exc:
            raise ConfigError(str(exc.args[0]), "is required") from None
        return resolve_config(dataset, architecture, **values)


def _collect_fields() -> dict[str, FieldSpec]:
    fields = {}
    for item in dataclasses.fields(TrainConfig):
        fields[item.name] = dataclasses.replace(item.metadata["spec"], name=item.name)
    return fields


FIELDS: dict[str, FieldSpec] = _collect_fields()
"""Every field of the spec, by name, in declaration order."""

REQUIRED: tuple[str, ...] = tuple(
    item.name
    for item in dataclasses.fields(TrainConfig)
    if item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING
)
"""The fields without a default: the (dataset, architecture) pair that picks the recipe."""


def default(name: str) -> Any:
    """The declared default of field `name` (before any recipe), a fresh copy."""
    item = next(item for item in dataclasses.fields(TrainConfig) if item.name == name)
    if item.default_factory is not dataclasses.MISSING:
        return item.default_factory()
    return item.default


SERVER_PATH_FIELDS: tuple[str, ...] = tuple(
    name for name, spec in FIELDS.items() if spec.kind == PATH
)
"""The fields that hold a path of the machine that trains (`data_dir`, `out_dir`): the
operator's business, never shown to an API client."""

# The fields that only some methods read, and the rest that every run reads.
_METHOD_FIELDS = frozenset({"dropout_rate", "sigma", "p_min", "p_max", "ablation", "ii_base_rate"})
# Modification I's random rate, min(p_min + |N(0, sigma)|, p_max).
_RANDOM_RATE = ("sigma", "p_min", "p_max")


def applicable_fields(spec: Any) -> tuple[str, ...]:
    """The fields of a resolved spec (a `TrainConfig` or its `to_dict`) that the run reads, in
    declaration order: the rest hold defaults that change nothing.

    What fills the dropout slots decides the method's fields: ``none`` reads none of them;
    ``dropout`` its ``dropout_rate``; ``jumpout`` its ``ablation`` and, per the Table-1 row
    (`jumpout.layer.ablation_kwargs`), ``sigma``/``p_min``/``p_max`` for a random rate
    (modification I, and ``ii_base_rate="mean_of_i"``), ``dropout_rate`` for a fixed one, and
    ``ii_base_rate`` in the rows with II but not I. ``batch_norm`` applies to ``cnn*`` only,
    ``svhn_extra`` to ``svhn`` only, and ``milestones``/``gamma`` to the step schedules only
    (``step``, ``step_momentum``; `jumpout.engine._Schedule`). The rule is cached per
    combination: the API runs it for every job of a list.
    """
    get = spec.get if isinstance(spec, dict) else lambda name: getattr(spec, name, None)
    return _applicable(
        get("method"),
        get("ablation"),
        get("ii_base_rate"),
        get("architecture"),
        get("dataset"),
        get("schedule"),
    )


@functools.lru_cache(maxsize=256)
def _applicable(
    method: str | None,
    ablation: str | None,
    ii_base_rate: str | None,
    architecture: str | None,
    dataset: str | None,
    schedule: str | None = None,
) -> tuple[str, ...]:
    if method == Method.DROPOUT:
        used = {"dropout_rate"}
    elif method == Method.JUMPOUT:
        used = {"ablation"}
        row = canonical_ablation(ablation) if ablation else None
        modifications = TABLE1_ROWS[row] if row else frozenset({"I", "II", "III"})
        if "I" in modifications:
            used.update(_RANDOM_RATE)
        elif "II" in modifications:
            used.add("ii_base_rate")
            used.update(_RANDOM_RATE if ii_base_rate == "mean_of_i" else ("dropout_rate",))
        else:
            used.add("dropout_rate")
    else:
        used = set()
    skipped = _METHOD_FIELDS - used
    if not str(architecture or "").startswith("cnn"):
        skipped |= {"batch_norm"}
    if dataset != "svhn":
        skipped |= {"svhn_extra"}
    if schedule is not None and schedule not in (Schedule.STEP, Schedule.STEP_MOMENTUM):
        skipped |= {"milestones", "gamma"}  # cosine and constant read neither
    return tuple(name for name in FIELDS if name not in skipped)


# --------------------------------------------------------------------------------------------
# Recipes: the defaults of the fields marked ``recipe``, per architecture family.

_WRN = dict(
    epochs=200,
    batch_size=128,
    lr=0.1,
    momentum=0.9,
    nesterov=True,
    weight_decay=5e-4,
    schedule="step",
    milestones=[60, 120, 160],
    gamma=0.2,
    dropout_rate=0.3,
)
_PREACT = dict(
    epochs=160,
    batch_size=128,
    lr=0.1,
    momentum=0.9,
    nesterov=True,
    weight_decay=1e-4,
    schedule="step",
    milestones=[80, 120],
    gamma=0.1,
    dropout_rate=0.3,
)
_CNN_V3 = dict(
    epochs=50,
    batch_size=128,
    lr=0.01,
    momentum=0.9,
    nesterov=True,
    weight_decay=0.0,
    schedule="step_momentum",
    milestones=[10, 20, 30, 40],
    gamma=0.5,
    dropout_rate=0.5,
)
_IMAGENET = dict(
    epochs=90,
    batch_size=256,
    lr=0.1,
    momentum=0.9,
    nesterov=True,
    weight_decay=1e-4,
    schedule="step",
    milestones=[30, 60],
    gamma=0.1,
    dropout_rate=0.3,
)
_QUICK = dict(
    epochs=20,
    batch_size=64,
    lr=0.05,
    momentum=0.9,
    nesterov=True,
    weight_decay=5e-4,
    schedule="cosine",
    milestones=[],
    gamma=0.1,
)


def recipe_defaults(dataset: str, architecture: str) -> dict[str, Any]:
    """The recipe's values for a (dataset, architecture) pair, before any override: one value
    for each field marked ``recipe``."""
    arch = architecture.lower()
    if arch.startswith("wrn"):
        recipe = dict(_WRN)
    elif "preact" in arch:
        recipe = dict(_PREACT)
    elif arch.startswith("cnn"):
        recipe = dict(_CNN_V3)
    elif arch.startswith("resnet"):
        recipe = dict(_IMAGENET)
    else:
        recipe = dict(_QUICK, dropout_rate=0.3)
    # Only the small CNN has a with/without batch-norm switch (the paper's Figure 2); the v3
    # original has none, so that is its default. Other models ignore the field.
    recipe["batch_norm"] = not arch.startswith("cnn")
    # The paper trains SVHN on train + extra (its Table 4: 604,388 images); other sets have none.
    recipe["svhn_extra"] = dataset == "svhn"
    if dataset in QUICK_DATASETS:
        # The offline toy sets train in seconds; the paper's long schedules make no sense there.
        recipe.update(_QUICK)
    recipe["milestones"] = list(recipe["milestones"])
    return recipe


def resolve_config(dataset: str, architecture: str, **overrides: Any) -> TrainConfig:
    """Fill the recipe defaults for ``(dataset, architecture)`` and apply ``overrides``.

    Every `TrainConfig` field may be overridden. An override of ``None`` for a field that is not
    ``nullable`` means "keep the recipe's value" (so command-line parsers and API schemas can pass
    unset options through).

    Raises:
        ConfigError: an unknown field, an unknown dataset / architecture / ablation name, or a value
            out of range; the error names the field and what is accepted.
    """
    unknown = sorted(set(overrides) - set(FIELDS))
    if unknown:
        raise ConfigError(unknown[0], f"unknown field; accepted: {', '.join(FIELDS)}")
    values: dict[str, Any] = {
        "dataset": FIELDS["dataset"].check(dataset),
        "architecture": FIELDS["architecture"].check(architecture),
    }
    for name in FIELDS:
        if name not in values:
            values[name] = default(name)
    values.update(recipe_defaults(values["dataset"], values["architecture"]))
    for key, value in overrides.items():
        if key in REQUIRED or (value is None and not FIELDS[key].nullable):
            continue
        values[key] = value
    for name, spec in FIELDS.items():
        values[name] = spec.check(values[name])
    _check_together(values, overrides)
    return TrainConfig(**values)


def _check_together(values: dict[str, Any], overrides: dict[str, Any]) -> None:
    """The rules that involve two fields; `values` may be adjusted (ablation implies jumpout)."""
    if values["p_min"] >= values["p_max"]:
        raise ConfigError(
            "p_min", f"must be below p_max ({values['p_max']:g}), got {values['p_min']:g}"
        )
    if values["nesterov"] and values["momentum"] <= 0:
        raise ConfigError("nesterov", "Nesterov momentum needs momentum > 0; set nesterov=false")
    if values["batch_size"] % values["devices"]:
        # The global batch is split evenly: DDP averages the ranks' mean gradients, which is
        # the global batch's mean gradient only when every rank's batch has the same size.
        raise ConfigError(
            "batch_size",
            f"must be divisible by devices ({values['devices']}): each of the "
            f"{values['devices']} processes trains batch_size/devices samples per step, "
            f"got {values['batch_size']}",
        )
    if values["precision"] == "fp16" and values["device"] == Device.CPU:
        raise ConfigError("precision", FP16_NEEDS_CUDA)
    if values["svhn_extra"] and values["dataset"] != "svhn":
        raise ConfigError(
            "svhn_extra",
            f"only the svhn data set has an extra split; dataset {values['dataset']!r} accepts "
            "svhn_extra=false only",
        )
    if values["ablation"] is not None and values["method"] != Method.JUMPOUT:
        given = overrides.get("method")
        if given not in (None, Method.JUMPOUT):
            raise ConfigError(
                "ablation",
                "a Table-1 ablation is a jumpout variant and needs method 'jumpout', "
                f"got {given!r}",
            )
        values["method"] = Method.JUMPOUT.value
