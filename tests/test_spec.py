"""Recipe defaults per (dataset, architecture), overrides and ConfigError messages."""

from __future__ import annotations

import dataclasses
import json

import pytest

from jumpout.data import list_datasets
from jumpout.layer import list_ablations
from jumpout.models import list_models
from jumpout.spec import ConfigError, TrainConfig, resolve_config


def test_wrn_recipe():
    config = resolve_config("cifar10", "wrn_28_10")
    assert (config.lr, config.momentum, config.nesterov) == (0.1, 0.9, True)
    assert (config.weight_decay, config.batch_size, config.epochs) == (5e-4, 128, 200)
    assert (config.schedule, config.milestones, config.gamma) == ("step", [60, 120, 160], 0.2)


def test_preact_resnet_fashion_recipe():
    config = resolve_config("fashion_mnist", "resnet_preact_20")
    assert (config.lr, config.weight_decay, config.epochs) == (0.1, 1e-4, 160)
    assert (config.schedule, config.milestones, config.gamma) == ("step", [80, 120], 0.1)


def test_small_cnn_v3_recipe():
    config = resolve_config("cifar10", "cnn_small")
    assert (config.lr, config.weight_decay, config.epochs, config.dropout_rate) == (
        0.01,
        0.0,
        50,
        0.5,
    )
    assert config.schedule == "step_momentum"
    assert (config.milestones, config.gamma) == ([10, 20, 30, 40], 0.5)
    assert config.batch_norm is False


def test_resnet18_imagenet_recipe():
    config = resolve_config("imagenet", "resnet18")
    assert (config.lr, config.weight_decay, config.batch_size, config.epochs) == (
        0.1,
        1e-4,
        256,
        90,
    )
    assert (config.milestones, config.gamma) == ([30, 60], 0.1)


@pytest.mark.parametrize("dataset", ["digits", "synthetic"])
def test_quick_recipe_for_toy_datasets(dataset):
    config = resolve_config(dataset, "mlp")
    assert (config.epochs, config.batch_size, config.lr, config.schedule) == (
        20,
        64,
        0.05,
        "cosine",
    )
    # Toy sets keep the quick schedule even with a paper architecture.
    assert resolve_config(dataset, "wrn_16_8").epochs == 20


def test_jumpout_defaults_are_the_papers():
    config = resolve_config("digits", "mlp")
    assert (config.method, config.sigma, config.p_min, config.p_max) == ("jumpout", 0.1, 0.01, 0.6)


def test_every_pair_resolves_and_round_trips_through_json():
    for dataset in list_datasets():
        for architecture in list_models():
            config = resolve_config(dataset, architecture)
            values = json.loads(json.dumps(dataclasses.asdict(config)))
            assert TrainConfig(**values) == config
            assert TrainConfig.from_dict(values) == config


def test_overrides_apply():
    config = resolve_config(
        "cifar10", "wrn_16_8", epochs=3, lr=0.2, method="dropout", milestones=(1, 2), seed=7
    )
    assert (config.epochs, config.lr, config.method, config.milestones, config.seed) == (
        3,
        0.2,
        "dropout",
        [1, 2],
        7,
    )


def test_none_override_keeps_recipe_value_but_nullable_fields_take_none():
    config = resolve_config("cifar10", "wrn_16_8", lr=None, train_size=None, data_dir=None)
    assert config.lr == 0.1 and config.train_size is None and config.data_dir is None


def test_ablation_implies_jumpout_and_accepts_any_case():
    config = resolve_config("digits", "mlp", ablation="Dropout+i+ii", method=None)
    assert config.ablation == "dropout+I+II" and config.method == "jumpout"
    assert set(list_ablations()) >= {config.ablation}


@pytest.mark.parametrize(
    ("overrides", "field", "fragment"),
    [
        ({"bogus": 1}, "bogus", "unknown field"),
        ({"epochs": 0}, "epochs", "[1, 1000]"),
        ({"epochs": 2.5}, "epochs", "integer"),
        ({"epochs": True}, "epochs", "integer"),
        ({"lr": float("nan")}, "lr", "number"),
        ({"lr": "fast"}, "lr", "number"),
        ({"method": "dropconnect"}, "method", "none, dropout, jumpout"),
        ({"schedule": "linear"}, "schedule", "step, cosine"),
        ({"device": "tpu"}, "device", "auto, cpu, cuda"),
        ({"p_min": 0.7}, "p_min", "below p_max"),
        ({"nesterov": True, "momentum": 0.0}, "nesterov", "momentum"),
        ({"milestones": [5, 3]}, "milestones", "increasing"),
        ({"augment": "yes"}, "augment", "true or false"),
        ({"ablation": "dropout+IV"}, "ablation", "jumpout"),
        ({"ablation": "jumpout", "method": "dropout"}, "ablation", "method 'jumpout'"),
        ({"train_size": 0}, "train_size", "integer"),
        ({"out_dir": 3}, "out_dir", "directory"),
    ],
)
def test_bad_values_name_the_field(overrides, field, fragment):
    with pytest.raises(ConfigError) as caught:
        resolve_config("digits", "mlp", **overrides)
    assert caught.value.field == field
    assert fragment in caught.value.message
    assert str(caught.value).startswith(f"{field}: ")


def test_unknown_dataset_lists_accepted_names():
    with pytest.raises(ConfigError) as caught:
        resolve_config("mnist-ish", "mlp")
    assert caught.value.field == "dataset"
    for name in list_datasets():
        assert name in caught.value.message


def test_unknown_architecture_lists_accepted_names():
    with pytest.raises(ConfigError) as caught:
        resolve_config("digits", "vgg16")
    assert caught.value.field == "architecture"
    assert all(name in caught.value.message for name in list_models())


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)
