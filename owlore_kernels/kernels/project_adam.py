"""Project + Adam on the GPU: one tiled GEMM whose epilogue is the Adam update.

Formula and reference: ``owlore_kernels.ops.project_adam.project_adam_reference``::

    R = P^T G (side="left", P m x r, R r x n)   or   R = G Q^T (side="right", Q r x n, R m x r)
    m <- b1 m + (1 - b1) R;   v <- b2 v + (1 - b2) R^2;   N = (m / bc1) / (sqrt(v / bc2) + eps)

R lives only in registers (or, with split-K, as fp32 partial tiles in a workspace that the
last split of each tile sums in a fixed order, so results are deterministic). G is read
from DRAM once, m and v read and written once, N written once.

One kernel serves both sides. Both are written as ``R'[a, l] = sum_k A[k, a] B[k, l]``
over strided views:

* left:  A = P (k = row of G),      B = G,        R' = R;
* right: A = Q^T (stride-swapped),  B = G^T,      R' = R^T (stride-swapped moments).

Dot precision (``resolve_dot_precision`` in ``_common``, decided at every call): bf16 / fp16
G -> that type's tensor-core dot, P rounded to G's type in registers (as galore-torch's
cuBLAS path does with its bf16 P), fp32 accumulation, R kept in fp32; fp32 G -> follows
``torch.get_float32_matmul_precision()`` ("highest" = "ieee" FFMA, "high" = "tf32x3",
"medium" = "tf32"). Error of R against fp64, max |dR| / max |R| at K = 4096, r = 128,
Gaussian G, orthonormal P (emulated in torch: ``benchmarks/gpu_static_check.py
--precision-table``): ieee 3.3e-7, tf32x3 4.9e-7, tf32 7.5e-4 (operands truncated to 10
bits, the worst case), bf16 1.7e-3 (galore-torch's bf16 path: 3.6e-3, as it also rounds R
to bf16), fp16 2.2e-4. Worst case per element: ``(u_P + u_G + K 2^-24) (|P|^T |G|)_ij``.

Under the interpreter a bf16 dot is emulated: the operands are rounded to bf16 values (round
to nearest even; the interpreter's own cast truncates) and multiplied in fp32, exact for such
products, so the result equals the tensor-core result up to summation order. fp16 runs as
numpy fp16 operands with fp32 accumulation. "tf32"/"tf32x3" run as exact fp32 there (the
interpreter ignores ``input_precision``); only the static check sees their instructions.

Tiles (``config``; one fixed config per case; figures compiled by ptxas for sm_90 / sm_80,
from ``benchmarks/results/gpu_static_check.md``):
* ``BLOCK_A = min(next_pow2(r), 128)``: all of r in one tile up to r = 128, so each G
  element is read from DRAM once; r = 256 / 512 take 2 / 4 r-tiles that run side by side
  (the r-tile index varies fastest), so the re-read of a G panel hits L2.
* bf16 / fp16: 128 x 128 x 64, 8 warps, 3 stages: 180-238 / 212-242 registers, no spills,
  112 / 96 KB shared memory, 1 block per SM, HGMMA 64x128x16 / HMMA. P is re-read from L2
  once per 128 columns of R: r * 4 / (128 * 2) = 2x the G bytes at r = 128 (32-wide tiles
  made it 8x). A whole 128 x 128 Adam epilogue spilled (255 registers + 150-440 bytes of
  stack), so the epilogue runs on two 128 x 64 halves. r = 64: 64 x 128 x 64, 98-168 regs.
* tf32 / tf32x3: 128 x 64 x 32 (fp32 G: P traffic 1x the G bytes at r = 128), 132-207 regs;
  128-wide tf32 tiles spilled. ieee: 128 x 64 x 16, 2 stages, FFMA, 132-254 regs.
* split-K: when the tiles are fewer than the SMs (4096 x 4096 at r = 128: 32 tiles), K is
  split into ceil(#SMs / tiles) chunks of at least 512 rows; each split stores an fp32
  partial tile, and the last to arrive (an int32 counter per tile, cached per stream and
  reset by that last split) sums them in split order and runs Adam: deterministic. Cost:
  splits x r x L x 4 bytes written and read back (L2-resident in practice; counted as HBM
  in the static roofline).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .._checks import check_project_adam_args
from ._common import (DOT_PRECISIONS, Launch, as_kernel_arg, bf16_bits_to_fp32, device_ctx, dtype_kind,
                      interpreting, resolve_dot_precision, round_fp32_to_bf16_values, sm_count, target_arch)

__all__ = ["project_adam_launch", "project_adam_plan", "config", "DOT_PRECISIONS"]

MIN_SPLIT_DEPTH = 512  # a split below 512 rows of K spends more on its prologue/epilogue than it saves


def config(precision: str, rank: int, arch: int) -> dict:
    """(BLOCK_A, BLOCK_L, BLOCK_K, num_warps, num_stages) for one call, as a dict."""
    block_a = min(128, max(16, triton.next_power_of_2(rank)))
    if precision in ("bf16", "fp16"):
        return dict(BLOCK_A=block_a, BLOCK_L=128, BLOCK_K=64, num_warps=8, num_stages=3)
    if precision in ("tf32", "tf32x3"):
        return dict(BLOCK_A=block_a, BLOCK_L=64, BLOCK_K=32, num_warps=8, num_stages=3)
    return dict(BLOCK_A=block_a, BLOCK_L=64, BLOCK_K=16, num_warps=8, num_stages=2)  # ieee: FFMA


@triton.jit
def _project_adam_kernel(
    a_ptr, g_ptr, m_ptr, v_ptr, n_ptr, ws_ptr, sem_ptr,
    RANK, L, K,  # R' is RANK x L; K is the contracted dimension
    k_per_split,  # rows of K per split (a multiple of BLOCK_K)
    stride_ak, stride_aa,  # A[k, a]
    stride_gk, stride_gl,  # B = G or G^T, [k, l]
    stride_ma, stride_ml, stride_va, stride_vl, stride_na, stride_nl,  # moments and N, [a, l]
    beta1, one_minus_beta1, beta2, one_minus_beta2, eps, bias1, bias2,  # runtime fp32: no recompiles per step
    G_KIND: tl.constexpr,  # fp32 / bf16 bits / fp16: changes the G load
    DOT: tl.constexpr,  # "ieee" | "tf32x3" | "tf32" | "bf16" | "fp16"
    EMULATE_16BIT: tl.constexpr,  # interpreter: 16-bit dot as fp32 dot of rounded values
    SPLIT_K: tl.constexpr,  # more than one split: partial tiles through ws, last split does Adam
    TWO_HALVES: tl.constexpr,  # epilogue over two BLOCK_L / 2 halves (keeps 128 x 128 tiles from spilling)
    BLOCK_A: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr,  # tile shape
):
    pid = tl.program_id(0)
    num_a = tl.cdiv(RANK, BLOCK_A)
    num_l = tl.cdiv(L, BLOCK_L)
    pid_a = pid % num_a  # fastest: r-tiles sharing a G panel run side by side (L2 reuse)
    tile = pid % (num_a * num_l)
    split = pid // (num_a * num_l)
    pid_l = tile // num_a
    offs_a = pid_a.to(tl.int64) * BLOCK_A + tl.arange(0, BLOCK_A)
    offs_l = pid_l.to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)
    mask_a = offs_a < RANK
    mask_l = offs_l < L
    k_begin = split * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)

    acc = tl.zeros((BLOCK_A, BLOCK_L), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_k = offs_k < k_end
        # A^T tile (BLOCK_A x BLOCK_K); zeros past the edges add nothing to the sum
        a = tl.load(a_ptr + offs_a[:, None] * stride_aa + offs_k[None, :] * stride_ak,
                    mask=mask_a[:, None] & mask_k[None, :], other=0.0)
        g_ptrs = g_ptr + offs_k[:, None] * stride_gk + offs_l[None, :] * stride_gl
        g_mask = mask_k[:, None] & mask_l[None, :]
        if DOT == "bf16":
            if G_KIND == 1:
                g_bits = tl.load(g_ptrs, mask=g_mask, other=0)
                if EMULATE_16BIT:
                    g = bf16_bits_to_fp32(g_bits)
                else:
                    g = g_bits.to(tl.bfloat16, bitcast=True)  # no conversion: straight to the MMA
            else:
                g = tl.load(g_ptrs, mask=g_mask, other=0.0).to(tl.float32)
                if EMULATE_16BIT:
                    g = round_fp32_to_bf16_values(g)
                else:
                    g = g.to(tl.bfloat16)  # cvt.rn: round to nearest even
            if EMULATE_16BIT:
                acc = tl.dot(round_fp32_to_bf16_values(a), g, acc, input_precision="ieee")
            else:
                acc = tl.dot(a.to(tl.bfloat16), g, acc)
        elif DOT == "fp16":
            if G_KIND == 1:
                g = bf16_bits_to_fp32(tl.load(g_ptrs, mask=g_mask, other=0)).to(tl.float16)
            else:
                g = tl.load(g_ptrs, mask=g_mask, other=0.0).to(tl.float16)
            acc = tl.dot(a.to(tl.float16), g, acc)  # the interpreter multiplies fp16 exactly in fp32 too
        else:
            if G_KIND == 1:  # bf16 bits -> fp32 right after the load (exact)
                g = bf16_bits_to_fp32(tl.load(g_ptrs, mask=g_mask, other=0))
            else:
                g = tl.load(g_ptrs, mask=g_mask, other=0.0).to(tl.float32)
            acc = tl.dot(a, g, acc, input_precision=DOT)

    mask = mask_a[:, None] & mask_l[None, :]
    # int32 offsets from here on (the launcher checks splits * RANK * L < 2^31)
    offs_a = offs_a.to(tl.int32)
    offs_l = offs_l.to(tl.int32)
    HALF: tl.constexpr = BLOCK_L // 2
    if SPLIT_K:
        # Partial tile to the workspace [split, a, l]; the last split to arrive sums all of
        # them in split order, so the result does not depend on which split finishes last.
        # The barriers order every thread's stores before the counter's release, and the
        # acquire before every thread's loads (the semaphore pattern CUTLASS uses); .cg
        # loads read L2, never a stale L1 line.
        n_split = tl.num_programs(0) // (num_a * num_l)
        tl.store(ws_ptr + split.to(tl.int64) * RANK * L + offs_a[:, None] * L + offs_l[None, :], acc, mask=mask)
        tl.debug_barrier()
        arrived = tl.atomic_add(sem_ptr + tile, 1, sem="acq_rel")
        tl.debug_barrier()
        if arrived == n_split - 1:
            if TWO_HALVES:  # half a tile at a time: a whole 128 x 128 tile's Adam state spills
                for h in tl.static_range(2):
                    offs_h = pid_l * BLOCK_L + h * HALF + tl.arange(0, HALF)
                    mask_h = mask_a[:, None] & (offs_h < L)[None, :]
                    total = _sum_partials(ws_ptr, offs_a, offs_h, mask_h, n_split, RANK, L, BLOCK_A, HALF)
                    _adam_epilogue(total, mask_h, offs_a, offs_h, m_ptr, v_ptr, n_ptr, stride_ma, stride_ml,
                                   stride_va, stride_vl, stride_na, stride_nl, beta1, one_minus_beta1, beta2,
                                   one_minus_beta2, eps, bias1, bias2)
            else:
                total = _sum_partials(ws_ptr, offs_a, offs_l, mask, n_split, RANK, L, BLOCK_A, BLOCK_L)
                _adam_epilogue(total, mask, offs_a, offs_l, m_ptr, v_ptr, n_ptr, stride_ma, stride_ml, stride_va,
                               stride_vl, stride_na, stride_nl, beta1, one_minus_beta1, beta2, one_minus_beta2,
                               eps, bias1, bias2)
            tl.atomic_xchg(sem_ptr + tile, 0)  # ready for the next call on this stream
    else:
        if TWO_HALVES:
            lo, hi = tl.split(tl.permute(tl.reshape(acc, (BLOCK_A, 2, HALF)), (0, 2, 1)))
            offs_lo = pid_l * BLOCK_L + tl.arange(0, HALF)
            offs_hi = offs_lo + HALF
            _adam_epilogue(lo, mask_a[:, None] & (offs_lo < L)[None, :], offs_a, offs_lo, m_ptr, v_ptr, n_ptr,
                           stride_ma, stride_ml, stride_va, stride_vl, stride_na, stride_nl, beta1, one_minus_beta1,
                           beta2, one_minus_beta2, eps, bias1, bias2)
            _adam_epilogue(hi, mask_a[:, None] & (offs_hi < L)[None, :], offs_a, offs_hi, m_ptr, v_ptr, n_ptr,
                           stride_ma, stride_ml, stride_va, stride_vl, stride_na, stride_nl, beta1, one_minus_beta1,
                           beta2, one_minus_beta2, eps, bias1, bias2)
        else:
            _adam_epilogue(acc, mask, offs_a, offs_l, m_ptr, v_ptr, n_ptr, stride_ma, stride_ml, stride_va,
                           stride_vl, stride_na, stride_nl, beta1, one_minus_beta1, beta2, one_minus_beta2,
                           eps, bias1, bias2)


@triton.jit
def _sum_partials(ws_ptr, offs_a, offs_l, mask, n_split, RANK, L, BLOCK_A: tl.constexpr, BLOCK_L: tl.constexpr):
    """Sum of the split-K partial tiles in split order (fixed order: deterministic)."""
    total = tl.zeros((BLOCK_A, BLOCK_L), dtype=tl.float32)
    ptrs = ws_ptr + offs_a[:, None] * L + offs_l[None, :]
    for s in range(0, n_split):
        total += tl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg")
        ptrs += RANK * L
    return total


@triton.jit
def _adam_epilogue(r, mask, offs_a, offs_l, m_ptr, v_ptr, n_ptr, stride_ma, stride_ml, stride_va, stride_vl,
                   stride_na, stride_nl, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, bias1, bias2):
    """Adam on one R tile, in the reference's order of operations."""
    m_ptrs = m_ptr + offs_a[:, None] * stride_ma + offs_l[None, :] * stride_ml
    v_ptrs = v_ptr + offs_a[:, None] * stride_va + offs_l[None, :] * stride_vl
    m = tl.load(m_ptrs, mask=mask, other=0.0)
    v = tl.load(v_ptrs, mask=mask, other=0.0)
    m = m * beta1 + one_minus_beta1 * r
    v = v * beta2 + one_minus_beta2 * r * r
    tl.store(m_ptrs, m, mask=mask)
    tl.store(v_ptrs, v, mask=mask)
    # div_rn / sqrt_rn: IEEE-rounded, like torch; the plain GPU versions are approximate
    denom = tl.sqrt_rn(tl.div_rn(v, bias2)) + eps
    update = tl.div_rn(tl.div_rn(m, bias1), denom)
    tl.store(n_ptr + offs_a[:, None] * stride_na + offs_l[None, :] * stride_nl, update, mask=mask)


_SEMAPHORES: dict = {}


def _semaphores(device: torch.device, count: int) -> torch.Tensor:
    """Zeroed int32 arrival counters, one per output tile, cached per device and stream: the
    last split of a tile resets its counter, so no memset launch is needed per call."""
    key = (str(device), torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0)
    buf = _SEMAPHORES.get(key)
    if buf is None or buf.numel() < count or buf.device != device:
        buf = torch.zeros(max(count, 1024), dtype=torch.int32, device=device)
        _SEMAPHORES[key] = buf
    return buf


def project_adam_plan(
    grad, proj, exp_avg, exp_avg_sq, out, side, beta1, beta2, eps, bias_correction1, bias_correction2,
    dot_precision: Optional[str] = None, *, arch: Optional[int] = None, num_sms: Optional[int] = None,
    interpret: Optional[bool] = None,
) -> list:
    """Check the arguments and decide the launch(es) without running them (works on ``meta``
    tensors: the static GPU check compiles exactly what this returns)."""
    # the op's checks, one definition; run again here because torch.ops.owlore.project_adam_ and
    # direct launcher calls reach this kernel without the Python entry's checks (memory safety)
    check_project_adam_args(grad, proj, exp_avg, exp_avg_sq, out, side, bias_correction1, bias_correction2)
    precision = resolve_dot_precision(grad.dtype, dot_precision)
    m, n = grad.shape
    if side == "left":  # R = P^T G: A = P [k=m, a=r], B = G [k=m, l=n]; R' = R [r, n]
        rank, length, depth = proj.shape[1], n, m
        a_strides = (proj.stride(0), proj.stride(1))
        g_strides = (grad.stride(0), grad.stride(1))
        swap = False
    else:  # R = G Q^T, R^T = Q G^T: A = Q^T [k=n, a=r], B = G^T [k=n, l=m]; R' = R^T
        rank, length, depth = proj.shape[0], m, n
        a_strides = (proj.stride(1), proj.stride(0))
        g_strides = (grad.stride(1), grad.stride(0))
        swap = True

    def strides(t):  # [a, l] strides of a subspace tensor
        return (t.stride(1), t.stride(0)) if swap else (t.stride(0), t.stride(1))

    arch = target_arch(grad) if arch is None else arch
    num_sms = sm_count(grad) if num_sms is None else num_sms
    interpret = interpreting() if interpret is None else interpret
    cfg = config(precision, rank, arch)
    block_a, block_l, block_k = cfg["BLOCK_A"], cfg["BLOCK_L"], cfg["BLOCK_K"]
    tiles = triton.cdiv(rank, block_a) * triton.cdiv(length, block_l)
    if tiles == 0:  # an empty subspace: nothing to update (a 0-program launch is an error)
        return []
    max_splits = max(1, depth // MIN_SPLIT_DEPTH)
    splits = min(max_splits, triton.cdiv(num_sms, tiles))
    k_per_split = triton.cdiv(triton.cdiv(max(depth, 1), splits), block_k) * block_k
    splits = triton.cdiv(max(depth, 1), k_per_split)  # no empty split
    for name, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("out", out)):
        span = sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
        if span >= 2 ** 31:  # the epilogue addresses the moments with int32 offsets (fewer registers)
            raise ValueError(f"{name} spans {span} elements; the Triton kernel needs < 2^31")
    if splits > 1:
        workspace = torch.empty((splits, rank, length), dtype=torch.float32, device=grad.device)
        sem = (_semaphores(grad.device, tiles) if grad.device.type != "meta"
               else torch.empty(tiles, dtype=torch.int32, device="meta"))
    else:
        workspace, sem = out, out  # never touched: SPLIT_K=False removes that code
    args = dict(
        a_ptr=proj, g_ptr=as_kernel_arg(grad), m_ptr=exp_avg, v_ptr=exp_avg_sq, n_ptr=out, ws_ptr=workspace,
        sem_ptr=sem, RANK=rank, L=length, K=depth, k_per_split=k_per_split,
        stride_ak=a_strides[0], stride_aa=a_strides[1], stride_gk=g_strides[0], stride_gl=g_strides[1],
        stride_ma=strides(exp_avg)[0], stride_ml=strides(exp_avg)[1],
        stride_va=strides(exp_avg_sq)[0], stride_vl=strides(exp_avg_sq)[1],
        stride_na=strides(out)[0], stride_nl=strides(out)[1],
        beta1=beta1, one_minus_beta1=1.0 - beta1, beta2=beta2, one_minus_beta2=1.0 - beta2, eps=eps,
        bias1=bias_correction1, bias2=bias_correction2,
    )
    constexprs = dict(G_KIND=dtype_kind(grad), DOT=precision, EMULATE_16BIT=bool(interpret), SPLIT_K=splits > 1,
                      TWO_HALVES=block_l >= 128,
                      BLOCK_A=block_a, BLOCK_L=block_l, BLOCK_K=block_k)
    return [Launch(_project_adam_kernel, (tiles * splits,), args, constexprs, cfg["num_warps"], cfg["num_stages"])]


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
    """Update ``exp_avg``/``exp_avg_sq`` in place and write N into ``out``; returns ``out``.

    ``dot_precision=None`` decides per call (see the module docstring); one of
    ``DOT_PRECISIONS`` forces it.
    """
    launches = project_adam_plan(grad, proj, exp_avg, exp_avg_sq, out, side, beta1, beta2, eps,
                                 bias_correction1, bias_correction2, dot_precision)
    with device_ctx(grad):
        for launch in launches:
            launch.run()
    return out
