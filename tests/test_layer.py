"""Behaviour of the Jumpout layer (Algorithm 1): rates, masks, scales, gradients, validation.

Random properties are checked under fixed seeds with tolerances of several standard errors.
"""

import math

import pytest
import torch
from scipy import stats
from torch import nn

from jumpout import Jumpout, ablation_kwargs, jumpout, list_ablations
from jumpout.layer import _jumpout, ii_row_base_rate, mean_base_rate, sample_base_rate

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def inputs_with_active_fraction(shape, active_fraction, *, seed=0, device="cpu"):
    """Post-ReLU-like input: exactly round(active_fraction * numel) strictly positive entries."""
    generator = torch.Generator().manual_seed(seed)
    numel = math.prod(shape)
    values = torch.rand(numel, generator=generator) + 0.5
    order = torch.randperm(numel, generator=generator)
    values[order[int(round(active_fraction * numel)) :]] = 0.0
    return values.view(shape).to(device)


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(1234)


@pytest.mark.parametrize("device", DEVICES)
def test_drop_fraction_among_active_equals_normalised_rate(device):
    x = inputs_with_active_fraction((200, 5000), 0.4, device=device)
    layer = Jumpout(rate=0.2, adaptive=True)
    y = layer(x)
    active = x > 0
    dropped_among_active = ((y == 0) & active).sum().item() / active.sum().item()
    assert layer.last_active_fraction.item() == pytest.approx(0.4, abs=1e-6)
    assert layer.last_rate.item() == pytest.approx(0.5, abs=1e-6)
    assert dropped_among_active == pytest.approx(0.5, abs=0.005)
    # Inactive entries stay exactly zero.
    assert torch.all(y[~active] == 0)


@pytest.mark.parametrize("exponent", [0.75, 1.0, 0.5])
def test_kept_entries_scaled_exactly(exponent):
    x = inputs_with_active_fraction((64, 1000), 0.5)
    layer = Jumpout(sigma=0.2, exponent=exponent)
    y = layer(x)
    applied = layer.last_rate
    kept = y != 0
    expected = x[kept] * (1 - applied) ** -exponent
    torch.testing.assert_close(y[kept], expected, rtol=1e-6, atol=0)
    # Dropped entries are exactly zero; kept ones are all the active entries minus the dropped.
    assert torch.all(kept <= (x > 0))


def test_sampled_rates_follow_truncated_half_normal():
    sigma, p_min, p_max = 0.1, 0.01, 0.25
    rates = sample_base_rate(sigma, p_min, p_max, (200_000,)).double()
    assert rates.min().item() >= p_min
    assert rates.max().item() <= p_max
    # Mass at the cap: P(|z| >= p_max - p_min) = 2 (1 - Phi((p_max - p_min) / sigma)).
    cap_mass = 2 * (1 - stats.norm.cdf((p_max - p_min) / sigma))
    assert (rates == p_max).double().mean().item() == pytest.approx(cap_mass, abs=0.003)
    # Below the cap: CDF 2 Phi((t - p_min) / sigma) - 1, checked at several quantiles.
    for t in (0.02, 0.05, 0.1, 0.15, 0.2):
        expected = 2 * stats.norm.cdf((t - p_min) / sigma) - 1
        assert (rates <= t).double().mean().item() == pytest.approx(expected, abs=0.004)
    # Monotone decreasing density on [p_min, p_max): smaller rates are more likely.
    below_cap = rates[rates < p_max]
    counts = torch.histc(below_cap, bins=8, min=p_min, max=p_max)
    assert torch.all(counts[1:] < counts[:-1])


def test_layer_draws_a_fresh_rate_each_call_from_the_same_distribution():
    sigma, p_min, p_max = 0.1, 0.01, 0.6
    layer = Jumpout(sigma, p_min, p_max, adaptive=False)
    x = torch.ones(2, 8)
    rates = []
    for _ in range(3000):
        layer(x)
        rates.append(layer.last_rate.item())
    # Kolmogorov-Smirnov against p_min + half-normal(sigma) (the cap is not reached here).
    statistic, p_value = stats.kstest([r - p_min for r in rates], stats.halfnorm(scale=sigma).cdf)
    assert p_value > 0.001, statistic
    assert len(set(rates)) > 2900


def test_per_sample_uses_each_samples_active_fraction():
    low = inputs_with_active_fraction((1, 20_000), 0.2, seed=1)
    high = inputs_with_active_fraction((1, 20_000), 0.8, seed=2)
    x = torch.cat([low, high])
    per_sample = Jumpout(rate=0.1, per_sample=True)
    y = per_sample(x)
    for row, expected_rate in ((0, 0.5), (1, 0.125)):
        active = x[row] > 0
        dropped = ((y[row] == 0) & active).sum().item() / active.sum().item()
        assert dropped == pytest.approx(expected_rate, abs=0.02)
    # The layer reports batch means: mean q+ 0.5, mean rate (0.5 + 0.125) / 2.
    assert per_sample.last_active_fraction.item() == pytest.approx(0.5, abs=1e-6)
    assert per_sample.last_rate.item() == pytest.approx(0.3125, abs=1e-6)

    per_batch = Jumpout(rate=0.1, per_sample=False)
    y = per_batch(x)
    assert per_batch.last_rate.item() == pytest.approx(0.2, abs=1e-6)
    for row in (0, 1):
        active = x[row] > 0
        dropped = ((y[row] == 0) & active).sum().item() / active.sum().item()
        assert dropped == pytest.approx(0.2, abs=0.02)


def test_per_sample_draws_independent_rates():
    layer = Jumpout(sigma=0.2, adaptive=False, per_sample=True)
    x = torch.ones(512, 4)
    _, _, applied = _jumpout(x, 0.2, 0.01, 0.6, None, False, 0.75, True, 0.9)
    assert applied.shape == (512, 1)
    assert applied.unique().numel() > 500
    layer(x)
    assert layer.last_rate.dim() == 0


def test_normalised_rate_is_capped():
    x = inputs_with_active_fraction((100, 10_000), 0.1)
    layer = Jumpout(rate=0.5, max_rate=0.9)  # 0.5 / 0.1 = 5 would be meaningless
    y = layer(x)
    assert layer.last_rate.item() == pytest.approx(0.9)
    active = x > 0
    dropped = ((y == 0) & active).sum().item() / active.sum().item()
    assert dropped == pytest.approx(0.9, abs=0.005)
    torch.testing.assert_close(y[y != 0], x[y != 0] * 0.1**-0.75)


def test_capped_fraction_says_whether_the_rate_reached_the_cap():
    layer = Jumpout(rate=0.5, max_rate=0.9)
    layer(inputs_with_active_fraction((100, 1000), 0.1))  # 0.5 / 0.1 > 0.9: capped
    assert layer.last_capped_fraction.item() == 1.0
    layer(inputs_with_active_fraction((100, 1000), 0.8))  # 0.5 / 0.8 = 0.625: not capped
    assert layer.last_capped_fraction.item() == 0.0
    assert layer.last_capped_fraction.dim() == 0
    assert layer.last_capped_fraction.dtype == torch.float32
    # Exactly at the cap counts as reaching it: 0.45 / 0.5 = 0.9.
    layer = Jumpout(rate=0.45, max_rate=0.9)
    layer(inputs_with_active_fraction((10, 1000), 0.5))
    assert layer.last_capped_fraction.item() == 1.0
    # Without II nothing is capped, even at a high fixed rate.
    plain = Jumpout(rate=0.8, adaptive=False, max_rate=0.5)
    plain(inputs_with_active_fraction((10, 1000), 0.1))
    assert plain.last_capped_fraction.item() == 0.0


def test_per_sample_capped_fraction_is_the_fraction_of_samples_at_the_cap():
    low = [inputs_with_active_fraction((1, 1000), 0.1, seed=s) for s in range(3)]
    high = inputs_with_active_fraction((1, 1000), 0.9, seed=9)
    x = torch.cat([*low, high])  # 0.3 / 0.1 = 3 for three samples, 0.3 / 0.9 for one
    layer = Jumpout(rate=0.3, per_sample=True, max_rate=0.9)
    layer(x)
    assert layer.last_capped_fraction.item() == pytest.approx(0.75)
    # Per batch the mean q+ is 0.3, so 0.3 / 0.3 = 1 > 0.9: the one call is capped.
    per_batch = Jumpout(rate=0.3, max_rate=0.9)
    per_batch(x)
    assert per_batch.last_capped_fraction.item() == 1.0


def test_all_inactive_input_drops_nothing_and_has_no_nan():
    x = -torch.rand(32, 100)  # no positive entry
    x[0, :10] = 0.0
    layer = Jumpout(sigma=0.3)
    y = layer(x)
    assert torch.equal(y, x)
    assert layer.last_rate.item() == 0.0
    assert layer.last_active_fraction.item() == 0.0
    x.requires_grad_()
    layer(x).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_gradient_is_mask_times_scale():
    # Strictly positive input, so that a zero output means a dropped entry.
    x = (torch.rand(16, 3, 8, 8) + 0.5).requires_grad_()
    layer = Jumpout(sigma=0.15)
    y = layer(x)
    upstream = torch.randn_like(y)
    y.backward(upstream)
    mask = (y != 0).float()
    assert 0.01 < 1 - mask.mean().item() < 0.6
    scale = (1 - layer.last_rate) ** -0.75
    torch.testing.assert_close(x.grad, upstream * mask * scale, rtol=1e-6, atol=0)


def test_saves_one_byte_per_element_for_backward():
    x = torch.rand(8, 1000, requires_grad=True)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        Jumpout()(x)
    saved_bytes = sum(t.numel() * t.element_size() for t in saved)
    assert saved_bytes <= x.numel() + 16  # a bool mask and a 0-dim scale


def test_eval_mode_returns_the_input_itself():
    layer = Jumpout().eval()
    x = torch.rand(4, 5)
    assert layer(x) is x
    assert jumpout(x, training=False) is x


def test_same_seed_same_output_and_other_seed_differs():
    x = inputs_with_active_fraction((32, 64), 0.5)
    torch.manual_seed(7)
    first = Jumpout()(x)
    torch.manual_seed(7)
    second = Jumpout()(x)
    torch.manual_seed(8)
    third = Jumpout()(x)
    assert torch.equal(first, second)
    assert not torch.equal(first, third)
    torch.manual_seed(7)
    assert torch.equal(jumpout(x), first)


@pytest.mark.parametrize("shape", [(128, 4096), (8, 16, 32, 32), (4, 3, 5, 7, 9), (4096,)])
def test_any_input_shape(shape):
    x = inputs_with_active_fraction(shape, 0.5)
    layer = Jumpout(rate=0.2)
    y = layer(x)
    assert y.shape == x.shape
    active = x > 0
    dropped = ((y == 0) & active).sum().item() / active.sum().item()
    tolerance = 5 * math.sqrt(0.4 * 0.6 / active.sum().item())
    assert dropped == pytest.approx(0.4, abs=tolerance)


def test_fixed_rate_without_modifications_is_dropout():
    p = 0.3
    x = torch.rand(100, 10_000) + 0.1
    layer = Jumpout(rate=p, adaptive=False, exponent=1.0)
    y = layer(x)
    kept = y != 0
    assert (~kept).float().mean().item() == pytest.approx(p, abs=0.003)
    torch.testing.assert_close(y[kept], x[kept] / (1 - p))
    reference = nn.Dropout(p)(x)
    assert (reference == 0).float().mean().item() == pytest.approx(p, abs=0.003)


def test_zero_rate_is_identity_in_value():
    x = torch.randn(10, 10)
    assert torch.equal(Jumpout(rate=0.0, adaptive=False)(x), x)
    assert torch.equal(Jumpout(rate=0.0)(x), x)


def test_empty_input():
    x = torch.empty(0, 5)
    assert Jumpout()(x) is x


def test_half_precision_keeps_dtype():
    x = inputs_with_active_fraction((64, 256), 0.5).bfloat16()
    y = Jumpout()(x)
    assert y.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"sigma": -0.1}, "sigma"),
        ({"sigma": float("nan")}, "sigma"),
        ({"p_min": -0.01}, "p_min"),
        ({"p_min": 0.6, "p_max": 0.5}, "p_max"),
        ({"p_max": 1.0}, "p_max"),
        ({"rate": 1.0}, "rate"),
        ({"rate": -0.2}, "rate"),
        ({"max_rate": 1.0}, "max_rate"),
        ({"max_rate": 0.0}, "max_rate"),
        ({"exponent": -1.0}, "exponent"),
    ],
)
def test_bad_hyper_parameters_raise_naming_the_value(kwargs, named):
    with pytest.raises(ValueError, match=named):
        Jumpout(**kwargs)
    with pytest.raises(ValueError, match=named):
        jumpout(torch.ones(2, 2), **kwargs)


def test_table1_rows_map_to_modifications():
    assert list_ablations() == [
        "dropout",
        "dropout+I",
        "dropout+II",
        "dropout+III",
        "dropout+I+II",
        "dropout+II+III",
        "dropout+I+III",
        "jumpout",
    ]
    assert ablation_kwargs("dropout", dropout_rate=0.4) == {
        "rate": 0.4,
        "adaptive": False,
        "exponent": 1.0,
    }
    assert ablation_kwargs("jumpout") == {"rate": None, "adaptive": True, "exponent": 0.75}
    assert ablation_kwargs("Dropout+III+I") == ablation_kwargs("dropout+I+III")
    # Rows with II but not I: by default the matched base rate, half the dropout rate.
    assert ablation_kwargs("dropout+II+III", dropout_rate=0.2) == {
        "rate": 0.1,
        "adaptive": True,
        "exponent": 0.75,
    }
    with pytest.raises(ValueError, match="dropout\\+I\\+II"):
        ablation_kwargs("dropout+IV")
    # Every row builds a valid layer.
    for row in list_ablations():
        Jumpout(**ablation_kwargs(row))


@pytest.mark.parametrize(
    ("sigma", "p_min", "p_max"),
    [(0.1, 0.01, 0.6), (0.3, 0.05, 0.4), (2.0, 0.0, 0.5), (1e-4, 0.2, 0.9)],
)
def test_mean_base_rate_is_the_exact_mean_of_modification_one(sigma, p_min, p_max):
    from scipy import integrate

    # E[min(p_min + sigma |Z|, p_max)] by numerical integration over the half-normal density.
    def integrand(z):
        return min(p_min + sigma * z, p_max) * 2 * stats.norm.pdf(z)

    kink = (p_max - p_min) / sigma
    # The density is negligible beyond 40 (and quad misses its peak on a long interval).
    expected = integrate.quad(integrand, 0, min(kink, 40.0))[0] + p_max * 2 * stats.norm.sf(kink)
    assert mean_base_rate(sigma, p_min, p_max) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    # And the sampler draws from that distribution: its mean within 5 standard errors.
    draws = sample_base_rate(sigma, p_min, p_max, (400_000,)).double()
    error = 5 * draws.std().item() / math.sqrt(draws.numel()) + 1e-6
    assert draws.mean().item() == pytest.approx(mean_base_rate(sigma, p_min, p_max), abs=error)


def test_mean_base_rate_of_the_paper_defaults_and_edges():
    assert mean_base_rate(0.1, 0.01, 0.6) == pytest.approx(0.01 + 0.1 * math.sqrt(2 / math.pi))
    assert mean_base_rate(0.0, 0.2, 0.6) == 0.2
    assert mean_base_rate(1e6, 0.2, 0.6) == pytest.approx(0.6, abs=1e-6)


@pytest.mark.parametrize("rate", [0.5, 0.3])
def test_ii_base_rate_modes(rate):
    sigma, p_min, p_max = 0.2, 0.02, 0.5
    expected = {
        "matched": rate * 0.5,
        "mean_of_i": mean_base_rate(sigma, p_min, p_max),
        "dropout_rate": rate,
    }
    for mode, base in expected.items():
        assert ii_row_base_rate(
            mode, dropout_rate=rate, sigma=sigma, p_min=p_min, p_max=p_max
        ) == pytest.approx(base)
        options = dict(dropout_rate=rate, ii_base_rate=mode, sigma=sigma, p_min=p_min, p_max=p_max)
        for row in ("dropout+II", "dropout+II+III"):
            assert ablation_kwargs(row, **options)["rate"] == pytest.approx(base)
        # The rows without II keep the dropout rate; the rows with I keep the random rate.
        for row in ("dropout", "dropout+III"):
            assert ablation_kwargs(row, **options)["rate"] == rate
        for row in ("dropout+I", "dropout+I+II", "dropout+I+III", "jumpout"):
            assert ablation_kwargs(row, **options)["rate"] is None
    with pytest.raises(ValueError, match="matched, mean_of_i, dropout_rate"):
        ablation_kwargs("dropout", ii_base_rate="half")


def test_matched_ii_row_changes_as_many_active_units_as_dropout():
    """The paper: "the effective dropout rate of every layer is p_j q_j+". Where half the units
    are active, the matched II row drops the same share of the active units as dropout, off the
    cap, while the old base rate (dropout_rate) sits at it."""
    x = inputs_with_active_fraction((64, 4096), 0.5)
    active = x > 0
    dropped = {}
    for mode in ("matched", "dropout_rate"):
        layer = Jumpout(**ablation_kwargs("dropout+II", dropout_rate=0.5, ii_base_rate=mode))
        y = layer(x)
        dropped[mode] = ((y == 0) & active).sum().item() / active.sum().item()
        capped = layer.last_capped_fraction.item()
        assert capped == (1.0 if mode == "dropout_rate" else 0.0)
    dropout = Jumpout(**ablation_kwargs("dropout", dropout_rate=0.5))
    y = dropout(x)
    dropout_share = ((y == 0) & active).sum().item() / active.sum().item()
    assert dropped["matched"] == pytest.approx(dropout_share, abs=0.02)
    assert dropped["dropout_rate"] == pytest.approx(0.9, abs=0.02)


def test_repr_shows_hyper_parameters():
    assert "sigma=0.1" in repr(Jumpout())
    assert "rate=0.3" in repr(Jumpout(rate=0.3))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_forward_and_backward_never_synchronise():
    x = inputs_with_active_fraction((64, 160, 32, 32), 0.5, device="cuda").requires_grad_()
    layer = Jumpout()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = layer(x)
        y.backward(torch.ones_like(y))
        per_sample = Jumpout(per_sample=True)
        per_sample(x).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert layer.last_rate.device.type == "cuda"
    assert 0 < layer.last_rate.item() <= 0.9
