"""Back-project + update on the GPU: W <- beta W + alpha (P N), in place.

Formula and reference: ``owlore_kernels.ops.back_project_update.back_project_update_reference``.
side="left": P N with P m x r and N r x n; side="right": N Q with N m x r and Q r x n.
Both are ``W <- beta W + alpha (A @ B)`` with A m x r and B r x n, so one kernel
takes (A, B) = (P, N) or (N, Q).

Each program owns one BLOCK_M x BLOCK_N tile of W: it forms that tile of A @ B in
registers (K = r is short: 2-8 steps of tl.dot), then reads the W tile, updates it in
fp32 and stores it in W's dtype, rounded to nearest even. The m x n product never
reaches memory, so W is read and written once. The W tile is loaded before the K loop,
so its DRAM latency overlaps the operand loads and the MMAs (W is the kernel's traffic:
at 4096 x 11008 bf16, 180 MB of W against 3.8 MB of P and N).

Main loop (triton tutorials 03 / 09): operands load in their storage dtype straight into
``tl.dot``; the M and N offsets wrap modulo M / N so only the K tail is masked, and nothing
is when r is a multiple of BLOCK_K; tiles go in grouped order (GROUP_M row tiles per column
sweep) so the A and B panels of the programs in flight stay in L2.

Dot precision (``resolve_dot_precision``, per call, on W's dtype): bf16 / fp16 W -> that
type's tensor-core dot with fp32 accumulation. P in W's 16-bit type (the optimizer's copy
on CUDA) reaches the MMA unconverted; N is fp32 (the output of ``project_adam``) and is
rounded to W's type in registers, r x BLOCK_N values per tile -- at r = 128 and 128 x 128
tiles as many conversions as the epilogue's own, not one per K-step per W element. That
rounding (2^-9 relative per operand for bf16) lands on alpha (P N), which is ~lr times
smaller than a typical |W|; W is then rounded to bf16 (2^-9 relative) anyway. The bound per
element is ``ulp(W)/2 + |alpha| (2 u + r 2^-24) (|A| |B|)_ij``. galore-torch does the same
product in bf16, with a bf16 result. fp32 W follows ``torch.get_float32_matmul_precision()``
as in ``project_adam``.

Tiles (``config``; one fixed config, the shapes are few): bf16 / fp16: 128 x 128 x 64 (x 32
with an fp32 P), tf32: 128 x 128 x 32, 8 warps, 3 stages; tf32x3: 64 x 128 x 32; ieee: 64 x 128 x 16, 2 stages, FFMA. 4096 x 11008
gives 32 x 86 = 2752 programs, ~21 per SM: no split and no persistent loop are needed to fill
the GPU.

``back_project_update_foreach_launch``: one launch per group of same-shape weights, the weight
from program_id(1) and its addresses, beta and alpha from an int64 pointer table. With
``torch.amp.GradScaler``'s ``found_inf`` (a one-element tensor on the GPU, loaded by every
program: no host sync) the W tile's load and store are masked with found_inf == 0, so an
overflowed step writes nothing; a constexpr flag says whether it is given (part of the plan
cache's key), and an absent one gets a stand-in pointer that is never read.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import (Launch, device_ctx, grouped_tile, interpreting, mma, resolve_dot_precision, run_foreach,
                      span_elements, store_rounded, table_pointer, table_scalar, target_arch, unless_found_inf,
                      vector_width, wrapped_offsets)

__all__ = ["back_project_update_launch", "back_project_update_plan", "back_project_update_foreach_launch", "config"]

GROUP_M = 8  # row tiles per column sweep: 8 x 128 rows of A (r = 128, bf16: 256 KB) stay hot in L2
TABLE_COLUMNS = 5  # param, A, B addresses; beta, alpha


def config(precision: str, rank: int, arch: int, proj_16bit: bool = True) -> dict:
    if precision in ("bf16", "fp16"):
        # an fp32 P rounded in registers needs twice the registers per K-step: 64 spilled 16 bytes
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64 if proj_16bit else 32, num_warps=8, num_stages=3)
    if precision == "tf32":
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3)
    if precision == "tf32x3":
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=16, num_warps=8, num_stages=2)  # ieee: FFMA


@triton.jit
def _back_project_update_kernel(
    w_ptr, a_ptr, b_ptr, table_ptr,
    found_inf_ptr,  # GradScaler's overflow flag (one element), if given
    M, N, K,
    stride_wm, stride_wn, stride_am, stride_ak, stride_bk, stride_bn,
    beta,  # runtime fp32: the decay factor on W
    alpha,  # runtime fp32: the step on A @ B
    DOT: tl.constexpr,  # "ieee" | "tf32x3" | "tf32" | "bf16" | "fp16"
    EMULATE: tl.constexpr,  # interpreter: 16-bit dots and bf16 stores emulated (see _common)
    FOREACH: tl.constexpr,  # program_id(1) = weight; its pointers, beta and alpha come from table_ptr
    HAS_FOUND_INF: tl.constexpr,  # code path: W's load and store are masked with found_inf == 0
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no mask in the main loop
    WIDE: tl.constexpr,  # some tensor spans >= 2^31 elements: int64 offsets
    VEC_M: tl.constexpr, VEC_N: tl.constexpr,  # powers of two dividing M / N: contiguity hints
    GROUP: tl.constexpr,  # grouped tile order (L2 reuse of the A panels)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,  # tile shape
):
    if FOREACH:
        row = table_ptr + tl.program_id(1) * 5  # TABLE_COLUMNS
        w_ptr = table_pointer(row, 0, w_ptr)
        a_ptr = table_pointer(row, 1, a_ptr)
        b_ptr = table_pointer(row, 2, b_ptr)
        beta = table_scalar(row, 3)
        alpha = table_scalar(row, 4)
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = wrapped_offsets(pid_m, M, BLOCK_M, VEC_M)
    offs_n = wrapped_offsets(pid_n, N, BLOCK_N, VEC_N)
    if WIDE:
        rows = rows.to(tl.int64)
        cols = cols.to(tl.int64)
        offs_m = offs_m.to(tl.int64)
        offs_n = offs_n.to(tl.int64)
    # the W tile first: its DRAM latency overlaps the K loop
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    if HAS_FOUND_INF:
        mask = unless_found_inf(mask, found_inf_ptr)
    w_ptrs = w_ptr + rows[:, None] * stride_wm + cols[None, :] * stride_wn
    w = tl.load(w_ptrs, mask=mask, other=0.0)

    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:  # zeros past r add nothing
            inside = offs_k < K - k0
            a = tl.load(a_ptrs, mask=inside[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=inside[:, None], other=0.0)
        acc = mma(a, b, acc, DOT, EMULATE)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    w = w.to(tl.float32) * beta + alpha * acc  # the reference's addmm_(beta=..., alpha=...) in fp32
    store_rounded(w_ptrs, w, mask, EMULATE)


def check_launch_args(param, proj, norm_update, side) -> None:
    """What the kernel needs for memory safety (the op's checks, which name every argument, run in
    its public function and fake): 2-D tensors of matching shapes, supported dtypes, one device."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    m, n = param.shape
    r = proj.shape[1] if side == "left" else proj.shape[0]
    want_proj, want_low = ((m, r), (r, n)) if side == "left" else ((r, n), (m, r))
    if tuple(proj.shape) != want_proj or tuple(norm_update.shape) != want_low:
        raise ValueError(f"back_project_update: param {tuple(param.shape)} side={side!r} needs proj {want_proj} "
                         f"and norm_update {want_low}; got {tuple(proj.shape)} and {tuple(norm_update.shape)}")
    if param.dtype not in (torch.float32, torch.bfloat16, torch.float16) \
            or proj.dtype not in (torch.float32, param.dtype) or norm_update.dtype not in (torch.float32, param.dtype):
        raise ValueError(f"back_project_update: param {param.dtype} with proj {proj.dtype} and norm_update "
                         f"{norm_update.dtype} is not supported")
    if len({t.device for t in (param, proj, norm_update)}) != 1:
        raise ValueError("back_project_update: all tensors must be on one device")


def back_project_update_plan(param, proj, norm_update, side, beta, alpha, dot_precision: Optional[str] = None, *,
                             arch: Optional[int] = None, interpret: Optional[bool] = None, weights: int = 1,
                             table: Optional[torch.Tensor] = None, tiles: Optional[dict] = None,
                             found_inf: Optional[torch.Tensor] = None) -> list:
    """Check the arguments and decide the launch without running it (works on ``meta`` tensors).
    ``weights`` and ``table``: one launch for that many same-shaped weights (see ``project_adam_plan``);
    ``found_inf``: GradScaler's one-element overflow flag (module docstring), or None."""
    check_launch_args(param, proj, norm_update, side)
    precision = resolve_dot_precision(param.dtype, dot_precision)
    m, n = param.shape
    a, b = (proj, norm_update) if side == "left" else (norm_update, proj)
    rank = a.shape[1]
    cfg = {**config(precision, rank, target_arch(param) if arch is None else arch, proj.dtype != torch.float32),
           **(tiles or {})}  # tiles: overrides for tile sweeps on a GPU (gpu_check.py --sweep)
    tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
    if tiles == 0 or weights == 0:  # an empty weight: nothing to update (a 0-program launch is an error)
        return []
    interpret = interpreting() if interpret is None else interpret
    args = dict(w_ptr=param, a_ptr=a, b_ptr=b, table_ptr=table if table is not None else param,
                found_inf_ptr=found_inf if found_inf is not None else param,  # absent: never read
                M=m, N=n, K=rank,
                stride_wm=param.stride(0), stride_wn=param.stride(1), stride_am=a.stride(0), stride_ak=a.stride(1),
                stride_bk=b.stride(0), stride_bn=b.stride(1), beta=beta, alpha=alpha)
    constexprs = dict(DOT=precision, EMULATE=bool(interpret), FOREACH=table is not None,
                      HAS_FOUND_INF=found_inf is not None, EVEN_K=rank % cfg["BLOCK_K"] == 0,
                      WIDE=max(span_elements(t) for t in (param, a, b)) >= 2 ** 31,
                      VEC_M=vector_width(m), VEC_N=vector_width(n), GROUP=GROUP_M,
                      BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"])
    grid = (tiles, weights) if table is not None else (tiles,)
    return [Launch(_back_project_update_kernel, grid, args, constexprs, cfg["num_warps"], cfg["num_stages"])]


def back_project_update_launch(
    param: torch.Tensor,
    proj: torch.Tensor,
    norm_update: torch.Tensor,
    side: str,
    beta: float,
    alpha: float,
    dot_precision: Optional[str] = None,
    tiles: Optional[dict] = None,
) -> torch.Tensor:
    """Update ``param`` in place and return it. ``dot_precision=None`` decides per call; ``tiles``
    overrides ``config`` entries (tile sweeps on a GPU, not normal use)."""
    launches = back_project_update_plan(param, proj, norm_update, side, beta, alpha, dot_precision, tiles=tiles)
    with device_ctx(param):
        for launch in launches:
            launch.run()
    return param


# run_foreach's cache: (signatures, (side, precision, has found_inf), stream, interpret)
# -> [(indices of a group, its plan)]
_FOREACH_PLANS: dict = {}


def back_project_update_foreach_launch(params, projs, norm_updates, side: str, coefficients,
                                       dot_precision: Optional[str] = None, *,
                                       found_inf: Optional[torch.Tensor] = None) -> None:
    """``back_project_update_launch`` for every weight i, one launch per group of weights with
    equal shapes, strides and dtypes; ``coefficients`` is a (len, 2) sequence or float64 CPU
    tensor, row i = (beta_i, alpha_i); ``found_inf``: None or GradScaler's one-element overflow
    flag on the params' device. Plans are cached by the lists' signatures and the flag."""
    if len(params) == 0:
        return
    rows = coefficients.tolist() if isinstance(coefficients, torch.Tensor) else list(coefficients)
    precision = resolve_dot_precision(params[0].dtype, dot_precision)

    def make_plan(first, count, table):
        w, a, b = first
        p, n = (a, b) if side == "left" else (b, a)
        return back_project_update_plan(w, p, n, side, 1.0, 0.0, precision, weights=count, table=table,
                                        found_inf=found_inf)

    # table columns in the kernel's order: W, A, B (A, B = P, N on the left; N, Q on the right)
    tensors = [(w, p, n) if side == "left" else (w, n, p) for w, p, n in zip(params, projs, norm_updates)]
    run_foreach(_FOREACH_PLANS, tensors, [row[:2] for row in rows], (side, precision, found_inf is not None),
                make_plan, TABLE_COLUMNS, ("w_ptr", "a_ptr", "b_ptr"),
                {} if found_inf is None else dict(found_inf_ptr=found_inf))
