"""Back-project + update on the GPU: W <- beta W + alpha (P N), in place.

Formula and reference: ``owlore_kernels.ops.back_project_update.back_project_update_reference``.
side="left": P N with P m x r and N r x n; side="right": N Q with N m x r and Q r x n.
Both are ``W <- beta W + alpha (A @ B)`` with A m x r and B r x n, so one kernel
takes (A, B) = (P, N) or (N, Q).

Each program owns one BLOCK_M x BLOCK_N tile of W: it forms that tile of A @ B in
registers (K = r is short: 2-32 steps of tl.dot), then reads the W tile, updates it in
fp32 and stores it in W's dtype (bf16 rounded to nearest even with integer ops, see
``_common``). The m x n product never reaches memory, so W is read and written once.

Dot precision (``resolve_dot_precision``, per call, on W's dtype): bf16 / fp16 W -> A and
B rounded to W's type in registers, tensor-core dot, fp32 accumulation. That rounding
(2^-9 relative per operand for bf16) lands on alpha (P N), which is ~lr times smaller than
a typical |W|; W is then rounded to bf16 (2^-9 relative) anyway. The bound per element is
``ulp(W)/2 + |alpha| (2 u + r 2^-24) (|A| |B|)_ij``; only entries of W as small as the
update itself see the dot's rounding. galore-torch does the same product in bf16, with a
bf16 result. fp32 W follows ``torch.get_float32_matmul_precision()`` as in ``project_adam``.

Tiles (``config``; compiled figures for sm_90 / sm_80 from
``benchmarks/results/gpu_static_check.md``):
* bf16 / fp16 / tf32: 128 x 128 x 32, 8 warps, 3 stages: bf16 126 / 202 registers, no
  spills, 72 / 64 KB shared memory, 2 / 1 blocks per SM, HGMMA / HMMA. The A and B
  re-reads from L2 per tile, (128 + 128) r 4 bytes, are 2x the tile's W read + write at
  bf16 and r = 128 (64 x 128 tiles made it 3x); 4096 x 11008 gives 32 x 86 = 2752 programs.
* tf32x3: 64 x 128 x 32 (172 / 224 registers); ieee: 64 x 128 x 16, 2 stages, FFMA.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .._checks import check_back_project_update_args
from ._common import (Launch, as_kernel_arg, bf16_bits_to_fp32, device_ctx, dtype_kind, fp32_to_bf16_bits_rne,
                      interpreting, resolve_dot_precision, round_fp32_to_bf16_values, target_arch)

__all__ = ["back_project_update_launch", "back_project_update_plan", "config"]


def config(precision: str, rank: int, arch: int) -> dict:
    if precision in ("bf16", "fp16", "tf32"):
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3)
    if precision == "tf32x3":
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=16, num_warps=8, num_stages=2)  # ieee: FFMA


@triton.jit
def _back_project_update_kernel(
    w_ptr, a_ptr, b_ptr,
    M, N, K,
    stride_wm, stride_wn, stride_am, stride_ak, stride_bk, stride_bn,
    beta,  # runtime fp32: the decay factor on W
    alpha,  # runtime fp32: the step on A @ B
    W_KIND: tl.constexpr,  # fp32 / bf16 bits / fp16: changes the load and the rounding store
    DOT: tl.constexpr,  # "ieee" | "tf32x3" | "tf32" | "bf16" | "fp16"
    EMULATE_16BIT: tl.constexpr,  # interpreter: bf16 dot as an fp32 dot of bf16-rounded values
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
        if DOT == "bf16":
            if EMULATE_16BIT:
                acc = tl.dot(round_fp32_to_bf16_values(a), round_fp32_to_bf16_values(b), acc, input_precision="ieee")
            else:
                acc = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
        elif DOT == "fp16":
            acc = tl.dot(a.to(tl.float16), b.to(tl.float16), acc)
        else:
            acc = tl.dot(a, b, acc, input_precision=DOT)

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


def back_project_update_plan(param, proj, norm_update, side, beta, alpha, dot_precision: Optional[str] = None, *,
                             arch: Optional[int] = None, interpret: Optional[bool] = None) -> list:
    """Check the arguments and decide the launch without running it (works on ``meta`` tensors)."""
    # the op's checks, one definition; run again here because torch.ops.owlore.back_project_update_
    # and direct launcher calls reach this kernel without the Python entry's checks (memory safety)
    check_back_project_update_args(param, proj, norm_update, side)
    precision = resolve_dot_precision(param.dtype, dot_precision)
    m, n = param.shape
    a, b = (proj, norm_update) if side == "left" else (norm_update, proj)
    rank = a.shape[1]
    cfg = config(precision, rank, target_arch(param) if arch is None else arch)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    if grid[0] == 0:  # an empty weight: nothing to update (a 0-program launch is an error)
        return []
    interpret = interpreting() if interpret is None else interpret
    args = dict(w_ptr=as_kernel_arg(param), a_ptr=a, b_ptr=b, M=m, N=n, K=rank,
                stride_wm=param.stride(0), stride_wn=param.stride(1), stride_am=a.stride(0), stride_ak=a.stride(1),
                stride_bk=b.stride(0), stride_bn=b.stride(1), beta=beta, alpha=alpha)
    constexprs = dict(W_KIND=dtype_kind(param), DOT=precision, EMULATE_16BIT=bool(interpret),
                      BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"])
    return [Launch(_back_project_update_kernel, grid, args, constexprs, cfg["num_warps"], cfg["num_stages"])]


def back_project_update_launch(
    param: torch.Tensor,
    proj: torch.Tensor,
    norm_update: torch.Tensor,
    side: str,
    beta: float,
    alpha: float,
    dot_precision: Optional[str] = None,
) -> torch.Tensor:
    """Update ``param`` in place and return it. ``dot_precision=None`` decides per call."""
    launches = back_project_update_plan(param, proj, norm_update, side, beta, alpha, dot_precision)
    with device_ctx(param):
        for launch in launches:
            launch.run()
    return param
