"""The fused Jumpout kernels (jumpout.fused) against Algorithm 1 and the eager layer.

Triton decides when it is first imported whether it interprets kernels, and a pytest session has
imported it long before this file (torch and the library do). So without a GPU this file runs
itself again in a child process with ``TRITON_INTERPRET=1``, where the kernels run on CPU tensors
(``test_interpreter_suite``); in that child the device is "cpu". With a GPU the same tests run
on "cuda" with the compiled kernels (marked cuda), plus the checks only a GPU can make (inductor
compiles the kernels, no host-device synchronisation).

Random properties are checked under fixed seeds with tolerances of several standard errors.
Tensors are small: the interpreter is slow.
"""

import math
import os
import subprocess
import sys

import pytest
import torch
from scipy import stats

from jumpout import Jumpout, layer

INTERPRETER_CHILD = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available() and not INTERPRETER_CHILD
needs_cuda = [
    pytest.mark.cuda,
    pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (the CPU runs these in a child)"),
]
DEVICES = ["cpu"] if INTERPRETER_CHILD else [pytest.param("cuda", marks=needs_cuda)]

if INTERPRETER_CHILD or CUDA:
    from jumpout import fused


def post_relu(shape, active_fraction, *, seed=0, device="cpu", dtype=torch.float32):
    """Exactly round(active_fraction * numel) strictly positive entries, zeros elsewhere."""
    generator = torch.Generator().manual_seed(seed)
    numel = math.prod(shape)
    values = torch.rand(numel, generator=generator) + 0.5
    order = torch.randperm(numel, generator=generator)
    values[order[int(round(active_fraction * numel)) :]] = 0.0
    return values.view(shape).to(device=device, dtype=dtype)


def run(x, *, sigma=0.1, p_min=0.01, p_max=0.6, rate=None, adaptive=True, exponent=0.75,
        per_sample=False, max_rate=0.9):  # fmt: skip
    """The fused op with the layer's defaults: (output, [mean q+, mean p', capped fraction])."""
    return fused.fused_jumpout(
        x, sigma, p_min, p_max, rate, adaptive, exponent, per_sample, max_rate
    )


def dropped_among_active(x, y):
    active = x > 0
    return ((y == 0) & active).sum().item() / active.sum().item()


def saved_tensors(function, *args):
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = function(*args)
    return output, saved


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(1234)


@pytest.fixture
def fused_layer_on_cpu(monkeypatch):
    """In the interpreter child, send CPU inputs of the layer through the fused kernels."""
    if INTERPRETER_CHILD:
        monkeypatch.setattr(layer, "_FUSED_DEVICE_TYPES", ("cuda", "cpu"))


@pytest.mark.skipif(INTERPRETER_CHILD or CUDA, reason="runs only in the parent without a GPU")
def test_interpreter_suite():
    """Every device test below, on the CPU under Triton's interpreter, in a child process."""
    environment = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    child = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-x", "-p", "no:cacheprovider"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == 0, child.stdout[-6000:] + child.stderr[-3000:]
    assert " passed" in child.stdout


@pytest.mark.parametrize("device", DEVICES)
def test_drop_fraction_among_active_equals_normalised_rate(device):
    x = post_relu((100, 2000), 0.4, device=device)
    y, (active, rate, capped) = run(x, rate=0.2)
    assert active.item() == pytest.approx(0.4, abs=1e-6)
    assert rate.item() == pytest.approx(0.5, abs=1e-6)
    assert capped.item() == 0.0
    # 80,000 active entries: the standard error of the fraction is 0.0018.
    assert dropped_among_active(x, y) == pytest.approx(0.5, abs=0.01)
    assert torch.all(y[x <= 0] == 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("exponent", [0.75, 1.0])
def test_kept_entries_scaled_exactly(device, exponent):
    x = post_relu((32, 1000), 0.5, device=device)
    y, stats_ = run(x, sigma=0.2, exponent=exponent)
    kept = y != 0
    expected = x[kept] * (1 - stats_[1]) ** -exponent
    torch.testing.assert_close(y[kept], expected, rtol=2e-6, atol=0)
    assert torch.all(kept <= (x > 0))


@pytest.mark.parametrize("device", DEVICES)
def test_sampled_rates_follow_truncated_half_normal(device):
    # Per sample, one draw per row: 4000 draws from one call of the rate kernel.
    sigma, p_min, p_max, rows = 0.1, 0.01, 0.25, 1000
    x = torch.ones(rows, 4, device=device)
    _, params, _ = torch.ops.jumpout.draw_rates(x, rows, sigma, p_min, p_max, None, False, 1.0, 0.9)
    rates = params[:rows].double().cpu()
    assert rates.min().item() >= p_min
    assert rates.max().item() <= p_max
    cap_mass = 2 * (1 - stats.norm.cdf((p_max - p_min) / sigma))
    assert (rates == p_max).double().mean().item() == pytest.approx(cap_mass, abs=0.012)
    below = rates[rates < p_max] - p_min
    # Kolmogorov-Smirnov against the half-normal truncated at p_max - p_min.
    truncated = stats.truncnorm(0, (p_max - p_min) / sigma, scale=sigma)
    statistic, p_value = stats.kstest(below.numpy(), truncated.cdf)
    assert p_value > 0.001, statistic
    assert rates.unique().numel() > rows * 0.95


@pytest.mark.parametrize("device", DEVICES)
def test_per_batch_calls_draw_fresh_rates_from_the_same_distribution(device):
    # A fresh seed per call: the per-batch rates of successive calls are independent draws.
    sigma, p_min = 0.1, 0.01
    x = torch.ones(2, 8, device=device)
    rates = [run(x, sigma=sigma, adaptive=False)[1][1].item() for _ in range(80)]
    statistic, p_value = stats.kstest([r - p_min for r in rates], stats.halfnorm(scale=sigma).cdf)
    assert p_value > 0.001, statistic
    assert len(set(rates)) == len(rates)


@pytest.mark.parametrize("device", DEVICES)
def test_per_sample_uses_each_samples_active_fraction(device):
    low = post_relu((1, 20_000), 0.2, seed=1, device=device)
    high = post_relu((1, 20_000), 0.8, seed=2, device=device)
    x = torch.cat([low, high])
    y, (active, rate, _) = run(x, rate=0.1, per_sample=True)
    for row, expected_rate in ((0, 0.5), (1, 0.125)):
        assert dropped_among_active(x[row], y[row]) == pytest.approx(expected_rate, abs=0.02)
    assert active.item() == pytest.approx(0.5, abs=1e-6)
    assert rate.item() == pytest.approx(0.3125, abs=1e-6)

    y, (_, rate, _) = run(x, rate=0.1, per_sample=False)
    assert rate.item() == pytest.approx(0.2, abs=1e-6)
    for row in (0, 1):
        assert dropped_among_active(x[row], y[row]) == pytest.approx(0.2, abs=0.02)


@pytest.mark.parametrize("device", DEVICES)
def test_per_sample_capped_fraction_and_independent_rates(device):
    low = [post_relu((1, 1000), 0.1, seed=s, device=device) for s in range(3)]
    x = torch.cat([*low, post_relu((1, 1000), 0.9, seed=9, device=device)])
    _, (_, _, capped) = run(x, rate=0.3, per_sample=True)
    assert capped.item() == pytest.approx(0.75)
    ones = torch.ones(512, 4, device=device)
    _, params, _ = torch.ops.jumpout.draw_rates(ones, 512, 0.2, 0.01, 0.6, None, False, 0.75, 0.9)
    assert params[:512].unique().numel() > 500


@pytest.mark.parametrize("device", DEVICES)
def test_normalised_rate_is_capped(device):
    x = post_relu((50, 2000), 0.1, device=device)
    y, (_, rate, capped) = run(x, rate=0.5, max_rate=0.9)
    assert rate.item() == pytest.approx(0.9)
    assert capped.item() == 1.0
    assert dropped_among_active(x, y) == pytest.approx(0.9, abs=0.01)
    torch.testing.assert_close(y[y != 0], x[y != 0] * 0.1**-0.75)


@pytest.mark.parametrize("device", DEVICES)
def test_all_inactive_input_drops_nothing_and_has_no_nan(device):
    x = -torch.rand(32, 100, device=device)
    x[0, :10] = 0.0
    x.requires_grad_()
    y, (active, rate, _) = run(x, sigma=0.3)
    assert torch.equal(y, x)
    assert rate.item() == 0.0 and active.item() == 0.0
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("per_sample", [False, True])
def test_backward_regenerates_the_forward_mask_and_matches_the_eager_gradient(device, per_sample):
    # Strictly positive input, so that a zero output means a dropped entry.
    x = (torch.rand(8, 3, 20, 20, device=device) + 0.5).requires_grad_()
    rows = 8 if per_sample else 1
    seeds, params, _ = torch.ops.jumpout.draw_rates(
        x.detach(), rows, 0.15, 0.01, 0.6, None, True, 0.75, 0.9
    )
    y = torch.ops.jumpout.masked_scale(x, seeds, params, rows)
    upstream = torch.randn_like(y)
    (grad,) = torch.autograd.grad(y, x, upstream)
    mask = y != 0
    assert 0.01 < 1 - mask.float().mean().item() < 0.6
    # The backward's regenerated mask is the forward's, entry for entry.
    assert torch.equal(grad != 0, mask)
    # The eager layer's autograd function, given the same mask and scale, gives the same output
    # and the same gradient.
    scale = params[rows:].view(rows, 1, 1, 1) if per_sample else params[1]
    x_reference = x.detach().clone().requires_grad_()
    y_reference = layer._MaskedScale.apply(x_reference, mask, scale)
    y_reference.backward(upstream)
    torch.testing.assert_close(y, y_reference, rtol=2e-6, atol=0)
    torch.testing.assert_close(grad, x_reference.grad, rtol=2e-6, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("per_sample", [False, True])
def test_nothing_per_element_is_saved_for_backward(device, per_sample):
    x = torch.rand(16, 4000, device=device, requires_grad=True)
    _, saved = saved_tensors(lambda t: run(t, per_sample=per_sample)[0], x)
    rows = 16 if per_sample else 1
    # Two seeds, and p' and the scale per row: O(batch), never O(elements), input not kept.
    assert sum(t.numel() * t.element_size() for t in saved) <= 2 * 8 + 2 * 4 * rows
    assert all(t.numel() <= 2 * rows + 2 for t in saved)


@pytest.mark.parametrize("device", DEVICES)
def test_the_layer_takes_the_fused_path_and_logs_its_statistics(device, fused_layer_on_cpu):
    x = post_relu((16, 2000), 0.4, device=device).requires_grad_()
    jumpout_layer = Jumpout(rate=0.2)
    y, saved = saved_tensors(jumpout_layer, x)
    assert sum(t.numel() for t in saved) < 10  # the eager path saves a mask per element
    for statistic in ("last_active_fraction", "last_rate", "last_capped_fraction"):
        value = getattr(jumpout_layer, statistic)
        assert value.dim() == 0 and value.device.type == device and not value.requires_grad
    assert jumpout_layer.last_active_fraction.item() == pytest.approx(0.4, abs=1e-6)
    assert jumpout_layer.last_rate.item() == pytest.approx(0.5, abs=1e-6)
    assert dropped_among_active(x, y) == pytest.approx(0.5, abs=0.02)
    eager = Jumpout(rate=0.2, fused=False)
    _, saved = saved_tensors(eager, x)
    assert sum(t.numel() for t in saved) >= x.numel()


@pytest.mark.parametrize("device", DEVICES)
def test_same_seed_same_output_and_other_seed_differs(device, fused_layer_on_cpu):
    x = post_relu((32, 64), 0.5, device=device)
    outputs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        outputs.append(Jumpout()(x))
    assert torch.equal(outputs[0], outputs[1])
    assert not torch.equal(outputs[0], outputs[2])
    torch.manual_seed(7)
    assert torch.equal(layer.jumpout(x), outputs[0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(4096,), (4, 3, 5, 7, 9), (3, 5000)])
def test_any_input_shape(device, shape):
    x = post_relu(shape, 0.5, device=device)
    y, _ = run(x, rate=0.2)
    assert y.shape == x.shape
    tolerance = 5 * math.sqrt(0.4 * 0.6 / (x > 0).sum().item())
    assert dropped_among_active(x, y) == pytest.approx(0.4, abs=tolerance)


@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_input_is_walked_in_its_own_order(device):
    x = post_relu((6, 8, 10, 10), 1.0, device=device).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    y, (_, rate, _) = run(x, sigma=0.2, per_sample=True)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert rate.item() > 0
    upstream = torch.ones(y.shape, device=device)  # contiguous: the backward re-lays it out
    (grad,) = torch.autograd.grad(y, x, upstream)
    assert torch.equal(grad != 0, y != 0)
    # Per sample: each sample's rate comes from its own entries, also in NHWC memory order.
    contiguous_copy = x.detach().contiguous()
    torch.manual_seed(0)
    _, (_, rate_nhwc, _) = run(x.detach(), rate=0.1, per_sample=True)
    torch.manual_seed(0)
    _, (_, rate_nchw, _) = run(contiguous_copy, rate=0.1, per_sample=True)
    assert rate_nhwc.item() == pytest.approx(rate_nchw.item(), abs=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_scaled_in_fp32_and_rounded_once(device, dtype):
    x = post_relu((16, 1000), 0.5, device=device, dtype=dtype)
    seeds, params, _ = torch.ops.jumpout.draw_rates(x, 1, 0.2, 0.01, 0.6, None, True, 0.75, 0.9)
    y = torch.ops.jumpout.masked_scale(x, seeds, params, 1)
    assert y.dtype == dtype
    kept = y != 0
    assert params.dtype == torch.float32
    # bf16(x * scale_fp32): the product in fp32, rounded once (never x * bf16(scale)).
    expected = (x[kept].float() * params[1]).to(dtype)
    if INTERPRETER_CHILD:
        # The interpreter's fp32 -> bf16/fp16 conversion may round differently from the GPU's
        # round-to-nearest-even: at most one unit in the last place.
        ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
        torch.testing.assert_close(y[kept].float(), expected.float(), rtol=ulp, atol=0)
    else:
        assert torch.equal(y[kept], expected)


@pytest.mark.skipif(not INTERPRETER_CHILD, reason="the interpreter's opaque operators")
def test_operator_registration_passes_opcheck():
    x = post_relu((4, 3, 8, 8), 0.5).requires_grad_()
    seeds, params, _ = torch.ops.jumpout.draw_rates(
        x.detach(), 4, 0.1, 0.01, 0.6, None, True, 0.75, 0.9
    )
    torch.library.opcheck(
        torch.ops.jumpout.draw_rates.default, (x.detach(), 4, 0.1, 0.01, 0.6, None, True, 0.75, 0.9)
    )
    torch.library.opcheck(torch.ops.jumpout.masked_scale.default, (x, seeds, params, 4))


class SmallNet(torch.nn.Module):
    def __init__(self, **jumpout_kwargs):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.drop = Jumpout(**jumpout_kwargs)
        self.head = torch.nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        return self.head(self.drop(torch.relu(self.conv(x))).flatten(1))


@pytest.mark.skipif(not INTERPRETER_CHILD, reason="CPU tracing of the interpreter's operators")
@pytest.mark.parametrize("per_sample", [False, True])
def test_dynamo_traces_the_fused_layer_without_graph_breaks(fused_layer_on_cpu, per_sample):
    net = SmallNet(per_sample=per_sample)
    x = torch.randn(4, 3, 8, 8)
    explanation = torch._dynamo.explain(net)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True)
    compiled(x).sum().backward()
    assert 0 < net.drop.last_rate.item() <= 0.9
    assert net.conv.weight.grad is not None and torch.isfinite(net.conv.weight.grad).all()


def _compile_for_h100(kernel, signature, constexprs):
    """Triton's NVIDIA backend compiles a kernel down to a cubin for sm_90 without a GPU, with
    the alignment Triton assumes at launch for 16-divisible pointers and sizes."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names
    constants = {(names.index(name),): value for name, value in constexprs.items()}
    aligned = {
        (index,): [["tt.divisibility", 16]]
        for index, name in enumerate(names)
        if signature[name] != "constexpr" and not signature[name].startswith("fp")
    }
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=aligned)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})


@pytest.mark.skipif(
    INTERPRETER_CHILD or CUDA, reason="without a GPU only: with one, the CUDA tests launch them"
)
def test_kernels_compile_for_an_h100_without_a_gpu():
    """What the interpreter cannot show: every kernel passes Triton's compiler and ptxas for an
    H100 (sm_90), and the element-wise pass uses 16-byte vector loads and stores."""
    pytest.importorskip("triton.backends.nvidia")
    from jumpout import fused as real

    count = {"input_ptr": "*bf16", "partial_ptr": "*i32", "row_size": "i32", "chunks": "i32"}
    _compile_for_h100(real._count_active_kernel, {**count, "BLOCK": "constexpr"}, {"BLOCK": 4096})
    rates = {
        name: "fp32" for name in ("sigma", "p_min", "p_max", "fixed_rate", "exponent", "max_rate")
    }
    rates |= {"partial_ptr": "*i32", "seed_ptr": "*i64", "params_ptr": "*fp32"}
    rates |= {"stats_ptr": "*fp32", "rows": "i32", "chunks": "i32", "row_size": "i32"}
    rates |= {name: "constexpr" for name in ("RANDOM_RATE", "ADAPTIVE", "ROWS", "CHUNKS")}
    for random_rate, adaptive, rows, chunks in ((True, True, 1, 1024), (False, False, 128, 64)):
        flags = {"RANDOM_RATE": random_rate, "ADAPTIVE": adaptive, "ROWS": rows, "CHUNKS": chunks}
        _compile_for_h100(real._rates_kernel, rates, flags)
    for dtype, per_row in (("fp32", False), ("bf16", True)):
        signature = {"input_ptr": f"*{dtype}", "output_ptr": f"*{dtype}", "seed_ptr": "*i64"}
        signature |= {"params_ptr": "*fp32", "numel": "i32", "rows": "i32", "row_size": "i32"}
        signature |= {"PER_ROW": "constexpr", "BLOCK": "constexpr"}
        compiled = _compile_for_h100(
            real._masked_scale_kernel, signature, {"PER_ROW": per_row, "BLOCK": real._BLOCK}
        )
        ptx = compiled.asm["ptx"]
        assert "ld.global.v4.b32" in ptx and "st.global.v4.b32" in ptx, dtype


# Only a GPU can check these: inductor compiling the kernels into the model, and the host never
# waiting for the device.


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("per_sample", [False, True])
def test_cuda_inductor_compiles_a_model_with_jumpout_without_graph_breaks(per_sample):
    net = SmallNet(per_sample=per_sample).cuda()
    x = torch.randn(32, 3, 8, 8, device="cuda")
    explanation = torch._dynamo.explain(net)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(net, fullgraph=True)
    compiled(x).sum().backward()  # compile outside the sync check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        compiled(x).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert 0 < net.drop.last_rate.item() <= 0.9
    torch.manual_seed(3)
    first = compiled(x)
    torch.manual_seed(3)
    assert torch.equal(compiled(x), first)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_fused_layer_never_synchronises(dtype):
    x = post_relu((64, 160, 32, 32), 0.5, device="cuda", dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    layers = [Jumpout(), Jumpout(per_sample=True)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for jumpout_layer in layers:
            jumpout_layer(x).backward(torch.ones_like(x))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for jumpout_layer in layers:
        assert 0 < jumpout_layer.last_rate.item() <= 0.9
        assert jumpout_layer.last_active_fraction.item() == pytest.approx(0.5, abs=1e-3)
