"""Command-line options generated from the training spec (`jumpout.spec.FIELDS`), shared by the
library's command line (``python -m jumpout train``) and the service's client
(``jumpout-client submit``), so both take the same flags and refuse a bad value with the spec's
own one-line message.

Values are parsed and checked by the spec (`FieldSpec.parse`), not by argparse: a bad one raises
`jumpout.spec.ConfigError` naming the field, which each program prints as ``error: ...`` with exit
status 2. This module imports neither torch nor anything of the service.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping
from typing import Any

from jumpout.spec import FIELDS, REQUIRED

__all__ = ["add_spec_options", "spec_values"]

_REGULARISATION = ("method", "ablation", "dropout_rate", "sigma", "p_min", "p_max")
_OPERATOR_LIKE = ("keep_last", "keep_best", "compile")


def add_spec_options(
    parser: argparse.ArgumentParser,
    names: Iterable[str] | None = None,
    *,
    defaults: Mapping[str, Any] | None = None,
) -> None:
    """One option per spec field in `names` (default: all of `FIELDS`, in their order), grouped
    as ``--help`` shows them; unset ones stay None ("the recipe's value"). `defaults` gives a
    program's own default for a field (the library's command line: ``data_dir``)."""
    defaults = defaults or {}
    groups = {
        "required": parser.add_argument_group("what to train"),
        "regularisation": parser.add_argument_group("regularisation"),
        "optimisation": parser.add_argument_group("optimisation (defaults: the recipe)"),
        "operator": parser.add_argument_group("data, output and device"),
    }
    wanted = set(FIELDS if names is None else names)
    for name, spec in FIELDS.items():
        if name not in wanted:
            continue
        flags = ["--" + name.replace("_", "-"), *spec.flags]
        help_text = f"{spec.help}: {spec.accepted()}"
        if spec.recipe:
            help_text += " (default: the recipe's)"
        if name in REQUIRED:
            group = groups["required"]
        elif name in _REGULARISATION:
            group = groups["regularisation"]
        elif spec.operator or name in _OPERATOR_LIKE:
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
            default=defaults.get(name),
            metavar=metavar,
            help=help_text.replace("%", "%%"),
        )


def spec_values(args: argparse.Namespace) -> dict[str, Any]:
    """The spec's fields given on the command line, each string parsed and checked by its
    `FieldSpec` (`ConfigError` on a bad one); options that are not spec fields are left out."""
    values = {}
    for key, value in vars(args).items():
        if value is None or key not in FIELDS:
            continue
        values[key] = FIELDS[key].parse(value) if isinstance(value, str) else value
    return values
