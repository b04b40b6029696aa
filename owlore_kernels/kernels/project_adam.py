"""Project + Adam on the GPU: one tiled GEMM whose epilogue is the Adam update.

Formula and reference: ``owlore_kernels.ops.project_adam.project_adam_reference``::

    R = P^T G (side="left", P m x r, R r x n)   or   R = G Q^T (side="right", Q r x n, R m x r)
    m <- b1 m + (1 - b1) R;   v <- b2 v + (1 - b2) R^2;   N = (m / bc1) / (sqrt(v / bc2) + eps)

R lives only in registers: each program owns one tile of R, accumulates it over the
contracted dimension with ``tl.dot``, then reads that tile of m and v, writes them back
updated and writes N. G is read once (for r <= 128), m and v are read and written once,
N written once.

One kernel serves both sides. Both are written as ``R'[a, l] = sum_k A[k, a] B[k, l]``
over strided views:

* left:  A = P (k = row of G),      B = G,        R' = R;
* right: A = Q^T (stride-swapped),  B = G^T,      R' = R^T (stride-swapped moments).

Triton specialises unit strides, so the G tile loads stay coalesced along whichever
axis of G is contiguous.

Fixed config (one, explained; no autotune):
* ``BLOCK_A = clamp(next_pow2(r), 16, 128)``: all of r in one tile up to r = 128, so G is
  read from DRAM once; r = 256 / 512 take 2 / 4 tiles whose programs are adjacent in the
  launch order (the r-tile index varies fastest), so the second read of a G panel is an
  L2 hit. 16 is tl.dot's minimum.
* ``BLOCK_L = 32``: the long dimension of R (n for left, m for right). With r <= 128
  that gives 4096 / 32 = 128 programs at 4096 x 4096 (97 % of 132 SMs, one wave) and
  344 at 4096 x 11008; a 64-wide tile would leave half the SMs idle at 4096
  (the 64-block problem REFERENCE.md notes), and split-K would force R through memory.
* ``BLOCK_K = 64``: 64 steps of K at K = 4096; per stage 128x64 + 64x32 fp32 = 40 KB
  of shared memory, 3 stages = 120 KB (< 227 KB on H100/H200).
* 4 warps: the 128 x 32 fp32 accumulator is 32 registers per thread.

``dot_precision`` (a constexpr: it selects different instructions): "ieee" by default,
exact fp32 products so the GPU matches the fp32 reference to ~1e-6. It costs speed:
the GEMM runs on fp32 FMA units (~67 TFLOP/s on H200) instead of TF32 tensor cores
(~495 TFLOP/s dense), so at r = 128 the two kernels' 4 m n r FLOPs (23 GFLOP at
4096 x 11008) take ~0.35 ms against a ~0.07 ms memory floor. "tf32x3" keeps ~fp32
accuracy at about 3 TF32 passes; "tf32" is fastest (10-bit mantissa products, ~1e-3
relative error in R). Pick with ``OWLORE_TRITON_DOT_PRECISION`` or the launcher arg.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import as_kernel_arg, bf16_bits_to_fp32, device_ctx, dtype_kind

DOT_PRECISIONS = ("ieee", "tf32x3", "tf32")
DOT_PRECISION = os.environ.get("OWLORE_TRITON_DOT_PRECISION", "ieee")

BLOCK_L = 32
BLOCK_K = 64
NUM_WARPS = 4
NUM_STAGES = 3


def block_a_for_rank(rank: int) -> int:
    return min(128, max(16, triton.next_power_of_2(rank)))


@triton.jit
def _project_adam_kernel(
    a_ptr, g_ptr, m_ptr, v_ptr, n_ptr,
    RANK, L, K,  # R' is RANK x L; K is the contracted dimension
    stride_ak, stride_aa,  # A[k, a]
    stride_gk, stride_gl,  # B = G or G^T, [k, l]
    stride_ma, stride_ml, stride_va, stride_vl, stride_na, stride_nl,  # moments and N, [a, l]
    beta1, one_minus_beta1, beta2, one_minus_beta2, eps, bias1, bias2,  # runtime fp32: no recompiles per step
    G_KIND: tl.constexpr,  # fp32 / bf16 bits / fp16: changes the G load
    DOT_PRECISION: tl.constexpr,  # "ieee" | "tf32x3" | "tf32": different MMA instructions
    BLOCK_A: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr,  # tile shape
):
    pid = tl.program_id(0)
    num_a = tl.cdiv(RANK, BLOCK_A)
    pid_a = pid % num_a  # fastest: programs that share a G panel run side by side (L2 reuse)
    pid_l = pid // num_a
    offs_a = pid_a.to(tl.int64) * BLOCK_A + tl.arange(0, BLOCK_A)
    offs_l = pid_l.to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)
    mask_a = offs_a < RANK
    mask_l = offs_l < L

    acc = tl.zeros((BLOCK_A, BLOCK_L), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_k = offs_k < K
        # A^T tile (BLOCK_A x BLOCK_K); zeros past the edges add nothing to the sum
        a = tl.load(a_ptr + offs_a[:, None] * stride_aa + offs_k[None, :] * stride_ak,
                    mask=mask_a[:, None] & mask_k[None, :], other=0.0)
        g_ptrs = g_ptr + offs_k[:, None] * stride_gk + offs_l[None, :] * stride_gl
        g_mask = mask_k[:, None] & mask_l[None, :]
        if G_KIND == 1:  # bf16 bits -> fp32 right after the load
            g = bf16_bits_to_fp32(tl.load(g_ptrs, mask=g_mask, other=0))
        else:
            g = tl.load(g_ptrs, mask=g_mask, other=0.0).to(tl.float32)
        acc = tl.dot(a, g, acc, input_precision=DOT_PRECISION)

    # epilogue: Adam on the R tile, in the reference's order of operations
    mask = mask_a[:, None] & mask_l[None, :]
    m_ptrs = m_ptr + offs_a[:, None] * stride_ma + offs_l[None, :] * stride_ml
    v_ptrs = v_ptr + offs_a[:, None] * stride_va + offs_l[None, :] * stride_vl
    m = tl.load(m_ptrs, mask=mask, other=0.0)
    v = tl.load(v_ptrs, mask=mask, other=0.0)
    m = m * beta1 + one_minus_beta1 * acc
    v = v * beta2 + one_minus_beta2 * acc * acc
    tl.store(m_ptrs, m, mask=mask)
    tl.store(v_ptrs, v, mask=mask)
    # div_rn / sqrt_rn: IEEE-rounded, like torch; the plain GPU versions are approximate
    denom = tl.sqrt_rn(tl.div_rn(v, bias2)) + eps
    update = tl.div_rn(tl.div_rn(m, bias1), denom)
    tl.store(n_ptr + offs_a[:, None] * stride_na + offs_l[None, :] * stride_nl, update, mask=mask)


def project_adam_launch(
    grad: torch.Tensor,
    proj: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    out: torch.Tensor,
    side: str,
    beta1: float,
    beta2: float,
    eps: float,
    bias_correction1: float,
    bias_correction2: float,
    dot_precision: Optional[str] = None,
) -> torch.Tensor:
    """Update ``exp_avg``/``exp_avg_sq`` in place and write N into ``out``; returns ``out``."""
    precision = dot_precision or DOT_PRECISION
    if precision not in DOT_PRECISIONS:
        raise ValueError(f"dot_precision must be one of {DOT_PRECISIONS}, got {precision!r}")
    if grad.dim() != 2 or proj.dim() != 2:
        raise ValueError(f"grad and proj must be 2-D, got {tuple(grad.shape)} and {tuple(proj.shape)}")
    for name, t in (("proj", proj), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("out", out)):
        if t.dtype != torch.float32:
            raise ValueError(f"{name} must be float32, got {t.dtype}")
    m, n = grad.shape
    if side == "left":  # R = P^T G: A = P [k=m, a=r], B = G [k=m, l=n]; R' = R [r, n]
        rank = proj.shape[1]
        if proj.shape[0] != m:
            raise ValueError(f"left: proj must be ({m}, r), got {tuple(proj.shape)}")
        low_shape, length, depth = (rank, n), n, m
        a_strides = (proj.stride(0), proj.stride(1))
        g_strides = (grad.stride(0), grad.stride(1))
        swap = False
    elif side == "right":  # R = G Q^T, R^T = Q G^T: A = Q^T [k=n, a=r], B = G^T [k=n, l=m]; R' = R^T
        rank = proj.shape[0]
        if proj.shape[1] != n:
            raise ValueError(f"right: proj must be (r, {n}), got {tuple(proj.shape)}")
        low_shape, length, depth = (m, rank), m, n
        a_strides = (proj.stride(1), proj.stride(0))
        g_strides = (grad.stride(1), grad.stride(0))
        swap = True
    else:
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    for name, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("out", out)):
        if tuple(t.shape) != low_shape:
            raise ValueError(f"{name} must have shape {low_shape} for side={side!r}, got {tuple(t.shape)}")
        if t.device != grad.device or proj.device != grad.device:
            raise ValueError("all tensors must be on one device")

    def strides(t):  # [a, l] strides of a subspace tensor
        return (t.stride(1), t.stride(0)) if swap else (t.stride(0), t.stride(1))

    block_a = block_a_for_rank(rank)
    grid = (triton.cdiv(rank, block_a) * triton.cdiv(length, BLOCK_L),)
    if grid[0] == 0:  # an empty subspace: nothing to update (a 0-program launch is an error)
        return out
    with device_ctx(grad):
        _project_adam_kernel[grid](
            proj, as_kernel_arg(grad), exp_avg, exp_avg_sq, out,
            rank, length, depth,
            *a_strides, *g_strides, *strides(exp_avg), *strides(exp_avg_sq), *strides(out),
            beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, bias_correction1, bias_correction2,
            G_KIND=dtype_kind(grad), DOT_PRECISION=precision,
            BLOCK_A=block_a, BLOCK_L=BLOCK_L, BLOCK_K=BLOCK_K,
            num_warps=NUM_WARPS, num_stages=NUM_STAGES,
        )
    return out
