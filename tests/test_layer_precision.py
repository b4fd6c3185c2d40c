"""The eager Jumpout layer on the inputs the CUDA path feeds it: channels_last (NHWC) tensors and
bf16/fp16 values under autocast (issue 11, section 0).

* The mask is built in the input's memory format, so the multiply reads mask and input with the
  same strides (an NCHW mask against an NHWC input is read with a stride of H*W).
* The rescale factor ``(1 - p')^-exponent`` is computed and applied in fp32: a kept bf16 entry is
  ``bf16(x * scale_fp32)``, one rounding, never ``x * bf16(scale)`` (0.13-0.34% off).

The CPU runs every check; the CUDA-marked tests repeat the two risks on a GPU, where a 0-dim
device scale would otherwise be rounded to the input's dtype before the multiply.
"""

import math

import pytest
import torch

from jumpout import Jumpout

CUDA = torch.cuda.is_available()


def post_relu(shape, active_fraction=0.5, *, seed=0, dtype=torch.float32, device="cpu"):
    """Strictly positive entries on ``active_fraction`` of the positions, zeros elsewhere."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.rand(shape, generator=generator) + 0.5
    values[torch.rand(shape, generator=generator) >= active_fraction] = 0.0
    return values.to(device=device, dtype=dtype)


def saved_mask(layer, x):
    """The layer's output and the 1-byte mask autograd saved for its backward."""
    if not x.requires_grad and x.is_leaf:
        x.requires_grad_()
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        y = layer(x)
    (mask,) = [tensor for tensor in saved if tensor.dtype == torch.bool]
    return y, mask


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(7)


# ---------------------------------------------------------------------------------------------
# channels_last


@pytest.mark.parametrize("per_sample", [False, True])
def test_mask_of_a_channels_last_input_has_the_inputs_strides(per_sample):
    x = post_relu((8, 16, 6, 5)).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    y, mask = saved_mask(Jumpout(per_sample=per_sample), x)
    assert mask.stride() == x.stride()
    assert y.stride() == x.stride()
    y.backward(torch.ones_like(y))
    assert x.grad.is_contiguous(memory_format=torch.channels_last)
    # The mask still masks the element it is logically paired with.
    assert torch.equal(y != 0, mask & (x > 0))


def test_contiguous_input_keeps_its_contiguous_mask():
    x = post_relu((4, 3, 5, 5))
    _, mask = saved_mask(Jumpout(), x)
    assert mask.is_contiguous()


def test_a_non_dense_input_still_works():
    # A strided slice has gaps: the mask falls back to the contiguous layout, values still right.
    x = post_relu((8, 16, 10, 10))[:, ::2, :, 1:]
    layer = Jumpout(rate=0.2, adaptive=False, exponent=1.0)
    y = layer(x)
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / 0.8, rtol=1e-6, atol=0)


def test_channels_last_drops_as_many_active_entries_as_contiguous():
    """Same distribution in both layouts: the drop fraction among active entries is the
    applied rate p' within a few standard errors, for NCHW and NHWC inputs alike."""
    x = post_relu((32, 32, 16, 16), 0.4)
    active = x > 0
    n = active.sum().item()
    for layout in (torch.contiguous_format, torch.channels_last):
        layer = Jumpout(rate=0.2, adaptive=True)
        y = layer(x.contiguous(memory_format=layout))
        dropped = ((y == 0) & active).sum().item() / n
        rate = layer.last_rate.item()
        assert rate == pytest.approx(0.5, abs=1e-3)
        assert abs(dropped - rate) < 5 * math.sqrt(rate * (1 - rate) / n)
        # Per channel too: a layout bug that drops whole channels would skew these.
        per_channel = ((y == 0) & active).sum((0, 2, 3)) / active.sum((0, 2, 3))
        assert per_channel.std().item() < 0.05


# ---------------------------------------------------------------------------------------------
# bf16 / fp16: the rescale in fp32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("exponent", [0.75, 1.0])
def test_half_precision_rescale_is_the_fp32_factor_rounded_once(dtype, exponent):
    x = post_relu((64, 512), dtype=dtype)
    rate = 0.3
    layer = Jumpout(rate=rate, adaptive=False, exponent=exponent)
    y = layer(x)
    assert y.dtype == dtype
    scale32 = torch.tensor(1.0 - rate, dtype=torch.float32).pow(-exponent)
    kept = y != 0
    expected = (x[kept].float() * scale32).to(dtype)
    assert torch.equal(y[kept], expected)
    # The old way (the factor rounded to the input's dtype first) differs on some entries: the
    # test can tell the two apart.
    rounded = x[kept] * scale32.to(dtype)
    assert not torch.equal(rounded, expected)


def test_bf16_effective_scale_matches_fp32_within_the_final_rounding():
    x = post_relu((64, 2048), dtype=torch.bfloat16)
    layer = Jumpout(sigma=0.2)  # the random, adaptive rate: p' is data dependent
    y = layer(x)
    scale32 = (1.0 - layer.last_rate.float()).pow(-0.75)
    kept = y != 0
    ratio = y[kept].double() / x[kept].double()
    # One bf16 rounding of the product: relative error at most 2^-8 per entry, mean ~0.
    relative = ratio / scale32.double() - 1
    assert relative.abs().max().item() <= 2**-8
    assert abs(relative.mean().item()) < 2e-4


def test_per_sample_bf16_rescale_is_fp32_per_sample():
    x = post_relu((16, 4, 8, 8), dtype=torch.bfloat16)
    layer = Jumpout(per_sample=True, rate=0.25)
    y = layer(x)
    active = (x > 0).float().mean((1, 2, 3), keepdim=True)
    rate = (0.25 / active).clamp(max=0.9)
    scale32 = (1 - rate).pow(-0.75)
    kept = y != 0
    expected = (x.float() * scale32).to(torch.bfloat16)
    assert torch.equal(y[kept], expected[kept])


def test_bf16_gradient_is_mask_times_fp32_scale():
    x = (torch.rand(32, 256) + 0.5).bfloat16().requires_grad_()
    layer = Jumpout(rate=0.3, adaptive=False)
    y = layer(x)
    upstream = torch.randn_like(y)
    y.backward(upstream)
    scale32 = torch.tensor(0.7).pow(-0.75)
    expected = torch.where(y != 0, (upstream.float() * scale32).to(torch.bfloat16), 0)
    assert torch.equal(x.grad, expected)


def test_under_cpu_bf16_autocast_a_conv_block_keeps_bf16_and_channels_last():
    conv = torch.nn.Conv2d(3, 8, 3, padding=1).to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = torch.relu(conv(x))
        y, mask = saved_mask(Jumpout(), h)
    assert y.dtype == torch.bfloat16
    assert mask.stride() == h.stride()


# ---------------------------------------------------------------------------------------------
# The same on a GPU (scripts/gpu-check runs these)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_channels_last_mask_and_fp32_rescale(dtype):
    x = post_relu((32, 64, 16, 16), dtype=dtype, device="cuda")
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    # The eager path: it is the one that saves a mask (the fused kernel regenerates it,
    # tests/test_fused.py checks its layout and rescale).
    layer = Jumpout(rate=0.3, adaptive=False, fused=False)
    y, mask = saved_mask(layer, x)
    assert mask.stride() == x.stride() and y.stride() == x.stride()
    scale32 = torch.tensor(0.7, device="cuda").pow(-0.75)
    kept = y != 0
    assert torch.equal(y[kept], (x[kept].float() * scale32).to(dtype))
    y.backward(torch.ones_like(y))
    assert x.grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_autocast_bf16_drop_fraction_in_channels_last():
    conv = torch.nn.Conv2d(16, 32, 3, padding=1).cuda().to(memory_format=torch.channels_last)
    x = torch.randn(64, 16, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    layer = Jumpout(rate=0.2, adaptive=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        h = torch.relu(conv(x))
        y = layer(h)
    active = h > 0
    dropped = ((y == 0) & active).sum().item() / active.sum().item()
    assert abs(dropped - layer.last_rate.item()) < 0.01
