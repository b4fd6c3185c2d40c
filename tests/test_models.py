"""Model registry: output shapes, what fills the dropout slots, and the Regularizer factory."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from jumpout.layer import Jumpout, list_ablations
from jumpout.models import (
    PreActBlock,
    Regularizer,
    WideResNet,
    count_parameters,
    create_model,
    list_models,
)

# Expected number of slots per model (WRN-16-8: 3 stages x 2 blocks; ResNet-20: 3 x 3).
SLOTS = {"mlp": 2, "cnn_small": 3, "wrn_16_8": 6, "wrn_28_10": 12, "resnet_preact_20": 9,
         "resnet18": 1}  # fmt: skip
SLOT_TYPES = (nn.Identity, nn.Dropout, Jumpout)


def slots(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, SLOT_TYPES)]


def test_list_models_is_sorted_and_complete():
    assert list_models() == sorted(SLOTS)


def test_unknown_model_lists_the_known_names():
    with pytest.raises(ValueError, match="unknown model 'vgg'.*cnn_small.*wrn_28_10"):
        create_model("vgg", 10, 3, Regularizer())


# Small inputs keep the forward passes cheap; the (in_channels, image_size) pairs cover the
# grey-scale and colour datasets of the project (digits 8x8, Fashion 28, CIFAR 32).
@pytest.mark.parametrize(
    ("name", "in_channels", "image_size"),
    [
        ("mlp", 1, 8),
        ("mlp", 3, 32),
        ("cnn_small", 3, 32),
        ("cnn_small", 1, 8),
        ("cnn_small", 1, 28),
        ("resnet_preact_20", 1, 28),
        ("resnet_preact_20", 3, 8),
        ("wrn_16_8", 3, 8),
        ("resnet18", 3, 32),
        ("resnet18", 1, 8),
    ],
)
def test_forward_shape(name, in_channels, image_size):
    torch.manual_seed(0)
    model = create_model(name, 7, in_channels, Regularizer("jumpout"), image_size=image_size)
    x = torch.randn(2, in_channels, image_size, image_size)
    model.train()
    assert model(x).shape == (2, 7)
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


def test_cnn_small_matches_the_v3_shapes():
    model = create_model("cnn_small", 10, 3, Regularizer("dropout", rate=0.5))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [c.out_channels for c in convs] == [64, 64, 128, 128]
    assert all(c.kernel_size == (3, 3) for c in convs)
    assert [(m.in_features, m.out_features) for m in linears] == [
        (128 * 8 * 8, 256),
        (256, 256),
        (256, 10),
    ]
    # Each dense layer is preceded by its slot, none in the convolutional part.
    head = list(model.classifier)
    assert [type(m) for m in head[::3]] == [nn.Dropout] * 3
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_cnn_small_batch_norm_after_every_conv():
    model = create_model("cnn_small", 10, 3, Regularizer(), batch_norm=True)
    layers = list(model.features)
    for i, layer in enumerate(layers):
        if isinstance(layer, nn.Conv2d):
            assert isinstance(layers[i + 1], nn.BatchNorm2d)
            assert layer.bias is None


def execution_order(model: nn.Module, x: torch.Tensor) -> list[nn.Module]:
    """The leaf modules in the order a forward pass calls them (traced with hooks)."""
    called: list[nn.Module] = []
    handles = [
        module.register_forward_hook(lambda module, _inputs, _output: called.append(module))
        for module in model.modules()
        if not list(module.children())
    ]
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    return called


def slots_feeding_a_batch_norm(model: nn.Module, x: torch.Tensor) -> list[int]:
    """Indices (in call order) of the Jumpout slots whose output a BatchNorm consumes directly
    or after at most one linear or convolutional layer."""
    order = execution_order(model, x)
    slots_seen = [i for i, module in enumerate(order) if isinstance(module, Jumpout)]
    feeding = []
    for number, i in enumerate(slots_seen):
        following = order[i + 1 : i + 3]
        if following and isinstance(following[0], nn.Linear | nn.Conv2d):
            following = following[1:]
        if following and isinstance(following[0], nn.BatchNorm1d | nn.BatchNorm2d):
            feeding.append(number)
    return feeding


def test_cnn_small_batch_norm_variant_has_a_batch_norm_after_a_dropout_slot():
    """Figure 2's variant must be able to show the train/test variance shift of dropout that
    modification III addresses: a BN has to read a slot's output through one linear layer."""
    x = torch.randn(4, 3, 32, 32)
    with_bn = create_model("cnn_small", 10, 3, Regularizer("jumpout"), batch_norm=True).train()
    assert slots_feeding_a_batch_norm(with_bn, x) == [0, 1]
    # The hidden dense layers lose their bias to the BN's shift; the classifier keeps its own.
    linears = [m for m in with_bn.modules() if isinstance(m, nn.Linear)]
    assert [m.bias is None for m in linears] == [True, True, False]
    without = create_model("cnn_small", 10, 3, Regularizer("jumpout"), batch_norm=False)
    assert slots_feeding_a_batch_norm(without.train(), x) == []
    # The older variant (BN after the convolutions only, before any slot) stays buildable for
    # its checkpoints, and shows why it could not stand for Figure 2.
    conv_only = create_model(
        "cnn_small", 10, 3, Regularizer("jumpout"), batch_norm=True, dense_batch_norm=False
    )
    assert slots_feeding_a_batch_norm(conv_only.train(), x) == []
    assert any(isinstance(m, nn.BatchNorm2d) for m in conv_only.modules())


def test_wrn_28_10_parameter_count():
    # Counting only: a forward pass of WRN-28-10 is too slow for the unit tests.
    model = create_model("wrn_28_10", 10, 3, Regularizer("dropout"))
    assert count_parameters(model) == pytest.approx(36.5e6, rel=0.01)
    assert len(slots(model)) == SLOTS["wrn_28_10"]


def test_wrn_16_8_parameter_count():
    model = create_model("wrn_16_8", 10, 3, Regularizer())
    assert count_parameters(model) == pytest.approx(11.0e6, rel=0.01)


def test_wide_resnet_rejects_bad_depth():
    with pytest.raises(ValueError, match="6n \\+ 4"):
        WideResNet(20, 2, 10, 3, Regularizer())


def test_wrn_init_is_kaiming_fan_in_with_unit_batch_norm():
    torch.manual_seed(0)
    model = create_model("wrn_16_8", 10, 3, Regularizer())
    conv = model.stages[2][0].conv2
    fan_in = conv.in_channels * 9
    assert conv.weight.std().item() == pytest.approx((2 / fan_in) ** 0.5, rel=0.05)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0)
    assert torch.all(model.fc.bias == 0)


def test_preact_block_slot_sits_after_the_inner_relu():
    block = PreActBlock(4, 4, 1, Regularizer("jumpout"))
    seen = {}
    block.dropout.register_forward_pre_hook(lambda m, args: seen.setdefault("input", args[0]))
    block.train()
    block(torch.randn(2, 4, 5, 5))
    assert (seen["input"] >= 0).all()
    assert block.dropout.last_active_fraction is not None


def test_resnet18_keeps_torchvision_state_dict_keys():
    import torchvision

    model = create_model("resnet18", 1000, 3, Regularizer("jumpout"), image_size=224)
    reference = torchvision.models.resnet18(weights=None)
    assert model.state_dict().keys() == reference.state_dict().keys()
    model.load_state_dict(reference.state_dict())  # pretrained weights load unchanged
    assert isinstance(model.dropout, Jumpout)


@pytest.mark.parametrize("name", ["mlp", "cnn_small", "wrn_16_8", "resnet_preact_20", "resnet18"])
@pytest.mark.parametrize("kind", ["none", "dropout", "jumpout"])
def test_every_slot_holds_a_fresh_layer_of_the_requested_kind(name, kind):
    regularizer = Regularizer(kind, rate=0.25, jumpout_kwargs={"sigma": 0.2, "p_max": 0.5})
    model = create_model(name, 10, 3, regularizer, image_size=8)
    found = slots(model)
    assert len(found) == SLOTS[name]
    assert len({id(m) for m in found}) == len(found)  # distinct instances
    expected = {"none": nn.Identity, "dropout": nn.Dropout, "jumpout": Jumpout}[kind]
    assert all(type(m) is expected for m in found)
    if kind == "dropout":
        assert all(m.p == 0.25 for m in found)
    if kind == "jumpout":
        assert all((m.sigma, m.p_max, m.p_min) == (0.2, 0.5, 0.01) for m in found)


def test_regularizer_build_returns_a_new_module_each_time():
    regularizer = Regularizer("jumpout")
    assert regularizer.build() is not regularizer.build()


def test_regularizer_rejects_unknown_kind():
    with pytest.raises(ValueError, match="none, dropout, jumpout"):
        Regularizer("dropconnect")
    with pytest.raises(ValueError, match="rate"):
        Regularizer("dropout", rate=1.0)


def make(method, ablation=None):
    return Regularizer.from_method(
        method, dropout_rate=0.4, sigma=0.15, p_min=0.02, p_max=0.5, ablation=ablation
    )


def test_from_method_plain_kinds():
    assert make("none").build().__class__ is nn.Identity
    dropout = make("dropout").build()
    assert type(dropout) is nn.Dropout and dropout.p == 0.4
    layer = make("jumpout").build()
    assert (layer.sigma, layer.p_min, layer.p_max, layer.rate) == (0.15, 0.02, 0.5, None)
    assert layer.adaptive and layer.exponent == 0.75
    with pytest.raises(ValueError, match="accepted methods"):
        make("drop")


@pytest.mark.parametrize(
    ("row", "random_rate", "adaptive", "exponent"),
    [
        ("dropout", False, False, 1.0),
        ("dropout+I", True, False, 1.0),
        ("dropout+II", False, True, 1.0),
        ("dropout+III", False, False, 0.75),
        ("dropout+I+II", True, True, 1.0),
        ("dropout+II+III", False, True, 0.75),
        ("dropout+I+III", True, False, 0.75),
        ("jumpout", True, True, 0.75),
    ],
)
def test_ablation_rows_map_to_jumpout_switches(row, random_rate, adaptive, exponent):
    regularizer = make("jumpout", ablation=row)
    assert regularizer.kind == "jumpout"
    layer = regularizer.build()
    assert isinstance(layer, Jumpout)
    # Rows without modification I use the spec's dropout rate as the fixed rate, except the
    # rows with II: by default (ii_base_rate "matched") half of it, so p' = p / q+ stays off the
    # cap.
    if random_rate:
        assert layer.rate is None
    else:
        assert layer.rate == pytest.approx(0.2 if adaptive else 0.4)
    assert (layer.adaptive, layer.exponent) == (adaptive, exponent)
    assert (layer.sigma, layer.p_min, layer.p_max) == (0.15, 0.02, 0.5)


def test_every_table1_row_is_covered():
    for row in list_ablations():
        assert isinstance(make("jumpout", ablation=row).build(), Jumpout)


def test_dropout_ablation_row_behaves_as_nn_dropout():
    layer = make("dropout", ablation="dropout").build()
    x = torch.rand(4000) + 0.5
    torch.manual_seed(0)
    out = layer.train()(x)
    kept = out != 0
    # Kept entries are scaled by 1 / (1 - p), dropped ones are zero; about p of them dropped.
    torch.testing.assert_close(out[kept], x[kept] / 0.6)
    assert (~kept).float().mean().item() == pytest.approx(0.4, abs=0.03)
    assert torch.equal(layer.eval()(x), x)


def test_ablation_with_method_none_is_rejected():
    with pytest.raises(ValueError, match="ablation"):
        make("none", ablation="jumpout")
    with pytest.raises(ValueError, match="unknown ablation"):
        make("jumpout", ablation="dropout+IV")


def test_from_config_reads_a_train_config_like_object():
    from types import SimpleNamespace

    config = SimpleNamespace(
        method="dropout", dropout_rate=0.3, sigma=0.1, p_min=0.01, p_max=0.6, ablation=None
    )
    assert Regularizer.from_config(config) == Regularizer("dropout", rate=0.3)


@pytest.mark.parametrize(
    ("mode", "expected"), [("matched", 0.15), ("mean_of_i", None), ("dropout_rate", 0.3)]
)
def test_from_config_threads_the_ii_base_rate(mode, expected):
    from jumpout.layer import mean_base_rate
    from jumpout.spec import resolve_config

    config = resolve_config(
        "digits", "mlp", ablation="dropout+II", dropout_rate=0.3, ii_base_rate=mode
    )
    layer = Regularizer.from_config(config).build()
    if expected is None:
        expected = mean_base_rate(config.sigma, config.p_min, config.p_max)
    assert layer.rate == pytest.approx(expected)
    assert layer.adaptive and layer.exponent == 1.0


def test_create_model_without_regularizer_means_none():
    model = create_model("mlp", 10, 1, None, image_size=8)
    assert all(isinstance(m, nn.Identity) for m in slots(model))
