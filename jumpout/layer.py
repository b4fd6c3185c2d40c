"""The Jumpout layer: Algorithm 1 of "Jumpout: Improved Dropout for Deep Neural Networks with
Rectified Linear Units", with each of its three modifications switchable.

One layer covers plain dropout and every row of the paper's Table 1 ablation:

* Modification I (monotone rate): the base rate is drawn per call as
  ``min(p_min + |N(0, sigma)|, p_max)`` (Algorithm 1, line 2); ``rate=`` fixes it instead.
* Modification II (``adaptive``): the base rate is divided by the fraction of active (positive)
  entries of the input (Algorithm 1, lines 1 and 3), capped at ``max_rate``.
* Modification III (``exponent``): kept entries are scaled by ``(1 - p')^-exponent`` (line 5);
  ``exponent=1`` is classic inverted dropout.

Everything that depends on the data (the sampled rate, the active fraction, the scale) stays a
tensor on the input's device: the forward and backward passes never synchronise with the host.

The Table-1 rows with modification II but not I need a fixed base rate; :func:`ablation_kwargs`
chooses it (``ii_base_rate``, see ``docs/fidelity.md``): by default ``matched``, half the dropout
rate, so that ``p' = p / q+`` equals the dropout rate where half the units are active instead of
sitting at the cap.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from jumpout.spec import ABLATIONS, II_BASE_RATES, TABLE1_ROWS, canonical_ablation

__all__ = [
    "ABLATIONS",
    "II_BASE_RATES",
    "MATCHED_ACTIVE_FRACTION",
    "Jumpout",
    "ablation_kwargs",
    "ii_row_base_rate",
    "jumpout",
    "list_ablations",
    "mean_base_rate",
    "sample_base_rate",
]

# The keep/drop decision compares 16-bit random integers against a threshold, so the applied rate
# is quantised to 1/65536: far below the sampling noise of any mask. Four decisions come out of
# each 64-bit draw, which makes mask generation several times cheaper than ``bernoulli_`` on CPU.
_RANDOM_LEVELS = 65536
_INT16_MIN = -32768
_INT16_MAX = 32767


def _validate(
    sigma: float,
    p_min: float,
    p_max: float,
    rate: float | None,
    exponent: float,
    max_rate: float,
) -> None:
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma!r}")
    if not (0 <= p_min < p_max < 1):
        raise ValueError(f"need 0 <= p_min < p_max < 1, got p_min={p_min!r}, p_max={p_max!r}")
    if rate is not None and not (0 <= rate < 1):
        raise ValueError(f"rate must be in [0, 1) or None, got {rate!r}")
    if not (math.isfinite(exponent) and exponent >= 0):
        raise ValueError(f"exponent must be a finite number >= 0, got {exponent!r}")
    if not (0 < max_rate < 1):
        raise ValueError(f"max_rate must be in (0, 1), got {max_rate!r}")


def sample_base_rate(
    sigma: float,
    p_min: float,
    p_max: float,
    shape: tuple[int, ...] = (),
    *,
    device: torch.device | str | None = None,
) -> Tensor:
    """Draw dropout rates from the truncated half-normal of Modification I.

    .. math:: p = \\min(p_{min} + |z|, p_{max}), \\quad z \\sim \\mathcal{N}(0, \\sigma^2)

    Smaller rates are the more likely ones (the density is monotone decreasing on
    ``[p_min, p_max)``, with the mass of the tail collected at ``p_max``).
    """
    z = torch.randn(shape, device=device)
    return (z.abs_().mul_(sigma).add_(p_min)).clamp_(max=p_max)


def mean_base_rate(sigma: float, p_min: float, p_max: float) -> float:
    """The mean of Modification I's rate, :math:`E[\\min(p_{min} + \\sigma |Z|, p_{max})]`, exactly.

    With :math:`c = (p_{max} - p_{min}) / \\sigma` the truncated half-normal has

    .. math:: E = p_{min} + \\sigma \\left(\\sqrt{2/\\pi}\\,(1 - e^{-c^2/2})
              + c \\,\\mathrm{erfc}(c / \\sqrt{2})\\right)

    (the integral of :math:`z \\cdot 2\\varphi(z)` over :math:`[0, c]` plus the mass beyond
    :math:`c`, collected at :math:`p_{max}`). The paper's defaults (0.1, 0.01, 0.6) give 0.0898.
    """
    if sigma == 0:
        return float(p_min)
    c = (p_max - p_min) / sigma
    below = math.sqrt(2.0 / math.pi) * -math.expm1(-0.5 * c * c)
    beyond = c * math.erfc(c / math.sqrt(2.0))
    return float(p_min + sigma * (below + beyond))


class _MaskedScale(torch.autograd.Function):
    """``input * mask * scale`` that saves a 1-byte mask and a scale for backward.

    The rate, and so the mask and scale, are constants of the forward pass: the active fraction
    is a step function of the input, with zero gradient almost everywhere.
    """

    @staticmethod
    def forward(ctx, input: Tensor, mask: Tensor, scale: Tensor) -> Tensor:
        ctx.save_for_backward(mask, scale)
        return _mask_and_scale(input, mask, scale)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None, None]:
        mask, scale = ctx.saved_tensors
        return _mask_and_scale(grad_output, mask, scale), None, None


def _mask_and_scale(values: Tensor, mask: Tensor, scale: Tensor) -> Tensor:
    """``values * mask * scale`` in ``values``' dtype and memory format, the scale applied in
    its own (fp32) precision: bf16/fp16 values are multiplied in fp32 and rounded once.

    A 0-dim scale would not take part in type promotion, and a device (not CPU-scalar) one would
    be rounded to bf16 first (0.13-0.34% off the paper's rescale); one with a dimension makes
    the multiply compute in fp32 and cast on write, with no fp32 copy of the tensor.
    """
    if scale.dim() == 0 and values.dim() > 0:
        scale = scale.view((1,) * values.dim())
    return values.mul(mask).mul_(scale)


def _is_dense(tensor: Tensor) -> bool:
    """Whether ``tensor``'s elements fill a block of memory without gaps or overlaps (in any
    dimension order: contiguous, channels_last, ...)."""
    expected = 1
    for size, stride in sorted(zip(tensor.shape, tensor.stride(), strict=True), key=lambda p: p[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def _like_layout(flat: Tensor, like: Tensor) -> Tensor:
    """The 1-D ``flat`` (``like.numel()`` elements) viewed with ``like``'s shape and memory
    format, so that an element-wise op with ``like`` reads both with the same strides (an NCHW
    mask against an NHWC input would be read with a stride of H*W)."""
    if like.is_contiguous() or not _is_dense(like):
        return flat.view(like.shape)
    return flat.as_strided(like.shape, like.stride())


def _jumpout(
    input: Tensor,
    sigma: float,
    p_min: float,
    p_max: float,
    rate: float | None,
    adaptive: bool,
    exponent: float,
    per_sample: bool,
    max_rate: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Apply Algorithm 1 in training mode; return the output, q+ and the applied rate p'
    (one value, or one per sample with ``per_sample``)."""
    device = input.device
    batch = input.shape[0] if input.dim() > 0 else 1
    per_row = per_sample and input.dim() > 1
    # One rate per sample broadcasts as (N, 1, 1, ...); one per batch is a 0-dim tensor.
    stat_shape = (batch,) + (1,) * (input.dim() - 1) if per_row else ()

    if rate is None:
        base_rate = sample_base_rate(sigma, p_min, p_max, stat_shape, device=device)
    else:
        base_rate = torch.full(stat_shape, rate, device=device)

    # q+ is computed even when the rate does not use it, so that every ablation row can log the
    # paper's Figure 1 (active fraction per layer); it is one cheap counting pass.
    positive = input > 0
    if per_row:
        dims = tuple(range(1, input.dim()))
        active = torch.count_nonzero(positive, dim=dims).view(stat_shape)
        active_fraction = active / (input.numel() // batch)
    else:
        # The batch average of per-sample fractions equals the fraction over the whole batch,
        # since every sample has the same number of entries.
        active_fraction = torch.count_nonzero(positive) / input.numel()

    if adaptive:
        # When nothing is active there is nothing to drop: rate 0, scale 1, no division by zero.
        normalised = base_rate / active_fraction.clamp(min=1.0 / input.numel())
        applied_rate = torch.where(
            active_fraction > 0, normalised.clamp_(max=max_rate), torch.zeros_like(base_rate)
        )
    else:
        applied_rate = base_rate

    keep = 1.0 - applied_rate
    # P(random16 <= threshold) = (threshold + 32769) / 65536 = round(keep * 65536) / 65536.
    threshold = (keep * _RANDOM_LEVELS).round_().sub_(_INT16_MAX + 2)
    threshold = threshold.clamp_(_INT16_MIN, _INT16_MAX).to(torch.int16)
    words = (input.numel() + 3) // 4
    bits = torch.empty(words, dtype=torch.int64, device=device).random_(-(2**63), None)
    random16 = _like_layout(bits.view(torch.int16)[: input.numel()], input)
    mask = random16 <= threshold
    # fp32, applied in fp32 by `_mask_and_scale` (not rounded to a bf16/fp16 input's dtype).
    scale = keep.float().pow(-exponent)
    output = _MaskedScale.apply(input, mask, scale)
    return output, active_fraction, applied_rate


# Devices whose inputs take the fused kernels. The interpreter tests add "cpu" (Triton runs the
# same kernels on CPU tensors there), to drive the layer itself through them.
_FUSED_DEVICE_TYPES = ("cuda",)


def _try_fused(
    fused: bool,
    input: Tensor,
    sigma: float,
    p_min: float,
    p_max: float,
    rate: float | None,
    adaptive: bool,
    exponent: float,
    per_sample: bool,
    max_rate: float,
) -> tuple[Tensor, Tensor] | None:
    """Algorithm 1 by the fused Triton kernels when asked for and the input is on CUDA: the
    output and float32[3] batch means (q+, p', fraction at the cap); None for the eager path."""
    if not (fused and input.device.type in _FUSED_DEVICE_TYPES):
        return None
    # Imported on first use: the CPU path never compiles or loads the kernels.
    from jumpout import fused as fused_kernels

    if not fused_kernels.supports(input):
        return None
    return fused_kernels.fused_jumpout(
        input, sigma, p_min, p_max, rate, adaptive, exponent, per_sample, max_rate
    )


def _batch_mean(statistic: Tensor) -> Tensor:
    """A detached 0-dim batch mean; per-batch statistics already are one (no extra kernel)."""
    statistic = statistic.detach()
    return statistic if statistic.dim() == 0 else statistic.mean()


def jumpout(
    input: Tensor,
    sigma: float = 0.1,
    p_min: float = 0.01,
    p_max: float = 0.6,
    *,
    rate: float | None = None,
    adaptive: bool = True,
    exponent: float = 0.75,
    per_sample: bool = False,
    max_rate: float = 0.9,
    training: bool = True,
    fused: bool = True,
) -> Tensor:
    """Functional form of :class:`Jumpout`; see it for the arguments.

    Returns ``input`` itself when ``training`` is False or the input is empty.
    """
    _validate(sigma, p_min, p_max, rate, exponent, max_rate)
    if not training or input.numel() == 0:
        return input
    fused_output = _try_fused(
        fused, input, sigma, p_min, p_max, rate, adaptive, exponent, per_sample, max_rate
    )
    if fused_output is not None:
        return fused_output[0]
    output, _, _ = _jumpout(
        input, sigma, p_min, p_max, rate, adaptive, exponent, per_sample, max_rate
    )
    return output


class Jumpout(nn.Module):
    r"""Jumpout: dropout with a monotone random rate, normalised by the fraction of active units,
    and rescaled for batch normalisation (Algorithm 1 of the Jumpout paper).

    In training mode, for an input :math:`h` of shape :math:`(N, *)`:

    .. math::
        q^+ &= \frac{1}{|h|} \sum_i \mathbb{1}[h_i > 0]
            && \text{(fraction of active entries)} \\
        p &= \min(p_{min} + |z|, p_{max}), \quad z \sim \mathcal{N}(0, \sigma^2)
            && \text{(Modification I)} \\
        p' &= \min(p / q^+, p_{max\_rate})
            && \text{(Modification II)} \\
        h'_i &= (1 - p')^{-\gamma} \, m_i h_i, \quad m_i \sim \text{Bernoulli}(1 - p')
            && \text{(Modification III, } \gamma = \text{exponent)}

    :math:`q^+` is averaged over the batch, or kept per sample with ``per_sample=True`` (then the
    base rate is also drawn per sample). When no entry is active nothing is dropped. In evaluation
    mode the layer returns its input unchanged.

    ``Jumpout(rate=p, adaptive=False, exponent=1.0)`` is ``nn.Dropout(p)``; every row of the
    paper's Table 1 is a combination of these switches (see :func:`ablation_kwargs`).

    After each training forward, :attr:`last_active_fraction`, :attr:`last_rate` and
    :attr:`last_capped_fraction` hold :math:`q^+`, :math:`p'` and whether :math:`p'` reached
    ``max_rate`` (batch means: with ``per_sample`` the fraction of samples at the cap) as detached
    0-dim tensors on the input's device, so a training loop can log them (the paper's Figure 1,
    and how often a row sits at the cap) without synchronising.

    Args:
        sigma: standard deviation of the Gaussian the base rate is drawn from. Default: 0.1
        p_min: lower truncation of the base rate. Default: 0.01
        p_max: upper truncation of the base rate. Default: 0.6
        rate: a fixed base rate instead of the random one (turns Modification I off).
            Default: ``None``
        adaptive: divide the base rate by the active fraction (Modification II). Default: True
        exponent: kept entries are scaled by ``(1 - p')^-exponent`` (Modification III);
            1.0 is classic inverted dropout. Default: 0.75
        per_sample: compute the active fraction and draw the rate per sample instead of per
            batch. Default: False
        max_rate: cap on the normalised rate :math:`p'`, below 1. Default: 0.9
        fused: on CUDA, run the fused Triton kernels of :mod:`jumpout.fused` (three kernels,
            no per-element tensor saved for backward); False keeps the eager path, for
            comparison. The CPU always takes the eager path. Default: True

    Shape:
        - Input: :math:`(N, *)`, any number of trailing dimensions; the mask is element-wise.
        - Output: :math:`(N, *)`, same shape as the input.

    Examples::

        >>> m = Jumpout(sigma=0.1, p_min=0.01, p_max=0.6)
        >>> out = m(torch.relu(torch.randn(20, 16)))
        >>> plain_dropout = Jumpout(rate=0.3, adaptive=False, exponent=1.0)

    Reference:
        "Jumpout: Improved Dropout for Deep Neural Networks with Rectified Linear Units",
        Section 3 and Algorithm 1.
    """

    __constants__ = ["sigma", "p_min", "p_max", "rate", "adaptive", "exponent", "per_sample"]

    def __init__(
        self,
        sigma: float = 0.1,
        p_min: float = 0.01,
        p_max: float = 0.6,
        *,
        rate: float | None = None,
        adaptive: bool = True,
        exponent: float = 0.75,
        per_sample: bool = False,
        max_rate: float = 0.9,
        fused: bool = True,
    ) -> None:
        super().__init__()
        _validate(sigma, p_min, p_max, rate, exponent, max_rate)
        self.sigma = float(sigma)
        self.p_min = float(p_min)
        self.p_max = float(p_max)
        self.rate = None if rate is None else float(rate)
        self.adaptive = bool(adaptive)
        self.exponent = float(exponent)
        self.per_sample = bool(per_sample)
        self.max_rate = float(max_rate)
        # Plain attributes, not buffers: they are observations, not state to checkpoint.
        self.last_active_fraction: Tensor | None = None
        self.last_rate: Tensor | None = None
        self.last_capped_fraction: Tensor | None = None
        self.fused = bool(fused)

    def forward(self, input: Tensor) -> Tensor:
        if not self.training or input.numel() == 0:
            return input
        fused_output = _try_fused(
            self.fused,
            input,
            self.sigma,
            self.p_min,
            self.p_max,
            self.rate,
            self.adaptive,
            self.exponent,
            self.per_sample,
            self.max_rate,
        )
        if fused_output is not None:
            output, stats = fused_output
            # Views of one float32[3] the rate kernel wrote: no extra kernel, no sync.
            self.last_active_fraction, self.last_rate, self.last_capped_fraction = stats.unbind()
            return output
        output, active_fraction, applied_rate = _jumpout(
            input,
            self.sigma,
            self.p_min,
            self.p_max,
            self.rate,
            self.adaptive,
            self.exponent,
            self.per_sample,
            self.max_rate,
        )
        self.last_active_fraction = _batch_mean(active_fraction)
        self.last_rate = _batch_mean(applied_rate)
        # p' "reached the cap": the clamp makes a capped rate exactly max_rate. Per sample this
        # is the fraction of samples at the cap; one compare and (at most) one mean, no sync.
        # Without modification II no cap is applied, so none is reached.
        if self.adaptive:
            self.last_capped_fraction = _batch_mean((applied_rate >= self.max_rate).float())
        else:
            self.last_capped_fraction = applied_rate.new_zeros(())
        return output

    def extra_repr(self) -> str:
        base = (
            f"rate={self.rate}"
            if self.rate is not None
            else f"sigma={self.sigma}, p_min={self.p_min}, p_max={self.p_max}"
        )
        return (
            f"{base}, adaptive={self.adaptive}, exponent={self.exponent}, "
            f"per_sample={self.per_sample}, max_rate={self.max_rate}"
        )


def list_ablations() -> list[str]:
    """The Table 1 row names, in the paper's order of modifications."""
    return list(ABLATIONS)


MATCHED_ACTIVE_FRACTION = 0.5
"""The active fraction ``matched`` assumes: a ReLU fed zero-mean pre-activations (what BN or a
fresh initialisation gives) passes half of them."""


def ii_row_base_rate(
    mode: str,
    *,
    dropout_rate: float,
    sigma: float = 0.1,
    p_min: float = 0.01,
    p_max: float = 0.6,
) -> float:
    """The fixed base rate of a Table-1 row with modification II but not I.

    The paper: "the effective dropout rate of every layer is p_j q_j+", and II divides the rate by
    q+. A row that feeds II the dropout row's rate changes ``1 / q+`` times as many active units as
    that row does, and ``p / q+`` sits at the cap wherever q+ <= p / max_rate (0.5 / 0.9 on the
    small CNN). The modes:

    * ``"matched"``: ``dropout_rate * MATCHED_ACTIVE_FRACTION``. Where half the units are active,
      ``p' = dropout_rate``: the row changes as many active units as the dropout row does.
    * ``"mean_of_i"``: the mean of Modification I's rate (:func:`mean_base_rate`), so the row
      differs from the +I+II row only in the rate's randomness.
    * ``"dropout_rate"``: the dropout rate itself (the behaviour before this choice existed, kept
      to reproduce old runs): twice the dropout row's rate where q+ = 0.5, at the cap below
      ``dropout_rate / max_rate``.
    """
    if mode == "matched":
        return dropout_rate * MATCHED_ACTIVE_FRACTION
    if mode == "mean_of_i":
        return mean_base_rate(sigma, p_min, p_max)
    if mode == "dropout_rate":
        return dropout_rate
    raise ValueError(f"unknown ii_base_rate {mode!r}; accepted: {', '.join(II_BASE_RATES)}")


def ablation_kwargs(
    name: str,
    *,
    dropout_rate: float = 0.3,
    ii_base_rate: str = "matched",
    sigma: float = 0.1,
    p_min: float = 0.01,
    p_max: float = 0.6,
) -> dict:
    """Map a Table 1 row name to :class:`Jumpout` keyword arguments.

    The result holds ``rate``, ``adaptive`` and ``exponent``; ``sigma``, ``p_min`` and ``p_max``
    are left to the caller (they are read here only for ``ii_base_rate="mean_of_i"``). Rows with
    Modification I get ``rate=None`` (the random rate). Rows without I and without II (dropout,
    dropout+III) get ``rate=dropout_rate``; rows with II but not I (dropout+II, dropout+II+III)
    get the base rate :func:`ii_row_base_rate` picks with ``ii_base_rate``.
    ``ablation_kwargs("dropout", dropout_rate=p)`` makes the layer equivalent to
    ``nn.Dropout(p)``.
    """
    row = canonical_ablation(name)
    if row is None:
        raise ValueError(f"unknown ablation {name!r}; accepted: {', '.join(ABLATIONS)}")
    if ii_base_rate not in II_BASE_RATES:
        raise ValueError(
            f"unknown ii_base_rate {ii_base_rate!r}; accepted: {', '.join(II_BASE_RATES)}"
        )
    modifications = TABLE1_ROWS[row]
    if "I" in modifications:
        rate = None
    elif "II" in modifications:
        rate = ii_row_base_rate(
            ii_base_rate, dropout_rate=dropout_rate, sigma=sigma, p_min=p_min, p_max=p_max
        )
    else:
        rate = dropout_rate
    return {
        "rate": rate,
        "adaptive": "II" in modifications,
        "exponent": 0.75 if "III" in modifications else 1.0,
    }
