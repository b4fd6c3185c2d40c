"""`jumpout.load_model`: a checkpoint file rebuilds its trained model with no guessing.

Each test trains a tiny job with `fit`, rebuilds the model from the checkpoint file alone and
checks it answers exactly as the trained model does (eval mode, bit for bit on the CPU).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import jumpout
from jumpout.engine import MODEL_ARGS_KEY, fit, list_checkpoints, load_checkpoint
from jumpout.layer import Jumpout
from jumpout.spec import resolve_config


def train(tmp_path: Path, dataset: str, architecture: str, **overrides):
    values = dict(
        epochs=2, batch_size=32, train_size=128, test_size=64, device="cpu", seed=5,
        out_dir=str(tmp_path / "run"),
    )  # fmt: skip
    values.update(overrides)
    return fit(resolve_config(dataset, architecture, **values))


def same_outputs(trained: torch.nn.Module, rebuilt: torch.nn.Module, images: torch.Tensor) -> bool:
    trained.eval()
    with torch.no_grad():
        return torch.equal(trained(images), rebuilt(images))


@pytest.mark.parametrize(
    ("method", "slot"),
    [("jumpout", Jumpout), ("dropout", torch.nn.Dropout)],
)
def test_an_mlp_rebuilds_from_its_checkpoint(tmp_path, method, slot):
    result = train(tmp_path, "digits", "mlp", method=method, dropout_rate=0.2)
    model = jumpout.load_model(result.last_checkpoint)

    assert not model.training
    assert any(isinstance(module, slot) for module in model.modules())
    images = torch.rand(16, 1, 8, 8) * 16  # digits: 8x8 grey, values 0..16
    assert same_outputs(result.model, model, images)
    arguments = load_checkpoint(result.last_checkpoint)[MODEL_ARGS_KEY]
    assert arguments["architecture"] == "mlp" and arguments["num_classes"] == 10
    assert arguments["regularizer"]["kind"] == method


def test_a_table1_row_keeps_what_fills_its_slots(tmp_path):
    result = train(tmp_path, "digits", "mlp", ablation="dropout+II", epochs=1)
    model = jumpout.load_model(result.last_checkpoint)

    layers = [module for module in model.modules() if isinstance(module, Jumpout)]
    assert layers and all(layer.adaptive and layer.rate is not None for layer in layers)
    assert same_outputs(result.model, model, torch.rand(8, 1, 8, 8) * 16)


def test_a_small_cnn_rebuilds_at_its_data_set_size(tmp_path):
    # synthetic: 32x32 colour images; cnn_small's dense head depends on the image size.
    result = train(
        tmp_path, "synthetic", "cnn_small", epochs=1, train_size=64, test_size=32,
        method="jumpout", batch_norm=True,
    )  # fmt: skip
    model = jumpout.load_model(result.last_checkpoint)

    arguments = load_checkpoint(result.last_checkpoint)[MODEL_ARGS_KEY]
    assert arguments["options"] == {"batch_norm": True}
    assert (arguments["in_channels"], arguments["image_size"]) == (3, 32)
    assert same_outputs(result.model, model, torch.randn(4, 3, 32, 32))


def test_a_checkpoint_from_before_model_args_is_a_clear_error_and_still_resumes(tmp_path):
    first = train(tmp_path, "digits", "mlp", epochs=2)
    epoch_one = list_checkpoints(tmp_path / "run")[0]
    state = load_checkpoint(epoch_one)
    del state[MODEL_ARGS_KEY]  # what a checkpoint written before this change holds
    old = tmp_path / "old" / epoch_one.name
    old.parent.mkdir()
    torch.save(state, old)

    with pytest.raises(ValueError, match="written before checkpoints stored the model's"):
        jumpout.load_model(old)

    config = resolve_config(
        "digits", "mlp", epochs=2, batch_size=32, train_size=128, test_size=64, device="cpu",
        seed=5, out_dir=str(tmp_path / "resumed"),
    )  # fmt: skip
    resumed = fit(config, resume_from=old)
    for name, value in first.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"layer.weight": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="not a checkpoint written by jumpout's fit"):
        jumpout.load_model(path)
