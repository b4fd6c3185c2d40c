"""Model registry: the paper's networks, each with explicit dropout slots.

Every architecture is built around a :class:`Regularizer` that says what fills its dropout
slots: nothing (``nn.Identity``), plain ``nn.Dropout`` or :class:`~jumpout.layer.Jumpout`.
Each slot gets a fresh module from :meth:`Regularizer.build`, so layers never share state
(a Jumpout layer records its own active fraction for the epoch metrics).

Models are registered timm-style with :func:`register_model` and built with
:func:`create_model`; :func:`list_models` is the one source of truth that the API validates
job specs against. Shapes and slot positions follow ``docs/recipes.md``:

========================  ==================================================================
name                      slots
========================  ==================================================================
``mlp``                   after each hidden ReLU
``cnn_small``             before each of the three dense layers (the paper's CIFAR10(s) net;
                          with ``batch_norm=True`` a BN follows the first two slots' dense layer)
``wrn_28_10``/``wrn_16_8`` between the two convolutions of every block, after the inner BN-ReLU
``resnet_preact_20``      same place as in the WRN block
``resnet18``              before the final linear layer
========================  ==================================================================
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torchvision
from torch import nn

from jumpout.layer import Jumpout, ablation_kwargs

__all__ = [
    "REGULARIZER_KINDS",
    "PreActBlock",
    "PreActResNet",
    "Regularizer",
    "WideResNet",
    "count_parameters",
    "create_model",
    "create_model_from_arguments",
    "list_models",
    "model_arguments",
    "register_model",
]

REGULARIZER_KINDS = ("none", "dropout", "jumpout")


@dataclass
class Regularizer:
    """What fills every dropout slot of a model.

    Args:
        kind: ``"none"`` (``nn.Identity``), ``"dropout"`` (``nn.Dropout(rate)``) or
            ``"jumpout"`` (``Jumpout(**jumpout_kwargs)``).
        rate: the dropout rate, used only when ``kind == "dropout"``.
        jumpout_kwargs: keyword arguments for :class:`~jumpout.layer.Jumpout`, used only when
            ``kind == "jumpout"``.
    """

    kind: str = "none"
    rate: float = 0.3
    jumpout_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in REGULARIZER_KINDS:
            raise ValueError(
                f"Regularizer kind {self.kind!r} is not known; accepted kinds: "
                f"{', '.join(REGULARIZER_KINDS)}"
            )
        if not 0.0 <= self.rate < 1.0:
            raise ValueError(f"Regularizer rate must be in [0, 1), got {self.rate!r}")

    def build(self) -> nn.Module:
        """Return a fresh layer for one slot (never the same instance twice)."""
        if self.kind == "dropout":
            return nn.Dropout(self.rate)
        if self.kind == "jumpout":
            return Jumpout(**self.jumpout_kwargs)
        return nn.Identity()

    @classmethod
    def from_method(
        cls,
        method: str,
        *,
        dropout_rate: float,
        sigma: float,
        p_min: float,
        p_max: float,
        ablation: str | None = None,
        ii_base_rate: str = "matched",
    ) -> Regularizer:
        """Build from a training spec's ``method`` and hyper-parameters.

        ``method`` is ``"none"``, ``"dropout"`` or ``"jumpout"``. When ``ablation`` names a
        row of the paper's Table 1 (see :func:`jumpout.layer.list_ablations`) the slots hold a
        Jumpout layer configured as that row: ``ablation_kwargs(ablation)`` merged with
        ``sigma``/``p_min``/``p_max``; in the rows without modification I the rate is fixed:
        ``dropout_rate`` in the rows without II, and in the rows with II the base rate
        ``ii_base_rate`` picks (``"matched"``: ``dropout_rate * 0.5``; ``"mean_of_i"``: the mean
        of modification I's rate; ``"dropout_rate"``: the old behaviour, which sits at the cap;
        see :func:`jumpout.layer.ii_row_base_rate`). Every row, ``"dropout"`` included, is a Jumpout
        layer so that all rows log the same per-layer statistics (active fraction, rate); the
        ``"dropout"`` row is ``Jumpout(rate=dropout_rate, adaptive=False, exponent=1.0)``, which
        behaves as ``nn.Dropout(dropout_rate)``. An ablation needs a method that drops units
        (``"dropout"`` or ``"jumpout"``); with ``"none"`` it is a ValueError rather than being
        silently ignored.
        """
        if method not in REGULARIZER_KINDS:
            raise ValueError(
                f"method {method!r} is not known; accepted methods: {', '.join(REGULARIZER_KINDS)}"
            )
        if ablation is not None:
            if method == "none":
                raise ValueError(
                    f"ablation {ablation!r} needs method 'jumpout' (or 'dropout'), got 'none'"
                )
            kwargs = ablation_kwargs(
                ablation,
                dropout_rate=dropout_rate,
                ii_base_rate=ii_base_rate,
                sigma=sigma,
                p_min=p_min,
                p_max=p_max,
            )
            kwargs.update(sigma=sigma, p_min=p_min, p_max=p_max)
            return cls(kind="jumpout", rate=dropout_rate, jumpout_kwargs=kwargs)
        if method == "jumpout":
            return cls(
                kind="jumpout",
                rate=dropout_rate,
                jumpout_kwargs={"sigma": sigma, "p_min": p_min, "p_max": p_max},
            )
        return cls(kind=method, rate=dropout_rate)

    @classmethod
    def from_config(cls, config: Any) -> Regularizer:
        """Build from a ``TrainConfig`` (anything with its ``method``, ``dropout_rate``,
        ``sigma``, ``p_min``, ``p_max``, ``ablation`` and ``ii_base_rate`` attributes)."""
        return cls.from_method(
            config.method,
            dropout_rate=config.dropout_rate,
            sigma=config.sigma,
            p_min=config.p_min,
            p_max=config.p_max,
            ablation=getattr(config, "ablation", None),
            ii_base_rate=getattr(config, "ii_base_rate", "matched"),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (for logs and job records)."""
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# Registry

ModelConstructor = Callable[..., nn.Module]
_MODELS: dict[str, ModelConstructor] = {}


def register_model(fn: ModelConstructor) -> ModelConstructor:
    """Register a constructor ``fn(num_classes, in_channels, regularizer, image_size, **kw)``
    under its function name."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} is already registered")
    _MODELS[name] = fn
    return fn


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`, sorted."""
    return sorted(_MODELS)


def create_model(
    name: str,
    num_classes: int,
    in_channels: int,
    regularizer: Regularizer | None = None,
    *,
    image_size: int = 32,
    **kwargs: Any,
) -> nn.Module:
    """Build the registered model ``name``.

    Args:
        name: one of :func:`list_models`.
        num_classes: size of the output layer.
        in_channels: image channels (1 for grey-scale, 3 for colour).
        regularizer: what fills the dropout slots; ``None`` means no regularisation.
        image_size: side of the (square) input images; only models with a fixed-size dense
            head (``mlp``, ``cnn_small``) depend on it.
        **kwargs: model-specific options (e.g. ``batch_norm=True`` for ``cnn_small``).

    Raises:
        ValueError: for an unknown name (the message lists the known ones) or bad sizes.
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    if regularizer is None:
        regularizer = Regularizer("none")
    return _MODELS[name](num_classes, in_channels, regularizer, image_size, **kwargs)


def model_arguments(
    name: str,
    num_classes: int,
    in_channels: int,
    regularizer: Regularizer | None = None,
    *,
    image_size: int = 32,
    **kwargs: Any,
) -> dict[str, Any]:
    """Everything :func:`create_model` needs to build this model again, as plain values (what a
    checkpoint stores under ``"model_args"``, so that it loads with ``weights_only=True``):
    ``{"architecture", "num_classes", "in_channels", "image_size", "regularizer"`` (the
    :class:`Regularizer`'s fields: what fills the dropout slots, with the layer's keyword
    arguments), ``"options"}`` (the model-specific keyword arguments, e.g. ``batch_norm``).
    :func:`create_model_from_arguments` is its inverse."""
    regularizer = regularizer or Regularizer("none")
    return {
        "architecture": str(name),
        "num_classes": int(num_classes),
        "in_channels": int(in_channels),
        "image_size": int(image_size),
        "regularizer": regularizer.to_dict(),
        "options": dict(kwargs),
    }


def create_model_from_arguments(arguments: dict[str, Any]) -> nn.Module:
    """Build the model :func:`model_arguments` describes (freshly initialised: load the weights
    into it). Raises ValueError naming a missing or bad argument."""
    try:
        return create_model(
            arguments["architecture"],
            arguments["num_classes"],
            arguments["in_channels"],
            Regularizer(**arguments["regularizer"]),
            image_size=arguments["image_size"],
            **arguments.get("options", {}),
        )
    except (KeyError, TypeError) as exc:
        raise ValueError(
            f"model arguments {sorted(arguments)} cannot rebuild a model ({exc!r}); expected the "
            "keys architecture, num_classes, in_channels, image_size, regularizer, options"
        ) from None


# --------------------------------------------------------------------------------------------
# Multi-layer perceptron


class MLP(nn.Module):
    """Flatten, then ``Linear-ReLU-[slot]`` per hidden layer, then a linear classifier."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        regularizer: Regularizer,
        hidden: tuple[int, ...] = (256, 256),
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for hidden_width in hidden:
            layers += [nn.Linear(width, hidden_width), nn.ReLU(inplace=True), regularizer.build()]
            width = hidden_width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_model
def mlp(num_classes, in_channels, regularizer, image_size, *, hidden=(256, 256)):
    """Two hidden layers of 256 ReLU units by default; works for any image size."""
    return MLP(in_channels * image_size * image_size, num_classes, regularizer, tuple(hidden))


# --------------------------------------------------------------------------------------------
# Small CNN (the paper's CIFAR10(s): jseppanen/cifar_lasagne "v3")


class SmallCNN(nn.Module):
    """conv64, conv64, pool, conv128, conv128, pool, [slot] dense256 [slot] dense256 [slot] dense.

    The convolutions are 3x3 with "same" padding, so a 32x32 input reaches the dense head as
    128x8x8; other sizes give 128 x (size // 4)^2.

    ``batch_norm=True`` is the variant of the paper's Figure 2 ("dropout ... used with or without
    BN"): a BatchNorm after every convolution and after each hidden dense layer, so the head reads
    ``[slot] dense BN ReLU [slot] dense BN ReLU [slot] dense``. That is the setting the paper's
    analysis of modification III assumes ("one linear computational layer ... is followed by a BN
    layer, then a ReLU activation layer, and then followed by a dropout layer"): the first two
    slots each feed a BN through one dense layer, so the BN sees dropout's shift of the mean and
    variance between training and test. A BN only in the convolutional part, before any slot,
    could not show that shift. ``dense_batch_norm=False`` gives that older variant (BN after the
    convolutions only), for checkpoints trained with it.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        regularizer: Regularizer,
        image_size: int = 32,
        batch_norm: bool = False,
        dense_batch_norm: bool | None = None,
    ) -> None:
        super().__init__()
        if image_size < 4:
            raise ValueError(
                f"cnn_small needs image_size >= 4 (two 2x2 poolings), got {image_size}"
            )
        if dense_batch_norm is None:
            dense_batch_norm = batch_norm

        def conv(cin: int, cout: int) -> list[nn.Module]:
            block: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=not batch_norm)]
            if batch_norm:
                block.append(nn.BatchNorm2d(cout))
            return block + [nn.ReLU(inplace=True)]

        def dense(fin: int, fout: int) -> list[nn.Module]:
            # The BN's shift replaces the dense layer's bias.
            block: list[nn.Module] = [nn.Linear(fin, fout, bias=not dense_batch_norm)]
            if dense_batch_norm:
                block.append(nn.BatchNorm1d(fout))
            return block + [nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *conv(in_channels, 64),
            *conv(64, 64),
            nn.MaxPool2d(2),
            *conv(64, 128),
            *conv(128, 128),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        side = image_size // 4
        self.classifier = nn.Sequential(
            regularizer.build(),
            *dense(128 * side * side, 256),
            regularizer.build(),
            *dense(256, 256),
            regularizer.build(),
            nn.Linear(256, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_model
def cnn_small(
    num_classes, in_channels, regularizer, image_size, *, batch_norm=False, dense_batch_norm=None
):
    """The paper's CIFAR10(s) network ("v3"); ``batch_norm=True`` for the Figure 2 variant (BN
    after every convolution and hidden dense layer, so a BN follows each of the first two slots)."""
    return SmallCNN(
        num_classes,
        in_channels,
        regularizer,
        image_size,
        batch_norm=batch_norm,
        dense_batch_norm=dense_batch_norm,
    )


# --------------------------------------------------------------------------------------------
# Pre-activation residual networks (WRN and pre-act ResNet-20)


class PreActBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3x3(stride)-BN-ReLU-[slot]-conv3x3 + shortcut.

    The slot sits between the two convolutions, after the inner BN-ReLU. That is where the
    original WRN code (Zagoruyko & Komodakis) applies dropout, and Jumpout has to see the
    ReLU's output: modification II divides the rate by the fraction of *active* (non-zero)
    units, which only means something after a ReLU.

    When the shape changes (stride or channel count) the shortcut is a 1x1 convolution fed
    the pre-activated input, as in the reference implementations; otherwise it is the
    identity on the raw input.
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, regularizer: Regularizer
    ) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.dropout = regularizer.build()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        preactivated = torch.relu(self.bn1(x))
        residual = self.conv1(preactivated)
        residual = self.dropout(torch.relu(self.bn2(residual)))
        residual = self.conv2(residual)
        shortcut = x if self.shortcut is None else self.shortcut(preactivated)
        return residual + shortcut


class PreActResNet(nn.Module):
    """Stem conv3x3, three stages of :class:`PreActBlock`, then BN-ReLU-pool-linear.

    Stage strides are 1, 2, 2; the pool is adaptive so any input size works.

    Args:
        stage_widths: output channels of the three stages.
        blocks_per_stage: number of blocks in every stage.
        num_classes, in_channels, regularizer: as in :func:`create_model`.
        stem_width: channels of the stem convolution (16 in both WRN and ResNet-20).
    """

    def __init__(
        self,
        stage_widths: tuple[int, int, int],
        blocks_per_stage: int,
        num_classes: int,
        in_channels: int,
        regularizer: Regularizer,
        stem_width: int = 16,
    ) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, stem_width, 3, padding=1, bias=False)
        stages: list[nn.Module] = []
        width = stem_width
        for stage_width, stride in zip(stage_widths, (1, 2, 2), strict=True):
            blocks = []
            for index in range(blocks_per_stage):
                blocks.append(
                    PreActBlock(width, stage_width, stride if index == 0 else 1, regularizer)
                )
                width = stage_width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.head_bn = nn.BatchNorm2d(width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)
        _init_kaiming_fan_in(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        x = torch.relu(self.head_bn(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class WideResNet(PreActResNet):
    """WRN-``depth``-``widen_factor`` (Zagoruyko & Komodakis, 2016), pre-activation.

    ``(depth - 4) / 6`` blocks per stage with 16k, 32k, 64k channels. WRN-28-10 has about
    36.5 M parameters on CIFAR10, WRN-16-8 about 11 M.
    """

    def __init__(
        self,
        depth: int,
        widen_factor: int,
        num_classes: int,
        in_channels: int,
        regularizer: Regularizer,
    ) -> None:
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n + 4 with n >= 1, got {depth}")
        if widen_factor < 1:
            raise ValueError(f"WideResNet widen_factor must be >= 1, got {widen_factor}")
        widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        super().__init__(widths, (depth - 4) // 6, num_classes, in_channels, regularizer)
        self.depth = depth
        self.widen_factor = widen_factor


def _init_kaiming_fan_in(model: nn.Module) -> None:
    """Kaiming-normal (fan in) for conv/linear weights, BN weight 1, all biases 0."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


@register_model
def wrn_28_10(num_classes, in_channels, regularizer, image_size):
    """WRN-28-10: the paper's CIFAR10/CIFAR100 network (~36.5 M parameters)."""
    return WideResNet(28, 10, num_classes, in_channels, regularizer)


@register_model
def wrn_16_8(num_classes, in_channels, regularizer, image_size):
    """WRN-16-8: the paper's SVHN/STL10 network (~11 M parameters)."""
    return WideResNet(16, 8, num_classes, in_channels, regularizer)


@register_model
def resnet_preact_20(num_classes, in_channels, regularizer, image_size):
    """Pre-activation ResNet-20 (3 blocks per stage, 16/32/64 channels): the paper's
    Fashion-MNIST network.

    The reference (hysts/pytorch_image_classification) has no dropout; the slot is placed
    as in the WRN block, after the block's inner BN-ReLU, between the two convolutions.
    """
    return PreActResNet((16, 32, 64), 3, num_classes, in_channels, regularizer)


# --------------------------------------------------------------------------------------------
# ResNet-18 (torchvision's)


class ResNet18(torchvision.models.ResNet):
    """torchvision's ResNet-18 with one dropout slot before the final linear layer.

    It is exactly the network ``torchvision.models.resnet18(weights=None)`` builds (BasicBlock,
    [2, 2, 2, 2]) with one extra parameter-free submodule, ``dropout``, applied to the pooled
    features. Keeping it outside ``fc`` leaves every state-dict key as torchvision names it, so
    ImageNet-pretrained weights load unchanged (the paper fine-tunes from them). The slot sits
    where the pooled 512 ReLU features feed the classifier, the only place torchvision's
    network has a dense layer. For ``in_channels != 3`` the stem convolution takes that many
    channels (its shape is otherwise torchvision's).
    """

    def __init__(self, num_classes: int, in_channels: int, regularizer: Regularizer) -> None:
        super().__init__(
            torchvision.models.resnet.BasicBlock, [2, 2, 2, 2], num_classes=num_classes
        )
        if in_channels != 3:
            self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
            nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.dropout = regularizer.build()

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(self.dropout(x))


@register_model
def resnet18(num_classes, in_channels, regularizer, image_size):
    """torchvision's ResNet-18 (random init); the slot is before the final linear layer."""
    return ResNet18(num_classes, in_channels, regularizer)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
