"""Realised rates and drifts: what the dropout slots of every registered model actually do.

"No row may sit at the cap for most of its steps": every Table-1 row, on every registered
model, with the model's recipe rate: the rows with modification II train a few steps on
synthetic images (CPU, small images) and no slot's rate reaches ``max_rate`` in more than half of
them; the rows without II (no cap applied) are checked to report 0 on one forward. Another test
shows the old choice for the rows with II but not I (the fixed dropout rate as base) sitting at
the cap.

The Figure 3 probe (`jumpout.engine._measure_drift`) is checked for what the paper's analysis
predicts of a slot's output (mean kept by ``(1 - p)^-1``, variance inflated; ``(1 - p)^-0.5``
closer in variance), for leaving training untouched, and end to end through `fit`.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from jumpout.data import load_dataset
from jumpout.engine import _measure_drift, fit
from jumpout.layer import Jumpout, list_ablations
from jumpout.models import Regularizer, create_model, list_models
from jumpout.spec import TABLE1_ROWS, resolve_config

# Each model with the data set the paper (or our quick recipe) trains it on: the recipe's rate.
PAPER_DATASET = {
    "cnn_small": "cifar10",
    "mlp": "digits",
    "resnet18": "imagenet",
    "resnet_preact_20": "fashion_mnist",
    "wrn_16_8": "svhn",
    "wrn_28_10": "cifar10",
}
# Small images keep the big networks to a fraction of a second per step on the CPU.
IMAGE_SIZE = {"cnn_small": 16, "mlp": 8}
STEPS = 2
BATCH = 8
ADAPTIVE_ROWS = [row for row, mods in TABLE1_ROWS.items() if "II" in mods]


def set_slots(model: nn.Module, regularizer: Regularizer) -> int:
    """Fill every Jumpout slot of ``model`` with a fresh layer of ``regularizer`` (the layer has
    no parameters, so this is the model built with that regulariser); return the slot count."""
    count = 0
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, Jumpout):
                setattr(module, name, regularizer.build())
                count += 1
    return count


def capped_fractions(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, lr: float):
    """Train ``STEPS`` SGD steps; return each slot's mean capped fraction over them (what the
    engine reports per epoch)."""
    slots = [m for m in model.modules() if isinstance(m, Jumpout)]
    sums = torch.zeros(len(slots))
    # No momentum: over a few steps it changes nothing, and its buffers cost WRN-28-10 time.
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    for step in range(STEPS):
        x = images[step * BATCH : (step + 1) * BATCH]
        y = labels[step * BATCH : (step + 1) * BATCH]
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        sums += torch.stack([slot.last_capped_fraction for slot in slots])
    return (sums / STEPS).tolist()


@pytest.fixture(scope="module")
def models_and_data():
    """Per registered model: its initial weights, once (the rows refill the slots)."""
    built = {}
    for name in list_models():
        size = IMAGE_SIZE.get(name, 8)
        torch.manual_seed(0)
        model = create_model(name, 10, 3, Regularizer("jumpout"), image_size=size)
        train, _, _ = load_dataset("synthetic", ".", image_size=size, size=STEPS * BATCH)
        images, labels = train.tensors
        built[name] = (model, copy.deepcopy(model.state_dict()), images, labels)
    return built


def test_every_registered_model_is_covered():
    assert set(PAPER_DATASET) == set(list_models())


@pytest.mark.parametrize("name", sorted(PAPER_DATASET))
def test_no_table1_row_sits_at_the_cap_on_any_model(name, models_and_data):
    model, initial, images, labels = models_and_data[name]
    for row in list_ablations():
        config = resolve_config(PAPER_DATASET[name], name, ablation=row)
        assert config.ii_base_rate == "matched"
        model.load_state_dict(initial)
        assert set_slots(model, Regularizer.from_config(config)) > 0
        torch.manual_seed(1)
        if row in ADAPTIVE_ROWS:
            capped = capped_fractions(model, images, labels, min(config.lr, 0.05))
            assert max(capped) <= 0.5, (name, row, capped)
        else:
            # Without II there is no cap to reach; one forward shows the layers report so.
            model.train()(images[:BATCH])
            capped = [
                m.last_capped_fraction.item() for m in model.modules() if isinstance(m, Jumpout)
            ]
            assert capped and max(capped) == 0.0, (name, row, capped)


def test_the_old_ii_base_rate_sits_at_the_cap_on_cnn_small(models_and_data):
    """What the test above would have caught: with the dropout rate itself as base (0.5 on the
    small CNN) p' = 0.5 / q+ reaches the cap in the dense slots, where q+ is about a half."""
    model, initial, images, labels = models_and_data["cnn_small"]
    for row in ("dropout+II", "dropout+II+III"):
        config = resolve_config("cifar10", "cnn_small", ablation=row, ii_base_rate="dropout_rate")
        model.load_state_dict(initial)
        set_slots(model, Regularizer.from_config(config))
        torch.manual_seed(1)
        capped = capped_fractions(model, images, labels, config.lr)
        assert max(capped) > 0.5, capped


def test_engine_reports_capped_fraction_per_slot_and_epoch():
    config = resolve_config(
        "digits",
        "mlp",
        ablation="dropout+II",
        ii_base_rate="dropout_rate",
        dropout_rate=0.6,  # 0.6 / q+ >= 0.9 wherever q+ <= 2/3: about always
        epochs=2,
        batch_size=32,
        train_size=192,
        test_size=64,
        device="cpu",
    )
    history = fit(config).history
    for epoch in history:
        assert len(epoch["layers"]) == 2
        for layer in epoch["layers"]:
            assert layer["capped_fraction"] > 0.9
            assert layer["rate"] == pytest.approx(0.9, abs=0.05)
    matched = fit(config.__class__.from_dict({**config.to_dict(), "ii_base_rate": "matched"}))
    for epoch in matched.history:
        for layer in epoch["layers"]:
            assert 0.0 <= layer["capped_fraction"] < 0.5


# ---------------------------------------------------------------------------------------------
# Figure 3, measured


def probe_run(model: nn.Module, probe: torch.Tensor, batch_size: int = 256) -> SimpleNamespace:
    """The parts of the engine's run that `_measure_drift` reads."""
    return SimpleNamespace(
        model=model,
        layers=[(name, m) for name, m in model.named_modules() if isinstance(m, Jumpout)],
        probe=probe,
        config=SimpleNamespace(batch_size=batch_size),
        device=torch.device("cpu"),
        channels_last=False,
        autocast=torch.autocast("cpu", enabled=False),
        data=SimpleNamespace(train_len=len(probe)),
    )


def slot_after_relu(exponent: float, rate: float = 0.2) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(32, 512),
        nn.ReLU(),
        Jumpout(rate=rate, adaptive=False, exponent=exponent),
        nn.Linear(512, 10),
    )


def test_probe_mean_and_variance_drift_follow_the_rescaling():
    """The paper (Sec. 3.3): (1 - p)^-1 keeps the mean and not the variance; (1 - p)^-0.5 keeps
    the second moment, so its variance ratio is closer to 1. Per-channel statistics over 4096
    inputs: the tolerances are several standard errors."""
    probe = torch.randn(4096, 32, generator=torch.Generator().manual_seed(5))
    drifts = {}
    for exponent in (1.0, 0.75, 0.5):
        model = slot_after_relu(exponent).train()
        ((mean_drift, var_drift),) = _measure_drift(probe_run(model, probe))
        drifts[exponent] = (mean_drift, var_drift)
    mean_one, var_one = drifts[1.0]
    assert mean_one == pytest.approx(1.0, abs=0.01)
    assert var_one > 1.2  # E[x^2] / (1 - p) - E[x]^2 over E[x^2] - E[x]^2, for p = 0.2
    mean_half, var_half = drifts[0.5]
    assert mean_half == pytest.approx(0.8**0.5, abs=0.01)
    assert abs(var_half - 1) < abs(var_one - 1) - 0.1
    # The paper's trade-off sits in between for both.
    mean_three, var_three = drifts[0.75]
    assert mean_half < mean_three < mean_one
    assert var_half < var_three < var_one


def test_probe_leaves_the_rng_the_layers_and_batch_norm_untouched():
    model = nn.Sequential(
        nn.Linear(16, 64),
        nn.BatchNorm1d(64),
        nn.ReLU(),
        Jumpout(),
        nn.Linear(64, 64),
        nn.BatchNorm1d(64),
        nn.ReLU(),
        Jumpout(),
        nn.Linear(64, 3),
    ).train()
    model(torch.randn(32, 16))  # a training step's forward: running stats, last_* set
    slots = [m for m in model.modules() if isinstance(m, Jumpout)]
    before_stats = [(s.last_active_fraction, s.last_rate, s.last_capped_fraction) for s in slots]
    before_buffers = {k: v.clone() for k, v in model.state_dict().items()}
    probe = torch.randn(100, 16)
    rng = torch.get_rng_state()

    drifts = _measure_drift(probe_run(model, probe, batch_size=32))

    assert len(drifts) == 2 and all(d is not None for pair in drifts for d in pair)
    assert torch.equal(torch.get_rng_state(), rng)
    after_stats = [(s.last_active_fraction, s.last_rate, s.last_capped_fraction) for s in slots]
    assert all(
        a is b
        for pair in zip(before_stats, after_stats, strict=True)
        for a, b in zip(*pair, strict=True)
    )
    for key, value in model.state_dict().items():
        assert torch.equal(value, before_buffers[key]), key
    assert model.training and all(m.training for m in model.modules())


def test_probe_does_not_change_training_and_reports_per_epoch(monkeypatch):
    from jumpout import engine

    config = resolve_config(
        "digits",
        "mlp",
        epochs=2,
        batch_size=32,
        train_size=160,
        test_size=64,
        device="cpu",
        seed=4,
    )
    probed = fit(config)
    monkeypatch.setattr(engine, "PROBE_SIZE", 0)
    unprobed = fit(config)
    for a, b in zip(
        probed.model.state_dict().values(), unprobed.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)
    for epoch in probed.history:
        for layer in epoch["layers"]:
            assert 0.5 < layer["mean_drift"] < 1.5
            assert layer["var_drift"] > 0
    for epoch in unprobed.history:
        assert all(layer["mean_drift"] is None for layer in epoch["layers"])


def test_probe_images_are_fixed_and_unaugmented(tmp_path, monkeypatch):
    """The same images in every epoch and every run of a data set, whatever the seed: taken
    with a fixed generator from the plain training images."""
    from jumpout import engine

    seen = []
    original = engine._probe_images

    def spy(run):
        images = original(run)
        seen.append(images)
        return images

    monkeypatch.setattr(engine, "_probe_images", spy)
    for seed in (0, 7):
        config = resolve_config(
            "synthetic",
            "mlp",
            epochs=2,
            batch_size=64,
            train_size=300,
            test_size=40,
            device="cpu",
            seed=seed,
        )
        fit(config)
    assert len(seen) == 2  # taken once per run, at its first epoch's end
    assert torch.equal(seen[0], seen[1]) and len(seen[0]) == 256
    train, _, _ = load_dataset("synthetic", ".", train_size=300)
    assert any(torch.equal(seen[0][0], image) for image in train.tensors[0])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_probe_on_cuda_restores_the_device_rng_and_reports_from_fit():
    device = torch.device("cuda")
    model = slot_after_relu(1.0).to(device).train()
    run = probe_run(model, torch.randn(512, 32, device=device))
    run.device = device
    run.autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    before = torch.cuda.get_rng_state(device)
    ((mean_drift, var_drift),) = _measure_drift(run)
    assert torch.equal(torch.cuda.get_rng_state(device), before)
    assert mean_drift == pytest.approx(1.0, abs=0.05) and var_drift > 1.1

    config = resolve_config("synthetic", "cnn_small", epochs=1, device="cuda", batch_norm=True)
    (epoch,) = fit(config).history
    assert len(epoch["layers"]) == 3
    for layer in epoch["layers"]:
        assert layer["mean_drift"] is not None and layer["var_drift"] is not None
        assert 0.0 <= layer["capped_fraction"] <= 1.0
