"""Training recipes: the resolved, JSON-able specification of one training run.

`resolve_config(dataset, architecture, **overrides)` starts from the recipe the paper followed for
the (dataset, architecture) pair (see the shared ``docs/recipes.md``) and applies the caller's
overrides, validating every field. The `TrainConfig` it returns is what a job records as "the spec
as resolved" and what `jumpout.engine.fit` trains.

Recipes (all values overridable):

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
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ConfigError",
    "METHODS",
    "SCHEDULES",
    "DEVICES",
    "TrainConfig",
    "resolve_config",
    "recipe_defaults",
]

METHODS = ("none", "dropout", "jumpout")
SCHEDULES = ("step", "cosine", "constant", "step_momentum")
DEVICES = ("auto", "cpu", "cuda")
QUICK_DATASETS = ("digits", "synthetic")


class ConfigError(ValueError):
    """A training specification field has a value that cannot be accepted.

    Args:
        field: name of the `TrainConfig` field (or override) at fault.
        message: what is wrong and what would be accepted.
    """

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


@dataclass
class TrainConfig:
    """One training run, fully resolved. Every value is a JSON value.

    ``dataclasses.asdict(config)`` round-trips through JSON and ``TrainConfig(**d)`` rebuilds it.
    See the module docstring for the recipes that fill the defaults.
    """

    dataset: str
    architecture: str
    method: str = "jumpout"
    dropout_rate: float = 0.3
    sigma: float = 0.1
    p_min: float = 0.01
    p_max: float = 0.6
    ablation: str | None = None
    epochs: int = 20
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    augment: bool = True
    batch_norm: bool = True
    seed: int = 0
    data_dir: str | None = None
    out_dir: str | None = None
    device: str = "auto"
    num_workers: int = 0
    keep_last: int = 3
    keep_best: bool = True
    compile: bool = False
    train_size: int | None = None
    test_size: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The configuration as a plain dict of JSON values."""
        return dataclasses.asdict(self)

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


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}

# Defaults that differ from the dataclass defaults, per architecture family.
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
    """The recipe's values for a (dataset, architecture) pair, before any override."""
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
    if dataset in QUICK_DATASETS:
        # The offline toy sets train in seconds; the paper's long schedules make no sense there.
        recipe.update(_QUICK)
    recipe["milestones"] = list(recipe["milestones"])
    return recipe


# Bounds for every numeric field: (low, high, low_inclusive).
_INT_BOUNDS = {
    "epochs": (1, 10_000),
    "batch_size": (1, 65_536),
    "seed": (0, 2**31 - 1),
    "num_workers": (0, 64),
    "keep_last": (1, 1_000),
    "train_size": (1, 100_000_000),
    "test_size": (1, 100_000_000),
}
_FLOAT_BOUNDS = {
    "dropout_rate": (0.0, 0.99),
    "sigma": (0.0, 10.0),
    "p_min": (0.0, 1.0),
    "p_max": (0.0, 1.0),
    "lr": (1e-12, 100.0),
    "momentum": (0.0, 0.999),
    "weight_decay": (0.0, 1.0),
    "gamma": (1e-6, 1.0),
}
_BOOLS = ("nesterov", "augment", "batch_norm", "keep_best", "compile")
_OPTIONAL_STR = ("data_dir", "out_dir")


def _accepted_names(kind: str) -> list[str]:
    if kind == "dataset":
        from jumpout.data import list_datasets

        return list(list_datasets())
    if kind == "architecture":
        from jumpout.models import list_models

        return list(list_models())
    from jumpout.layer import list_ablations

    return list(list_ablations())


def _check_name(name: str, value: Any) -> str:
    accepted = _accepted_names(name)
    if name == "ablation" and isinstance(value, str):
        # Table-1 rows are written with capital roman numerals; accept any case.
        value = {row.lower(): row for row in accepted}.get(value.lower(), value)
    if not isinstance(value, str) or value not in accepted:
        raise ConfigError(name, f"unknown {name} {value!r}; accepted: {', '.join(accepted)}")
    return value


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(name, f"got {value!r}; accepted: {', '.join(choices)}")
    return value


def _check_int(name: str, value: Any) -> int:
    low, high = _INT_BOUNDS[name]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(name, f"must be an integer in [{low}, {high}], got {value!r}")
    if not low <= value <= high:
        raise ConfigError(name, f"must be an integer in [{low}, {high}], got {value}")
    return value


def _check_float(name: str, value: Any) -> float:
    low, high = _FLOAT_BOUNDS[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(name, f"must be a number in [{low:g}, {high:g}], got {value!r}")
    value = float(value)
    if not math.isfinite(value) or not low <= value <= high:
        raise ConfigError(name, f"must be a number in [{low:g}, {high:g}], got {value!r}")
    return value


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(name, f"must be true or false, got {value!r}")
    return value


def _check_milestones(value: Any, epochs: int) -> list[int]:
    if not isinstance(value, list | tuple) or any(
        isinstance(m, bool) or not isinstance(m, int) for m in value
    ):
        raise ConfigError("milestones", f"must be a list of epoch numbers, got {value!r}")
    value = list(value)
    if value != sorted(set(value)) or any(m < 1 for m in value):
        raise ConfigError("milestones", f"must be strictly increasing positive epochs, got {value}")
    return value


def resolve_config(dataset: str, architecture: str, **overrides: Any) -> TrainConfig:
    """Fill the recipe defaults for ``(dataset, architecture)`` and apply ``overrides``.

    Every `TrainConfig` field may be overridden. An override of ``None`` for a field that does not
    accept ``None`` means "keep the recipe's value" (so command-line parsers and API schemas can
    pass unset options through).

    Raises:
        ConfigError: an unknown field, an unknown dataset / architecture / ablation name, or a value
            out of range; the error names the field and what is accepted.
    """
    unknown = sorted(set(overrides) - set(_FIELDS) - {"dataset", "architecture"})
    if unknown:
        raise ConfigError(unknown[0], f"unknown field; accepted: {', '.join(sorted(_FIELDS))}")
    dataset = _check_name("dataset", dataset)
    architecture = _check_name("architecture", architecture)

    values: dict[str, Any] = {
        f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
        for f in _FIELDS.values()
        if f.name not in ("dataset", "architecture")
    }
    values.update(recipe_defaults(dataset, architecture))
    nullable = {"ablation", "data_dir", "out_dir", "train_size", "test_size"}
    for key, value in overrides.items():
        if value is None and key not in nullable:
            continue
        values[key] = value

    values["method"] = _check_choice("method", values["method"], METHODS)
    values["schedule"] = _check_choice("schedule", values["schedule"], SCHEDULES)
    values["device"] = _check_choice("device", values["device"], DEVICES)
    for name in _INT_BOUNDS:
        if values[name] is not None or name not in nullable:
            values[name] = _check_int(name, values[name])
    for name in _FLOAT_BOUNDS:
        values[name] = _check_float(name, values[name])
    for name in _BOOLS:
        values[name] = _check_bool(name, values[name])
    for name in _OPTIONAL_STR:
        if values[name] is not None and not isinstance(values[name], str):
            raise ConfigError(name, f"must be a directory path or null, got {values[name]!r}")
    values["milestones"] = _check_milestones(values["milestones"], values["epochs"])

    if values["p_min"] >= values["p_max"]:
        raise ConfigError(
            "p_min", f"must be below p_max ({values['p_max']:g}), got {values['p_min']:g}"
        )
    if values["nesterov"] and values["momentum"] <= 0:
        raise ConfigError("nesterov", "Nesterov momentum needs momentum > 0; set nesterov=false")
    if values["ablation"] is not None:
        values["ablation"] = _check_name("ablation", values["ablation"])
        if values["method"] != "jumpout":
            given = overrides.get("method")
            if given not in (None, "jumpout"):
                raise ConfigError(
                    "ablation",
                    "a Table-1 ablation is a jumpout variant and needs method 'jumpout', "
                    f"got {given!r}",
                )
            values["method"] = "jumpout"
    return TrainConfig(dataset=dataset, architecture=architecture, **values)
