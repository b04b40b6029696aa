"""Outlier count on the GPU: mean(|w|) and #{score > M * mean}, two passes, no host sync.

Formula and reference: ``owlore_kernels.ops.outlier_count.outlier_count_reference``.
``score_ij = |w_ij|`` or ``|w_ij| * s_j`` with a per-column scale ``s``.

Design
------
* Two passes: ``_abs_sum_kernel`` adds every tile's fp32 score sum into a one-element
  fp32 buffer; ``_count_kernel`` reads that sum back *from device memory*, forms
  ``cut = M * (sum / numel)`` itself and adds its tile's count into a one-element
  int64 buffer. The host never waits between the passes (one pass would need a
  histogram of scores, since the cut depends on the mean of everything).
* Pass two reads only what can hold an outlier: pass one also stores each tile row's
  largest score (one fp32 per 512 entries), and pass two masks off, before loading,
  the rows whose largest score is not above the cut -- exact, since both passes compute
  the same fp32 scores. Its traffic is the fraction of 512-entry row segments holding
  an outlier: ~3 % for Gaussian weights at M = 5 (P(|z| > 4) = 6.6e-5 per entry), so
  the op reads W ~1.04 times; up to 2 times when outliers are spread over every segment.
* No full-size temporary: each tile is reduced in registers and leaves one atomic.
* Several tensors share one mean: every tensor's sum-pass launch adds into the same
  buffer before any count-pass launch reads it (same stream, so ordered).
* Tiles are 2-D (rows x columns of the tensor's 2-D view, with strides), so the
  column scale is loaded once per tile as a row vector instead of gathered per
  element with an int64 modulo; transposed views work without a copy.
* The count is accumulated in int64 (``tl.atomic_add`` on int64 works on sm_90 and in
  the interpreter), so even >2^31 hits cannot overflow. At 4096 x 11008 = 45M entries
  an int32 would have sufficed; int64 costs nothing measurable.
* The fp32 sum uses atomics, so the order in which tiles land varies run to run on a
  GPU: the last bit or two of the mean may differ between runs (~1e-7 relative).

Fixed config: 16 x 512 tiles (8192 elements: 16 KB bf16 / 32 KB fp32 per program,
32 elements per thread at 8 warps). At 4096 x 11008 that is 256 x 22 = 5632
programs (~43 per SM on 132 SMs), so the grid fills the GPU and the 5632 same-address
atomics (a few ns each at L2) stay below 1/10 of the ~21 us the bf16 read takes.
Under the interpreter (~1 ms per program) a 67 x 131 tensor is 5 programs a pass.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from ._common import Launch, as_kernel_arg, bf16_bits_to_fp32, device_ctx, dtype_kind

BLOCK_ROWS = 16
BLOCK_COLS = 512
NUM_WARPS = 8


@triton.jit
def _load_scores(
    x_ptr, scale_ptr, pid, rows, cols, stride_r, stride_c, stride_s, rows_needed,
    X_KIND: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """fp32 scores of one tile (0 outside the tensor and in rows not needed) and its mask.
    Rows not needed are masked off before the load, so they cost no memory traffic."""
    num_c = tl.cdiv(cols, BLOCK_C)
    pid_r = pid // num_c
    pid_c = pid % num_c
    offs_r = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = pid_c.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < cols
    mask = ((offs_r < rows) & rows_needed)[:, None] & mask_c[None, :]
    ptrs = x_ptr + offs_r[:, None] * stride_r + offs_c[None, :] * stride_c
    if X_KIND == 1:  # bf16 as int16 bits: exact upcast, same in the interpreter and on GPU
        x = bf16_bits_to_fp32(tl.load(ptrs, mask=mask, other=0))
    else:
        x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    score = tl.abs(x)
    if HAS_SCALE:
        s = tl.load(scale_ptr + offs_c * stride_s, mask=mask_c, other=0.0).to(tl.float32)
        score = score * s[None, :]
    return score, mask


@triton.jit
def _abs_sum_kernel(
    x_ptr, scale_ptr, sum_ptr, rowmax_ptr, rows, cols, stride_r, stride_c, stride_s,
    X_KIND: tl.constexpr,  # fp32 / bf16 bits / fp16: changes the load
    HAS_SCALE: tl.constexpr,  # column scale or not: removes a load and a multiply
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,  # tile shape
):
    pid = tl.program_id(0)
    everything = tl.full((BLOCK_R,), 1, tl.int1)
    score, _ = _load_scores(x_ptr, scale_ptr, pid, rows, cols, stride_r, stride_c, stride_s, everything,
                            X_KIND, HAS_SCALE, BLOCK_R, BLOCK_C)
    tl.atomic_add(sum_ptr, tl.sum(score))
    # each tile row's largest score (4 bytes per BLOCK_C entries): pass two skips the rows
    # whose largest score is not above the cut, since none of their entries can be
    tl.store(rowmax_ptr + pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R), tl.max(score, axis=1))


@triton.jit
def _count_kernel(
    x_ptr, scale_ptr, sum_ptr, rowmax_ptr, count_ptr, rows, cols, stride_r, stride_c, stride_s,
    numel,  # fp32: total entries over all tensors (the mean's denominator)
    threshold,  # fp32: M
    X_KIND: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    # the mean is read from device memory, where pass one left it: no host round trip.
    # div_rn: IEEE division, as torch's ``total / numel`` (plain ``/`` is approximate on GPU)
    cut = threshold * tl.div_rn(tl.load(sum_ptr), numel)
    row_max = tl.load(rowmax_ptr + pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R))
    # the same fp32 scores as pass one computed, so "max <= cut" is exact; a NaN max (the
    # interpreter's max propagates NaN, the GPU's ignores it) reads the row to be safe
    needed = (row_max > cut) | (row_max != row_max)
    score, mask = _load_scores(x_ptr, scale_ptr, pid, rows, cols, stride_r, stride_c, stride_s, needed,
                               X_KIND, HAS_SCALE, BLOCK_R, BLOCK_C)
    hits = ((score > cut) & mask).to(tl.int64)
    tl.atomic_add(count_ptr, tl.sum(hits))


def _as_2d(t: torch.Tensor) -> torch.Tensor:
    """The rows x last-dim view the kernels walk. A 1-D tensor is one row. ``reshape``
    only copies for a >2-D tensor whose leading dims cannot be merged into a view."""
    if t.dim() == 1:
        return t.view(1, -1)
    if t.dim() == 2:
        return t
    return t.reshape(-1, t.shape[-1])


def outlier_count_plan(
    tensors: Sequence[torch.Tensor],
    threshold: float,
    col_scales: Sequence[Optional[torch.Tensor]],
) -> tuple[list, torch.Tensor, torch.Tensor, int]:
    """Check the arguments and decide the launches: ``(launches, sum_buf, count_buf, numel)``.

    Works on ``meta`` tensors (the static GPU check compiles what this returns)."""
    if len(tensors) == 0 or len(tensors) != len(col_scales):
        raise ValueError("need one col_scales entry (or None) per tensor and at least one tensor")
    device = tensors[0].device
    views = []
    numel = 0
    for k, (t, s) in enumerate(zip(tensors, col_scales)):
        if t.device != device or (s is not None and s.device != device):
            raise ValueError(f"tensors[{k}] / col_scales[{k}] are not on {device}")
        if s is not None and (s.dim() != 1 or s.numel() != t.shape[-1]):
            raise ValueError(f"col_scales[{k}] must be 1-D over the last dim of tensors[{k}] ({t.shape[-1]})")
        dtype_kind(t)
        views.append((_as_2d(t), s))
        numel += t.numel()
    sum_buf = torch.zeros(1, dtype=torch.float32, device=device)
    count_buf = torch.zeros(1, dtype=torch.int64, device=device)
    grids = [triton.cdiv(x.shape[0], BLOCK_ROWS) * triton.cdiv(x.shape[1], BLOCK_COLS) for x, _ in views]
    # one fp32 row maximum per tile row: 1/512 of the entries (0.4 % of a bf16 tensor's bytes)
    rowmax = torch.empty(max(1, sum(grids) * BLOCK_ROWS), dtype=torch.float32, device=device)
    bases = [sum(grids[:i]) * BLOCK_ROWS for i in range(len(grids))]
    launches = []
    for pass_kernel in (_abs_sum_kernel, _count_kernel):
        for (x, s), programs, base in zip(views, grids, bases):
            rows, cols = x.shape
            grid = (programs,)
            if grid[0] == 0:
                continue
            constexprs = dict(X_KIND=dtype_kind(x), HAS_SCALE=s is not None, BLOCK_R=BLOCK_ROWS, BLOCK_C=BLOCK_COLS)
            args = dict(x_ptr=as_kernel_arg(x), scale_ptr=s if s is not None else sum_buf,  # dummy, never read
                        sum_ptr=sum_buf, rowmax_ptr=rowmax[base:])
            if pass_kernel is _count_kernel:
                args["count_ptr"] = count_buf
            args.update(rows=rows, cols=cols, stride_r=x.stride(0), stride_c=x.stride(1),
                        stride_s=s.stride(0) if s is not None else 0)
            if pass_kernel is _count_kernel:
                args.update(numel=float(numel), threshold=float(threshold))
            launches.append(Launch(pass_kernel, grid, args, constexprs, NUM_WARPS, 1))
    return launches, sum_buf, count_buf, numel


def outlier_count_launch(
    tensors: Sequence[torch.Tensor],
    threshold: float,
    col_scales: Sequence[Optional[torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch both passes; return ``(mean, count)`` as 0-dim device tensors (fp32, int64).

    No host synchronisation happens here; reading the results (``.item()``) is the
    caller's one sync.
    """
    launches, sum_buf, count_buf, numel = outlier_count_plan(tensors, threshold, col_scales)
    with device_ctx(tensors[0]):
        for launch in launches:
            launch.run()
    mean = sum_buf[0] / numel  # fp32, the same division as the reference's ``total / numel``
    return mean, count_buf[0]
