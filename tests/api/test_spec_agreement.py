"""One spec, three doors: the API, the command line and the library accept and refuse the same
boundary values of every field, with the same message naming the field.

The cases are generated from `jumpout.spec.FIELDS` itself (bounds, open ends, choices), so a field
added to the spec is walked without touching this file.
"""

from __future__ import annotations

import math
import subprocess
import sys
from typing import Any

import pytest

from jobstore import datasets
from jobstore.errors import InvalidSpec
from jumpout import cli
from jumpout.spec import FIELDS, ConfigError, FieldSpec, resolve_config

PAIR = {"dataset": "digits", "architecture": "mlp"}
# Values other fields need so that a boundary of this one is judged alone (p_min must stay below
# p_max, Nesterov needs momentum).
COMPANIONS: dict[str, dict[str, Any]] = {
    "p_min": {"p_max": math.nextafter(1.0, 0.0)},
    "p_max": {"p_min": 0.0},
    "momentum": {"nesterov": False},
    # Only svhn has an extra split; elsewhere svhn_extra=true is refused as a rule across fields.
    "svhn_extra": {"dataset": "svhn"},
}


def _just_outside(bound: float, kind: str, direction: int) -> float | int:
    if kind == "int":
        return int(bound) + direction
    return bound + direction * max(1e-6, abs(bound) * 1e-6)


def boundary_cases(spec: FieldSpec) -> list[tuple[Any, bool]]:
    """(value, accepted) pairs at and around the field's boundaries."""
    if spec.kind in ("int", "float"):
        cases = [
            (spec.low, not spec.low_open),
            (spec.high, not spec.high_open),
            (_just_outside(spec.low, spec.kind, -1), False),
            (_just_outside(spec.high, spec.kind, +1), False),
        ]
        if spec.kind == "float" and spec.name != "p_min":  # p_min must stay below p_max < 1
            cases.append((math.nextafter(spec.high, -math.inf), True))
        return [(int(v) if spec.kind == "int" else float(v), ok) for v, ok in cases]
    if spec.kind == "bool":
        return [(True, True), (False, True), ("maybe", False)]
    if spec.kind == "choice":
        return [*((choice, True) for choice in spec.choices), ("no-such-" + spec.name, False)]
    if spec.kind == "epochs":
        high = int(FIELDS["epochs"].high)
        return [([1, high], True), ([0], False), ([5, 3], False), ([high + 1], False)]
    return [("some/directory", True)]


CASES = [
    pytest.param(name, value, accepted, id=f"{name}={value!r}")
    for name, spec in FIELDS.items()
    for value, accepted in boundary_cases(spec)
]


def config_verdict(name: str, value: Any) -> str | None:
    """None when the library accepts the value, else its message."""
    values = {**PAIR, **COMPANIONS.get(name, {}), name: value}
    try:
        resolve_config(values.pop("dataset"), values.pop("architecture"), **values)
    except ConfigError as error:
        assert error.field == name, error
        return error.message
    return None


def cli_text(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def cli_verdict(name: str, value: Any) -> str | None:
    spec = FIELDS[name]
    values = {**PAIR, **COMPANIONS.get(name, {}), name: value}
    argv = ["train"]
    for key, item in values.items():
        flag = "--" + key.replace("_", "-")
        if FIELDS[key].kind == "bool" and isinstance(item, bool):
            argv.append(flag if item else "--no-" + key.replace("_", "-"))
        else:
            argv.append(f"{flag}={cli_text(item)}")  # --sigma=-0.1: argparse's way
    if spec.kind == "bool" and not isinstance(value, bool):
        # A switch takes no value on the command line: --augment / --no-augment.
        return config_verdict(name, value)
    args = cli.build_parser().parse_args(argv)
    try:
        cli._config_from_args(args)
    except ConfigError as error:
        assert error.field == name, error
        return error.message
    return None


@pytest.mark.parametrize(("name", "value", "accepted"), CASES)
def test_config_and_command_line_agree_on_every_boundary(name, value, accepted):
    verdict = config_verdict(name, value)
    assert (verdict is None) == accepted, verdict
    assert cli_verdict(name, value) == verdict


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize(
    ("name", "value", "accepted"), [case for case in CASES if not FIELDS[case.values[0]].operator]
)
def test_the_api_agrees_with_the_library_on_every_boundary(client, settings, name, value, accepted):
    body = {**PAIR, **COMPANIONS.get(name, {}), name: value}
    response = client.post("/v1/jobs", json=body)
    verdict = config_verdict(name, value)
    if accepted:
        # What the spec accepts, this server may still be unable to run (a data set whose files
        # it lacks, a cap beyond the data set: jobstore.datasets), and says so the same way.
        values = {**body, "data_dir": str(settings.data_dir)}
        config = resolve_config(values.pop("dataset"), values.pop("architecture"), **values)
        try:
            datasets.check_trainable(config)
        except InvalidSpec as refused:
            assert name in ("dataset", "svhn_extra", "train_size", "test_size"), refused.fields
            assert response.status_code == 422, response.text
            fields = {f["field"]: f["message"] for f in response.json()["error"]["fields"]}
            assert fields == {f.field: f.message for f in refused.fields}
            return
        assert response.status_code == 201, response.text
        return
    assert response.status_code == 422, response.text
    fields = {f["field"]: f["message"] for f in response.json()["error"]["fields"]}
    assert fields == {name: verdict}


def test_the_api_refuses_the_fields_the_server_decides(client):
    operator_fields = [name for name, spec in FIELDS.items() if spec.operator]
    assert operator_fields  # paths, device, loader processes
    for name in operator_fields:
        response = client.post("/v1/jobs", json={**PAIR, name: "x"})
        assert response.status_code == 422
        assert response.json()["error"]["fields"][0]["field"] == name


def test_the_openapi_schema_states_the_spec_bounds_and_choices(client):
    schema = client.get("/openapi.json").json()["components"]["schemas"]["JobCreate"]
    properties = schema["properties"]
    # Every client field of the spec, and the one field that is not about training.
    assert set(properties) == {name for name, spec in FIELDS.items() if not spec.operator} | {
        "priority"
    }
    assert schema["required"] == ["dataset", "architecture"]
    assert properties["dataset"]["enum"] == list(FIELDS["dataset"].choices)
    lr = next(option for option in properties["lr"]["anyOf"] if option.get("type") == "number")
    assert (lr["exclusiveMinimum"], lr["maximum"]) == (0, 10)


@pytest.mark.parametrize("argv", [["--p-max", "1.0"], ["--epochs", "many"], ["--lr", "nan"]])
def test_a_bad_command_line_value_is_one_line_and_status_2(argv):
    result = subprocess.run(
        [sys.executable, "-m", "jumpout", "train", "--dataset", "digits", "--arch", "mlp", *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: " + argv[0][2:].replace("-", "_"))
    assert "Traceback" not in result.stderr


def test_every_value_the_spec_accepts_builds_a_layer():
    # The layer validates its own arguments (it is used outside the spec too): nothing the spec
    # accepts may reach it as a traceback.
    from jumpout.models import Regularizer

    for p_min, p_max in ((0.0, math.nextafter(1.0, 0.0)), (0.0, 1e-9)):
        for ablation in (None, *FIELDS["ablation"].choices):
            Regularizer.from_method(
                "jumpout",
                dropout_rate=0.99,
                sigma=10.0,
                p_min=p_min,
                p_max=p_max,
                ablation=ablation,
            ).build()
    for rate in (0.0, FIELDS["dropout_rate"].high):
        Regularizer.from_method(
            "dropout", dropout_rate=rate, sigma=0.1, p_min=0.01, p_max=0.6
        ).build()
