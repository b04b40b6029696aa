"""Back-project + update on the GPU: W <- beta W + alpha (P N), in place.

Formula and reference: ``owlore_kernels.ops.back_project_update.back_project_update_reference``.
side="left": P N with P m x r and N r x n; side="right": N Q with N m x r and Q r x n.
Both are ``W += alpha * (A @ B) + (beta - 1) W`` with A m x r and B r x n, so one kernel
takes (A, B) = (P, N) or (N, Q).

Each program owns one BLOCK_M x BLOCK_N tile of W: it forms that tile of A @ B in
registers (K = r is short: 4-16 steps of tl.dot), then reads the W tile, updates it in
fp32 and stores it in W's dtype (bf16 rounded to nearest even with integer ops, see
``_common``). The m x n product never reaches memory, so W is read and written once.

Fixed config (one, explained; no autotune):
* 64 x 128 tiles: 2-D tiles, so the grid is (m/64) x (n/128) = 64 x 86 = 5504
  programs at 4096 x 11008 and 2048 at 4096 x 4096 -- many waves on 132 SMs. A
  one-pass design over whole rows would have only 64 row-blocks at 4096 rows.
  A and B (2-6 MB at r = 128) stay in the 50 MB L2, so re-reading them per tile costs
  L2 bandwidth, not DRAM bandwidth.
* BLOCK_K = 32: per stage 64x32 + 32x128 fp32 = 24 KB of shared memory.
* 4 warps: the 64 x 128 fp32 accumulator is 64 registers per thread.
* ``dot_precision``: as in ``project_adam`` ("ieee" by default for fp32 parity; the
  2 m n r FLOPs then run on FMA units, ~0.17 ms at 4096 x 11008, r = 128).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import project_adam as _pa
from ._common import as_kernel_arg, bf16_bits_to_fp32, device_ctx, dtype_kind, fp32_to_bf16_bits_rne

BLOCK_M = 64
BLOCK_N = 128
BLOCK_K = 32
NUM_WARPS = 4
NUM_STAGES = 3


@triton.jit
def _back_project_update_kernel(
    w_ptr, a_ptr, b_ptr,
    M, N, K,
    stride_wm, stride_wn, stride_am, stride_ak, stride_bk, stride_bn,
    beta,  # runtime fp32: the decay factor on W (1 - lr * weight_decay)
    alpha,  # runtime fp32: the step on P N (minus step size times GaLore's scale)
    W_KIND: tl.constexpr,  # fp32 / bf16 bits / fp16: changes the load and the rounding store
    DOT_PRECISION: tl.constexpr,  # "ieee" | "tf32x3" | "tf32": different MMA instructions
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,  # tile shape
):
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_k = offs_k < K
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    mask = mask_m[:, None] & mask_n[None, :]
    w_ptrs = w_ptr + offs_m[:, None] * stride_wm + offs_n[None, :] * stride_wn
    if W_KIND == 1:
        w = bf16_bits_to_fp32(tl.load(w_ptrs, mask=mask, other=0))
    else:
        w = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)
    w = w * beta + alpha * acc  # the reference's addmm_(beta=..., alpha=...) in fp32
    if W_KIND == 1:
        tl.store(w_ptrs, fp32_to_bf16_bits_rne(w), mask=mask)
    elif W_KIND == 2:
        tl.store(w_ptrs, w.to(tl.float16), mask=mask)  # cvt.rn on GPU, numpy RNE in the interpreter
    else:
        tl.store(w_ptrs, w, mask=mask)


def back_project_update_launch(
    param: torch.Tensor,
    proj: torch.Tensor,
    norm_update: torch.Tensor,
    side: str,
    beta: float,
    alpha: float,
    dot_precision: Optional[str] = None,
) -> torch.Tensor:
    """Update ``param`` in place and return it."""
    precision = dot_precision or _pa.DOT_PRECISION
    if precision not in _pa.DOT_PRECISIONS:
        raise ValueError(f"dot_precision must be one of {_pa.DOT_PRECISIONS}, got {precision!r}")
    if param.dim() != 2 or proj.dim() != 2 or norm_update.dim() != 2:
        raise ValueError("param, proj and norm_update must be 2-D")
    for name, t in (("proj", proj), ("norm_update", norm_update)):
        if t.dtype != torch.float32:
            raise ValueError(f"{name} must be float32, got {t.dtype}")
        if t.device != param.device:
            raise ValueError("all tensors must be on one device")
    m, n = param.shape
    if side == "left":
        a, b = proj, norm_update
    elif side == "right":
        a, b = norm_update, proj
    else:
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    rank = a.shape[1]
    if a.shape[0] != m or tuple(b.shape) != (rank, n):
        raise ValueError(f"side={side!r}: need ({m}, r) @ (r, {n}), got {tuple(a.shape)} @ {tuple(b.shape)}")
    grid = (triton.cdiv(m, BLOCK_M) * triton.cdiv(n, BLOCK_N),)
    if grid[0] == 0:  # an empty weight: nothing to update (a 0-program launch is an error)
        return param
    with device_ctx(param):
        _back_project_update_kernel[grid](
            as_kernel_arg(param), a, b,
            m, n, rank,
            param.stride(0), param.stride(1), a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            beta, alpha,
            W_KIND=dtype_kind(param), DOT_PRECISION=precision,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
            num_warps=NUM_WARPS, num_stages=NUM_STAGES,
        )
    return param
