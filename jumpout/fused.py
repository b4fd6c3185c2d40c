"""The fused CUDA path of the Jumpout layer: Triton kernels registered as PyTorch custom operators.

Algorithm 1 needs the fraction of active entries q+ before it can draw the mask, so a call takes
three Triton kernels and one seed draw instead of the ~25 small kernels of the eager path:

1. ``_count_active_kernel`` reads the input once and writes the number of positive entries of
   each block (per sample: blocks never straddle two samples).
2. ``_rates_kernel`` (one program, O(batch) work) sums the block counts into q+, draws the base
   rate (Modification I) by Philox from the call's seed, applies Modification II's cap, computes
   Modification III's scale in fp32, and writes p' and the scale per sample (or once per batch)
   plus the three statistics the engine logs (batch means of q+, p' and "p' reached the cap").
3. ``_masked_scale_kernel`` reads the input and writes ``input * keep * scale``, where ``keep``
   is a function of (seed, element offset) through Philox: four decisions per Philox call.

Backward is the same masked-scale kernel applied to the incoming gradient: it regenerates the
mask from the seed, so autograd saves two seeds and two floats per sample (or per batch), never a
per-element tensor (``nn.Dropout`` saves one byte per element). The seed is drawn on the device
from torch's generator (``torch.manual_seed`` reproduces runs; nothing waits for the host).

Both steps are ``torch.library.triton_op`` operators, ``jumpout::draw_rates`` and
``jumpout::masked_scale`` (whose autograd is itself), so ``torch.compile`` traces a model with
Jumpout without graph breaks and can see the kernels. The mask is indexed by memory offset, so a
``channels_last`` input is read and written in its own order; backward lays the gradient out like
the forward's output before regenerating the mask.

Triton's interpreter (``TRITON_INTERPRET=1`` set before Triton is first imported) runs the same
kernels on CPU tensors; that is how the tests prove the maths without a GPU. Speed and memory
traffic are proven only on a GPU (``benchmarks/layer.py``, ``scripts/gpu-check``).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:  # Triton ships with the CUDA build of torch; a CPU-only build has none.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where torch has no Triton
    triton = None

__all__ = ["INTERPRETED", "available", "fused_jumpout", "supports"]

# Whether this process runs Triton kernels in the interpreter (on CPU tensors). Triton decides
# when it is imported, so the variable must be set before the first ``import triton``.
INTERPRETED = triton is not None and os.environ.get("TRITON_INTERPRET") == "1"

# Offsets inside the kernels are 32-bit; bigger tensors take the eager path.
_MAX_NUMEL = 2**31 - 1
# Elements per program of the element-wise and counting passes. Four quarter-blocks share each
# Philox call (``randint4x``), so BLOCK must be a multiple of 4.
_BLOCK = 4096
_COUNT_BLOCK = 4096
_SHORT_COUNT_BLOCK = 512
# Warps per program: 4 on the element-wise pass gives each thread 8 consecutive entries of a
# quarter-block (16-byte vector loads in bf16, two in fp32); 8 on the counting pass.
_MASKED_SCALE_WARPS = 4
_COUNT_WARPS = 8
# Rows and block counts the one-program rate kernel handles per loop iteration (a tile of at
# most 8192 counts). Few variants, chosen by comparisons: a size-dependent power of two would put
# many guards on a dynamic shape when compiled.
_RATE_ROWS = 128
_RATE_CHUNKS = 64
_RATE_CHUNKS_PER_BATCH = 1024
_RATE_CHUNKS_SHORT = 8
# Seeds are drawn below 2**62 so that the two per call never overflow int64 arithmetic.
_SEED_HIGH = 2**62


def available() -> bool:
    """Whether the fused kernels can run in this process at all (Triton importable)."""
    return triton is not None


def supports(input: Tensor) -> bool:
    """Whether :func:`fused_jumpout` can take this input: a CUDA tensor (or a CPU tensor under
    the interpreter) of a floating dtype, with fewer than 2**31 elements, at least 1-D."""
    if triton is None or not input.is_floating_point() or input.dim() == 0:
        return False
    if input.numel() == 0 or input.numel() > _MAX_NUMEL:
        return False
    if input.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    return input.is_cuda or (INTERPRETED and input.device.type == "cpu")


if triton is not None:

    @triton.jit
    def _count_active_kernel(input_ptr, partial_ptr, row_size, chunks, BLOCK: tl.constexpr):
        """partial[row, chunk] = number of entries > 0 in that block of the row."""
        pid = tl.program_id(0)
        row = pid // chunks
        chunk = pid % chunks
        offsets = chunk * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < row_size
        values = tl.load(input_ptr + row * row_size + offsets, mask=inside, other=0.0)
        count = tl.sum((values > 0).to(tl.int32), axis=0)
        tl.store(partial_ptr + pid, count)

    @triton.jit
    def _rates_kernel(
        partial_ptr,
        seed_ptr,
        params_ptr,
        stats_ptr,
        rows,
        chunks,
        row_size,
        sigma,
        p_min,
        p_max,
        fixed_rate,
        exponent,
        max_rate,
        RANDOM_RATE: tl.constexpr,
        ADAPTIVE: tl.constexpr,
        ROWS: tl.constexpr,
        CHUNKS: tl.constexpr,
    ):
        """params[0, r] = p' and params[1, r] = (1 - p')^-exponent for each row r; stats = batch
        means of q+, p' and [p' >= max_rate]. One program: the work is O(rows * chunks)."""
        seed = tl.load(seed_ptr + 1)
        active_sum = tl.zeros([ROWS], tl.float32)
        rate_sum = tl.zeros([ROWS], tl.float32)
        capped_sum = tl.zeros([ROWS], tl.float32)
        for row_start in range(0, rows, ROWS):
            row = row_start + tl.arange(0, ROWS)
            in_rows = row < rows
            count = tl.zeros([ROWS], tl.int64)
            for chunk_start in range(0, chunks, CHUNKS):
                chunk = chunk_start + tl.arange(0, CHUNKS)
                inside = in_rows[:, None] & (chunk[None, :] < chunks)
                part = tl.load(partial_ptr + row[:, None] * chunks + chunk[None, :], inside, 0)
                count += tl.sum(part.to(tl.int64), axis=1)
            active = count.to(tl.float32) / row_size
            if RANDOM_RATE:
                # Modification I: min(p_min + |N(0, sigma)|, p_max), one draw per row.
                base = tl.minimum(p_min + tl.abs(tl.randn(seed, row)) * sigma, p_max)
            else:
                base = tl.zeros([ROWS], tl.float32) + fixed_rate
            if ADAPTIVE:
                # Modification II; nothing active means nothing to drop (rate 0, scale 1).
                normalised = tl.minimum(base / tl.maximum(active, 1e-30), max_rate)
                rate = tl.where(active > 0, normalised, 0.0)
                capped = tl.where(rate >= max_rate, 1.0, 0.0)
            else:
                rate = base
                capped = tl.zeros([ROWS], tl.float32)
            # Modification III in fp32, whatever the input's dtype (bf16 would round it).
            scale = tl.exp(tl.log(1.0 - rate) * -exponent)
            tl.store(params_ptr + row, rate, mask=in_rows)
            tl.store(params_ptr + rows + row, scale, mask=in_rows)
            active_sum += tl.where(in_rows, active, 0.0)
            rate_sum += tl.where(in_rows, rate, 0.0)
            capped_sum += tl.where(in_rows, capped, 0.0)
        tl.store(stats_ptr, tl.sum(active_sum, axis=0) / rows)
        tl.store(stats_ptr + 1, tl.sum(rate_sum, axis=0) / rows)
        tl.store(stats_ptr + 2, tl.sum(capped_sum, axis=0) / rows)

    @triton.jit
    def _masked_scale_quarter(
        input_ptr,
        output_ptr,
        params_ptr,
        random,
        offsets,
        numel,
        rows,
        row_size,
        PER_ROW: tl.constexpr,
    ):
        inside = offsets < numel
        values = tl.load(input_ptr + offsets, mask=inside, other=0.0)
        if PER_ROW:
            row = offsets // row_size
            rate = tl.load(params_ptr + row, mask=inside, other=0.0)
            scale = tl.load(params_ptr + rows + row, mask=inside, other=1.0)
        else:
            rate = tl.load(params_ptr)
            scale = tl.load(params_ptr + 1)
        # Kept with probability 1 - p': uniform in [0, 1) at or above p'.
        keep = tl.random.uint_to_uniform_float(random) >= rate
        # A multiply, not a select: a dropped NaN stays NaN, as in nn.Dropout and the eager path.
        factor = tl.where(keep, scale, 0.0)
        result = values.to(tl.float32) * factor
        tl.store(output_ptr + offsets, result.to(output_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _masked_scale_kernel(
        input_ptr,
        output_ptr,
        seed_ptr,
        params_ptr,
        numel,
        rows,
        row_size,
        PER_ROW: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """output = input * [uniform(seed, offset) >= p'] * scale, element-wise. The same call
        on the gradient is the backward pass: the mask is regenerated, never stored."""
        QUARTER: tl.constexpr = BLOCK // 4
        pid = tl.program_id(0)
        seed = tl.load(seed_ptr)
        lane = tl.arange(0, QUARTER)
        # One Philox call gives four 32-bit draws: one for each quarter of the block.
        r0, r1, r2, r3 = tl.randint4x(seed, pid * QUARTER + lane)
        start = pid * BLOCK
        _masked_scale_quarter(
            input_ptr, output_ptr, params_ptr, r0, start + lane, numel, rows, row_size, PER_ROW
        )
        _masked_scale_quarter(
            input_ptr,
            output_ptr,
            params_ptr,
            r1,
            start + QUARTER + lane,
            numel,
            rows,
            row_size,
            PER_ROW,
        )
        _masked_scale_quarter(
            input_ptr,
            output_ptr,
            params_ptr,
            r2,
            start + 2 * QUARTER + lane,
            numel,
            rows,
            row_size,
            PER_ROW,
        )
        _masked_scale_quarter(
            input_ptr,
            output_ptr,
            params_ptr,
            r3,
            start + 3 * QUARTER + lane,
            numel,
            rows,
            row_size,
            PER_ROW,
        )


def _rate_chunks(rows: int, chunks: int) -> int:
    if rows == 1:
        return _RATE_CHUNKS_PER_BATCH
    return _RATE_CHUNKS if chunks > _RATE_CHUNKS_SHORT else _RATE_CHUNKS_SHORT


def _is_fake(tensor: Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(tensor)


def _launch(kernel, grid: tuple[int, ...], *args, num_warps: int = 4, **meta) -> None:
    """Launch a kernel so that torch.compile sees it (``wrap_triton``). Interpreted kernels run
    directly, and not at all on fake tensors (tracing only needs the outputs' metadata, which
    ``torch.empty`` already gave)."""
    if INTERPRETED:
        if any(isinstance(arg, Tensor) and _is_fake(arg) for arg in args):
            return
        kernel[grid](*args, **meta)
        return
    torch.library.wrap_triton(kernel)[grid](*args, **meta, num_warps=num_warps)


def _layout(tensor: Tensor) -> torch.memory_format:
    """The dense layout the kernels walk: contiguous, or channels_last (both keep the batch
    dimension outermost, so a sample is one contiguous run of memory)."""
    if tensor.is_contiguous():
        return torch.contiguous_format
    if tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if tensor.dim() == 5 and tensor.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def _dense(tensor: Tensor) -> Tensor:
    return tensor.contiguous(memory_format=_layout(tensor))


def _define_op(name: str, body):
    """Register ``body`` as the operator ``jumpout::name``. On a GPU: a ``triton_op``, which
    torch.compile decomposes into the kernels it launches. Under the interpreter, whose kernels
    ``wrap_triton`` cannot trace: an opaque ``custom_op`` whose fake implementation is the same
    body (``_launch`` skips the kernels on fake tensors), so tracing still works on the CPU."""
    if not INTERPRETED:
        return torch.library.triton_op(f"jumpout::{name}", body, mutates_args=())
    op = torch.library.custom_op(f"jumpout::{name}", body, mutates_args=())
    op.register_fake(body)
    return op


if triton is not None:

    def _draw_rates(
        input: Tensor,
        rows: int,
        sigma: float,
        p_min: float,
        p_max: float,
        rate: float | None,
        adaptive: bool,
        exponent: float,
        max_rate: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Passes 1 and 2: (seeds int64[2], params float32[2 * rows] = p' then scale per row,
        stats float32[3] = batch means of q+, p' and the capped flag). ``rows`` is the batch
        size per sample, 1 per batch; ``input`` is dense (see :func:`_layout`)."""
        numel = input.numel()
        row_size = numel // rows
        # Blocks never straddle two rows; short rows get short blocks (two variants).
        count_block = _COUNT_BLOCK if row_size > _SHORT_COUNT_BLOCK else _SHORT_COUNT_BLOCK
        chunks = triton.cdiv(row_size, count_block)
        device = input.device
        # Drawn on the device from torch's generator: no host sync, manual_seed reproduces it.
        seeds = torch.randint(0, _SEED_HIGH, (2,), dtype=torch.int64, device=device)
        partial = torch.empty(rows * chunks, dtype=torch.int32, device=device)
        params = torch.empty(2 * rows, dtype=torch.float32, device=device)
        stats = torch.empty(3, dtype=torch.float32, device=device)
        _launch(
            _count_active_kernel, (rows * chunks,), input, partial, row_size, chunks,
            BLOCK=count_block, num_warps=_COUNT_WARPS,
        )  # fmt: skip
        _launch(
            _rates_kernel,
            (1,),
            partial,
            seeds,
            params,
            stats,
            rows,
            chunks,
            row_size,
            sigma,
            p_min,
            p_max,
            0.0 if rate is None else rate,
            exponent,
            max_rate,
            RANDOM_RATE=rate is None,
            ADAPTIVE=adaptive,
            ROWS=1 if rows == 1 else _RATE_ROWS,
            CHUNKS=_rate_chunks(rows, chunks),
        )
        return seeds, params, stats

    def _masked_scale(input: Tensor, seeds: Tensor, params: Tensor, rows: int) -> Tensor:
        """Pass 3: ``input * keep(seeds[0], offset) * scale`` with p' and the scale per row from
        ``params`` (as :func:`draw_rates` writes them). The output has the input's layout."""
        input = _dense(input)
        output = torch.empty_like(input, memory_format=_layout(input))
        numel = input.numel()
        _launch(
            _masked_scale_kernel, (triton.cdiv(numel, _BLOCK),), input, output, seeds, params,
            numel, rows, numel // rows, PER_ROW=rows > 1, BLOCK=_BLOCK,
            num_warps=_MASKED_SCALE_WARPS,
        )  # fmt: skip
        return output

    draw_rates = _define_op("draw_rates", _draw_rates)
    masked_scale = _define_op("masked_scale", _masked_scale)

    def _masked_scale_setup(ctx, inputs, output) -> None:
        _, seeds, params, rows = inputs
        ctx.save_for_backward(seeds, params)
        ctx.rows = rows
        ctx.layout = _layout(output)

    def _masked_scale_backward(ctx, grad_output: Tensor):
        seeds, params = ctx.saved_tensors
        # The mask is indexed by memory offset: lay the gradient out as the output was.
        grad = grad_output.contiguous(memory_format=ctx.layout)
        return masked_scale(grad, seeds, params, ctx.rows), None, None, None

    masked_scale.register_autograd(_masked_scale_backward, setup_context=_masked_scale_setup)


def fused_jumpout(
    input: Tensor,
    sigma: float,
    p_min: float,
    p_max: float,
    rate: float | None,
    adaptive: bool,
    exponent: float,
    per_sample: bool,
    max_rate: float,
) -> tuple[Tensor, Tensor]:
    """Algorithm 1 in training mode by the fused kernels: returns the output and a float32[3]
    tensor of batch means (q+, p', fraction at the cap) on the input's device.

    The caller checks :func:`supports` first. Per sample applies to inputs of 2 or more
    dimensions, as in the eager path.
    """
    input = _dense(input)
    rows = input.shape[0] if per_sample and input.dim() > 1 else 1
    seeds, params, stats = torch.ops.jumpout.draw_rates(
        input.detach(), rows, sigma, p_min, p_max, rate, adaptive, exponent, max_rate
    )
    output = torch.ops.jumpout.masked_scale(input, seeds, params, rows)
    return output, stats
