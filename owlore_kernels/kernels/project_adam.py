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

Main loop (as in triton's tutorials 03 and 09): both operands load in their storage dtype
and go straight into ``tl.dot`` -- with a bf16 / fp16 G and P in G's dtype (the optimizer
keeps such a copy of P on CUDA) there is no conversion in the loop; the A and L offsets
are wrapped modulo RANK / L, so loads need no mask but the K tail's, and none at all when
the K range is a multiple of BLOCK_K (4096 and 11008 both are). An fp32 P with a 16-bit G
is rounded to G's type in registers at every K-step (one cvt per P element per tile: at
r = 128, 128 x 64 per 64 x 128-wide K-step, half the work of the G tile's load).

Dot precision (``resolve_dot_precision`` in ``_common``, decided at every call): bf16 / fp16
G -> that type's tensor-core dot with fp32 accumulation, R kept in fp32; fp32 G -> follows
``torch.get_float32_matmul_precision()`` ("highest" = "ieee" FFMA, "high" = "tf32x3",
"medium" = "tf32"). Error of R against fp64, max |dR| / max |R| at K = 4096, r = 128,
Gaussian G, orthonormal P (emulated in torch: ``benchmarks/gpu_static_check.py
--precision-table``): ieee 3.3e-7, tf32x3 4.9e-7, tf32 7.5e-4, bf16 1.7e-3 (galore-torch's
bf16 path: 3.6e-3, as it also rounds R to bf16), fp16 2.2e-4. Worst case per element:
``(u_P + u_G + K 2^-24) (|P|^T |G|)_ij`` (u_P = 0 when P is stored in G's 16-bit type: the
math is then that of the rounded P).

Moments in fp32 or bf16 (the optimizer's ``state_dtype``): loaded, updated in fp32, stored
rounded to nearest even. Under the interpreter (``EMULATE``) a 16-bit dot multiplies the
operands' exact fp32 values, and bf16 stores round with integer operations first (its cast
truncates); see ``_common``.

Tiles (``config``; one fixed config per case, no autotuning: the shapes are few and known):
* ``BLOCK_A = min(next_pow2(r), 128)``: all of r in one tile up to r = 128, so each G element
  is read from DRAM once; r = 256 / 512 take 2 / 4 r-tiles that run side by side (the r-tile
  index varies fastest), so the re-read of a G panel hits L2.
* bf16 / fp16: BLOCK_K = 64; BLOCK_L = 128 (8 warps, 3 stages, the Adam epilogue on two
  128 x 64 halves: a whole 128 x 128 one spilled) when that gives at least one tile per SM,
  else 64 (8 warps, 4 stages): 4096 x 11008 at r = 128 is 172 tiles of 128 x 64 on 132 SMs
  (86 of 128 x 128 would leave 46 SMs idle).
* tf32 / tf32x3: 128 x 64 x 32; ieee: 128 x 64 x 16, 2 stages, FFMA.
* split-K only where the tiles fill less than half the SMs: 4096 x 4096 at r = 128 has 64
  tiles of 128 x 64 for 132 SMs, so K splits in 2 (128 programs): the partial tiles cost
  2 x 128 x 4096 x 4 B = 4 MB written and read back (L2-resident), against 32 MB of G read
  by twice as many SMs. 4096 x 11008 (172 tiles) never splits. Each split stores an fp32
  partial tile; the last to arrive (an int32 counter per tile, cached per stream and reset
  by that last split) sums them in split order and runs Adam: deterministic.

``project_adam_foreach_launch`` runs a list of weights in one launch per group of same-shape,
same-dtype, same-stride weights: program_id(1) picks the weight, whose tensors' addresses and
bias corrections it reads from an int64 pointer table uploaded in one small copy per call.

``torch.amp.GradScaler`` (``grad_scale``, ``found_inf``: one-element tensors on the GPU, loaded
by the epilogue itself, no host sync): R is projected from the stored, scaled G and divided by
grad_scale in fp32 before the moments (r x n divisions, not m x n); the epilogue's stores are
masked with found_inf == 0, so an overflowed step writes no moment and no N (the GEMM and the
split-K workspace and counters still run: a skipped step is rare). Constexpr flags say whether
each is given (an absent one gets a stand-in pointer that is never read) and are part of the
foreach plan cache's key.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import (DOT_PRECISIONS, Launch, device_ctx, interpreting, mma, resolve_dot_precision, run_foreach,
                      sm_count, span_elements, store_rounded, stream_key, table_pointer, table_scalar, target_arch,
                      unless_found_inf, vector_width, wrapped_offsets)

__all__ = ["project_adam_launch", "project_adam_plan", "project_adam_foreach_launch", "config", "DOT_PRECISIONS"]

MIN_SPLIT_DEPTH = 1024  # a split below 1024 rows of K spends more on its prologue/epilogue than it saves
TABLE_COLUMNS = 7  # grad, proj, exp_avg, exp_avg_sq, out addresses; bias_correction1, bias_correction2


def config(precision: str, rank: int, length: int, num_sms: int) -> dict:
    """(BLOCK_A, BLOCK_L, BLOCK_K, num_warps, num_stages) for one weight shape, as a dict."""
    block_a = min(128, max(16, triton.next_power_of_2(rank)))
    if precision in ("bf16", "fp16"):
        if triton.cdiv(rank, block_a) * triton.cdiv(length, 128) >= num_sms:
            return dict(BLOCK_A=block_a, BLOCK_L=128, BLOCK_K=64, num_warps=8, num_stages=3)
        # 8 warps: with 4 the fp32 accumulator (64 registers a thread) and the Adam epilogue spilled
        return dict(BLOCK_A=block_a, BLOCK_L=64, BLOCK_K=64, num_warps=8, num_stages=4)
    if precision in ("tf32", "tf32x3"):
        return dict(BLOCK_A=block_a, BLOCK_L=64, BLOCK_K=32, num_warps=8, num_stages=3)
    return dict(BLOCK_A=block_a, BLOCK_L=64, BLOCK_K=16, num_warps=8, num_stages=2)  # ieee: FFMA


@triton.jit
def _project_adam_kernel(
    a_ptr, g_ptr, m_ptr, v_ptr, n_ptr, ws_ptr, sem_ptr, table_ptr,
    grad_scale_ptr, found_inf_ptr,  # GradScaler's scale and overflow flag (one element each), if given
    RANK, L, K,  # R' is RANK x L; K is the contracted dimension
    k_per_split,  # rows of K per split (a multiple of BLOCK_K)
    stride_ak, stride_aa,  # A[k, a]
    stride_gk, stride_gl,  # B = G or G^T, [k, l]
    stride_ma, stride_ml, stride_va, stride_vl, stride_na, stride_nl,  # moments and N, [a, l]
    beta1, one_minus_beta1, beta2, one_minus_beta2, eps, bias1, bias2,  # runtime fp32: no recompiles per step
    DOT: tl.constexpr,  # "ieee" | "tf32x3" | "tf32" | "bf16" | "fp16"
    EMULATE: tl.constexpr,  # interpreter: 16-bit dots and bf16 stores emulated (see _common)
    FOREACH: tl.constexpr,  # program_id(1) = weight; its pointers and bias corrections come from table_ptr
    HAS_GRAD_SCALE: tl.constexpr,  # code path: the epilogue divides R by grad_scale (absent: no division)
    HAS_FOUND_INF: tl.constexpr,  # code path: the epilogue's stores are masked with found_inf == 0
    SPLIT_K: tl.constexpr,  # more than one split: partial tiles through ws, last split does Adam
    EVEN_K: tl.constexpr,  # every split's K range is a multiple of BLOCK_K: no mask at all in the main loop
    WIDE: tl.constexpr,  # some tensor spans >= 2^31 elements: int64 offsets
    TWO_HALVES: tl.constexpr,  # epilogue over two BLOCK_L / 2 halves (keeps 128 x 128 tiles from spilling)
    VEC_A: tl.constexpr, VEC_L: tl.constexpr,  # powers of two dividing RANK / L: contiguity hints
    BLOCK_A: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr,  # tile shape
):
    if FOREACH:
        row = table_ptr + tl.program_id(1) * 7  # TABLE_COLUMNS
        g_ptr = table_pointer(row, 0, g_ptr)
        a_ptr = table_pointer(row, 1, a_ptr)
        m_ptr = table_pointer(row, 2, m_ptr)
        v_ptr = table_pointer(row, 3, v_ptr)
        n_ptr = table_pointer(row, 4, n_ptr)
        bias1 = table_scalar(row, 5)
        bias2 = table_scalar(row, 6)
    pid = tl.program_id(0)
    num_a = tl.cdiv(RANK, BLOCK_A)
    num_l = tl.cdiv(L, BLOCK_L)
    tile = pid % (num_a * num_l)
    split = pid // (num_a * num_l)
    pid_a = tile % num_a  # fastest: r-tiles sharing a G panel run side by side (L2 reuse)
    pid_l = tile // num_a
    offs_a = wrapped_offsets(pid_a, RANK, BLOCK_A, VEC_A)
    offs_l = wrapped_offsets(pid_l, L, BLOCK_L, VEC_L)
    offs_k = tl.arange(0, BLOCK_K)
    k_begin = split * k_per_split
    k_len = tl.minimum(k_per_split, K - k_begin)
    if WIDE:
        offs_a = offs_a.to(tl.int64)
        offs_l = offs_l.to(tl.int64)
        k_begin = k_begin.to(tl.int64)
    # A^T tile (BLOCK_A x BLOCK_K) and B tile (BLOCK_K x BLOCK_L), advanced by BLOCK_K rows of K per step
    a_ptrs = a_ptr + offs_a[:, None] * stride_aa + (k_begin + offs_k)[None, :] * stride_ak
    g_ptrs = g_ptr + (k_begin + offs_k)[:, None] * stride_gk + offs_l[None, :] * stride_gl
    acc = tl.zeros((BLOCK_A, BLOCK_L), dtype=tl.float32)
    for k0 in range(0, k_len, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            g = tl.load(g_ptrs)
        else:  # zeros past the K tail add nothing to the sum
            inside = offs_k < k_len - k0
            a = tl.load(a_ptrs, mask=inside[None, :], other=0.0)
            g = tl.load(g_ptrs, mask=inside[:, None], other=0.0)
        acc = mma(a, g, acc, DOT, EMULATE)
        a_ptrs += BLOCK_K * stride_ak
        g_ptrs += BLOCK_K * stride_gk

    # unwrapped offsets for the epilogue's masks; int32 (the launcher checks the spans, or WIDE)
    rows = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    cols = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    if WIDE:
        rows = rows.to(tl.int64)
        cols = cols.to(tl.int64)
    mask = (rows < RANK)[:, None] & (cols < L)[None, :]
    HALF: tl.constexpr = BLOCK_L // 2
    if SPLIT_K:
        # Partial tile to the workspace [weight, split, a, l]; the last split to arrive sums all
        # of them in split order, so the result does not depend on which split finishes last.
        # The barriers order every thread's stores before the counter's release, and the
        # acquire before every thread's loads (the semaphore pattern CUTLASS uses); .cg
        # loads read L2, never a stale L1 line.
        n_split = tl.num_programs(0) // (num_a * num_l)
        weight = tl.program_id(1) if FOREACH else 0
        ws_ptr += weight.to(tl.int64) * n_split * RANK * L
        sem_ptr += weight * num_a * num_l
        tl.store(ws_ptr + split.to(tl.int64) * RANK * L + rows[:, None] * L + cols[None, :], acc, mask=mask)
        tl.debug_barrier()
        arrived = tl.atomic_add(sem_ptr + tile, 1, sem="acq_rel")
        tl.debug_barrier()
        if arrived == n_split - 1:
            if TWO_HALVES:  # half a tile at a time: a whole 128 x 128 tile's Adam state spills
                for h in tl.static_range(2):
                    cols_h = pid_l * BLOCK_L + h * HALF + tl.arange(0, HALF)
                    mask_h = (rows < RANK)[:, None] & (cols_h < L)[None, :]
                    total = _sum_partials(ws_ptr, rows, cols_h, mask_h, n_split, RANK, L, BLOCK_A, HALF)
                    _adam_epilogue(total, mask_h, rows, cols_h, m_ptr, v_ptr, n_ptr, stride_ma, stride_ml,
                                   stride_va, stride_vl, stride_na, stride_nl, beta1, one_minus_beta1, beta2,
                                   one_minus_beta2, eps, bias1, bias2, grad_scale_ptr, found_inf_ptr, EMULATE,
                                   HAS_GRAD_SCALE, HAS_FOUND_INF)
            else:
                total = _sum_partials(ws_ptr, rows, cols, mask, n_split, RANK, L, BLOCK_A, BLOCK_L)
                _adam_epilogue(total, mask, rows, cols, m_ptr, v_ptr, n_ptr, stride_ma, stride_ml, stride_va,
                               stride_vl, stride_na, stride_nl, beta1, one_minus_beta1, beta2, one_minus_beta2,
                               eps, bias1, bias2, grad_scale_ptr, found_inf_ptr, EMULATE, HAS_GRAD_SCALE,
                               HAS_FOUND_INF)
            tl.atomic_xchg(sem_ptr + tile, 0)  # ready for the next call on this stream
    else:
        if TWO_HALVES:
            lo, hi = tl.split(tl.permute(tl.reshape(acc, (BLOCK_A, 2, HALF)), (0, 2, 1)))
            cols_lo = pid_l * BLOCK_L + tl.arange(0, HALF)
            cols_hi = cols_lo + HALF
            _adam_epilogue(lo, (rows < RANK)[:, None] & (cols_lo < L)[None, :], rows, cols_lo, m_ptr, v_ptr, n_ptr,
                           stride_ma, stride_ml, stride_va, stride_vl, stride_na, stride_nl, beta1, one_minus_beta1,
                           beta2, one_minus_beta2, eps, bias1, bias2, grad_scale_ptr, found_inf_ptr, EMULATE,
                           HAS_GRAD_SCALE, HAS_FOUND_INF)
            _adam_epilogue(hi, (rows < RANK)[:, None] & (cols_hi < L)[None, :], rows, cols_hi, m_ptr, v_ptr, n_ptr,
                           stride_ma, stride_ml, stride_va, stride_vl, stride_na, stride_nl, beta1, one_minus_beta1,
                           beta2, one_minus_beta2, eps, bias1, bias2, grad_scale_ptr, found_inf_ptr, EMULATE,
                           HAS_GRAD_SCALE, HAS_FOUND_INF)
        else:
            _adam_epilogue(acc, mask, rows, cols, m_ptr, v_ptr, n_ptr, stride_ma, stride_ml, stride_va,
                           stride_vl, stride_na, stride_nl, beta1, one_minus_beta1, beta2, one_minus_beta2,
                           eps, bias1, bias2, grad_scale_ptr, found_inf_ptr, EMULATE, HAS_GRAD_SCALE,
                           HAS_FOUND_INF)


@triton.jit
def _sum_partials(ws_ptr, rows, cols, mask, n_split, RANK, L, BLOCK_A: tl.constexpr, BLOCK_L: tl.constexpr):
    """Sum of the split-K partial tiles in split order (fixed order: deterministic)."""
    total = tl.zeros((BLOCK_A, BLOCK_L), dtype=tl.float32)
    ptrs = ws_ptr + rows[:, None] * L + cols[None, :]
    for s in range(0, n_split):
        total += tl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg")
        ptrs += RANK * L
    return total


@triton.jit
def _adam_epilogue(r, mask, rows, cols, m_ptr, v_ptr, n_ptr, stride_ma, stride_ml, stride_va, stride_vl,
                   stride_na, stride_nl, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, bias1, bias2,
                   grad_scale_ptr, found_inf_ptr, EMULATE: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                   HAS_FOUND_INF: tl.constexpr):
    """Adam on one R tile, in the reference's order of operations; fp32 math whatever the
    moments' storage (fp32 or bf16, stored back rounded to nearest even). R is first divided by
    grad_scale if given; with found_inf given, nonzero masks off every load and store here."""
    if HAS_GRAD_SCALE:
        r = tl.div_rn(r, tl.load(grad_scale_ptr).to(tl.float32))  # IEEE-rounded, as torch's division
    if HAS_FOUND_INF:
        mask = unless_found_inf(mask, found_inf_ptr)
    m_ptrs = m_ptr + rows[:, None] * stride_ma + cols[None, :] * stride_ml
    v_ptrs = v_ptr + rows[:, None] * stride_va + cols[None, :] * stride_vl
    m = tl.load(m_ptrs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptrs, mask=mask, other=0.0).to(tl.float32)
    m = m * beta1 + one_minus_beta1 * r
    v = v * beta2 + one_minus_beta2 * r * r
    store_rounded(m_ptrs, m, mask, EMULATE)
    store_rounded(v_ptrs, v, mask, EMULATE)
    # N from the fp32 values (the reference computes it before any rounding of the moments' storage);
    # div_rn / sqrt_rn: IEEE-rounded, like torch; the plain GPU versions are approximate
    denom = tl.sqrt_rn(tl.div_rn(v, bias2)) + eps
    update = tl.div_rn(tl.div_rn(m, bias1), denom)
    store_rounded(n_ptr + rows[:, None] * stride_na + cols[None, :] * stride_nl, update, mask, EMULATE)


_SEMAPHORES: dict = {}


def _semaphores(device: torch.device, count: int) -> torch.Tensor:
    """Zeroed int32 arrival counters, one per output tile, cached per device and stream: the
    last split of a tile resets its counter, so no memset launch is needed per call."""
    key = stream_key(device)
    buf = _SEMAPHORES.get(key)
    if buf is None or buf.numel() < count or buf.device != device:
        buf = torch.empty(max(count, 1024), dtype=torch.int32, device=device).zero_()
        _SEMAPHORES[key] = buf
    return buf


_16BIT = (torch.bfloat16, torch.float16)


def check_launch_args(grad, proj, exp_avg, exp_avg_sq, out, side) -> None:
    """What the kernel needs for memory safety (the op's own checks name every argument and run
    in its public function and fake): 2-D tensors of matching shapes, supported dtypes, one device."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    m, n = grad.shape
    r = proj.shape[1] if side == "left" else proj.shape[0]
    want_proj, want_low = ((m, r), (r, n)) if side == "left" else ((r, n), (m, r))
    if tuple(proj.shape) != want_proj or any(tuple(t.shape) != want_low for t in (exp_avg, exp_avg_sq, out)):
        raise ValueError(f"project_adam: grad {tuple(grad.shape)} side={side!r} needs proj {want_proj} and moments "
                         f"and out {want_low}; got proj {tuple(proj.shape)}, exp_avg {tuple(exp_avg.shape)}, "
                         f"exp_avg_sq {tuple(exp_avg_sq.shape)}, out {tuple(out.shape)}")
    if grad.dtype not in (torch.float32,) + _16BIT or proj.dtype not in (torch.float32, grad.dtype):
        raise ValueError(f"project_adam: grad {grad.dtype} with proj {proj.dtype} is not supported")
    if any(t.dtype not in (torch.float32, torch.bfloat16) for t in (exp_avg, exp_avg_sq)) or out.dtype != torch.float32:
        raise ValueError(f"project_adam: moments must be float32 or bfloat16 and out float32, got "
                         f"{exp_avg.dtype}, {exp_avg_sq.dtype}, {out.dtype}")
    if len({t.device for t in (grad, proj, exp_avg, exp_avg_sq, out)}) != 1:
        raise ValueError("project_adam: all tensors must be on one device")


def project_adam_plan(
    grad, proj, exp_avg, exp_avg_sq, out, side, beta1, beta2, eps, bias_correction1, bias_correction2,
    dot_precision: Optional[str] = None, *, arch: Optional[int] = None, num_sms: Optional[int] = None,
    interpret: Optional[bool] = None, weights: int = 1, table: Optional[torch.Tensor] = None,
    tiles: Optional[dict] = None, grad_scale: Optional[torch.Tensor] = None, found_inf: Optional[torch.Tensor] = None,
) -> list:
    """Check the arguments and decide the launch(es) without running them (works on ``meta``
    tensors: the static GPU check compiles exactly what this returns).

    ``weights > 1`` with ``table`` (int64, ``weights`` x TABLE_COLUMNS): one launch for that many
    weights shaped like these tensors, each row of the table giving one weight's addresses and
    bias corrections (``project_adam_foreach_launch`` builds it). ``tiles`` overrides entries of
    ``config`` (BLOCK_L, BLOCK_K, num_warps, num_stages): for tile sweeps on a GPU
    (``benchmarks/gpu_check.py --sweep``), not for normal use. ``grad_scale`` / ``found_inf``:
    GradScaler's one-element tensors (module docstring), or None."""
    check_launch_args(grad, proj, exp_avg, exp_avg_sq, out, side)
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
    cfg = {**config(precision, rank, length, num_sms), **(tiles or {})}
    block_a, block_l, block_k = cfg["BLOCK_A"], cfg["BLOCK_L"], cfg["BLOCK_K"]
    tiles = triton.cdiv(rank, block_a) * triton.cdiv(length, block_l)
    if tiles == 0 or weights == 0:  # an empty subspace: nothing to update (a 0-program launch is an error)
        return []
    splits = 1
    if tiles * weights * 2 <= num_sms and depth >= 2 * MIN_SPLIT_DEPTH:  # fewer tiles than half the SMs
        splits = min(depth // MIN_SPLIT_DEPTH, num_sms // (tiles * weights))
    k_per_split = triton.cdiv(triton.cdiv(max(depth, 1), splits), block_k) * block_k
    splits = triton.cdiv(max(depth, 1), k_per_split)  # no empty split
    wide = max(span_elements(t) for t in (grad, proj, exp_avg, exp_avg_sq, out)) >= 2 ** 31 \
        or splits * rank * length >= 2 ** 31
    if splits > 1:
        workspace = torch.empty((weights, splits, rank, length), dtype=torch.float32, device=grad.device)
        sem = (_semaphores(grad.device, tiles * weights) if grad.device.type != "meta"
               else torch.empty(tiles * weights, dtype=torch.int32, device="meta"))
    else:
        workspace, sem = out, out  # never touched: SPLIT_K=False removes that code
    args = dict(
        a_ptr=proj, g_ptr=grad, m_ptr=exp_avg, v_ptr=exp_avg_sq, n_ptr=out, ws_ptr=workspace,
        sem_ptr=sem, table_ptr=table if table is not None else out,
        # an absent scale or flag: out stands in (never read, its flag is off)
        grad_scale_ptr=grad_scale if grad_scale is not None else out,
        found_inf_ptr=found_inf if found_inf is not None else out, RANK=rank, L=length, K=depth,
        k_per_split=k_per_split,
        stride_ak=a_strides[0], stride_aa=a_strides[1], stride_gk=g_strides[0], stride_gl=g_strides[1],
        stride_ma=strides(exp_avg)[0], stride_ml=strides(exp_avg)[1],
        stride_va=strides(exp_avg_sq)[0], stride_vl=strides(exp_avg_sq)[1],
        stride_na=strides(out)[0], stride_nl=strides(out)[1],
        beta1=beta1, one_minus_beta1=1.0 - beta1, beta2=beta2, one_minus_beta2=1.0 - beta2, eps=eps,
        bias1=bias_correction1, bias2=bias_correction2,
    )
    constexprs = dict(DOT=precision, EMULATE=bool(interpret), FOREACH=table is not None,
                      HAS_GRAD_SCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None, SPLIT_K=splits > 1,
                      EVEN_K=k_per_split % block_k == 0 and depth % k_per_split == 0, WIDE=wide,
                      TWO_HALVES=block_l >= 128, VEC_A=vector_width(rank), VEC_L=vector_width(length),
                      BLOCK_A=block_a, BLOCK_L=block_l, BLOCK_K=block_k)
    grid = (tiles * splits, weights) if table is not None else (tiles * splits,)
    return [Launch(_project_adam_kernel, grid, args, constexprs, cfg["num_warps"], cfg["num_stages"])]


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
    tiles: Optional[dict] = None,
) -> torch.Tensor:
    """Update ``exp_avg``/``exp_avg_sq`` in place and write N into ``out``; returns ``out``.

    ``dot_precision=None`` decides per call (see the module docstring); one of
    ``DOT_PRECISIONS`` forces it. ``tiles``: see ``project_adam_plan``.
    """
    launches = project_adam_plan(grad, proj, exp_avg, exp_avg_sq, out, side, beta1, beta2, eps,
                                 bias_correction1, bias_correction2, dot_precision, tiles=tiles)
    with device_ctx(grad):
        for launch in launches:
            launch.run()
    return out


# run_foreach's cache: (signatures, (side, precision, has grad_scale, has found_inf), stream, interpret)
# -> [(indices of a group, its plan)]
_FOREACH_PLANS: dict = {}


def project_adam_foreach_launch(grads, projs, exp_avgs, exp_avg_sqs, outs, side: str, beta1: float, beta2: float,
                                eps: float, bias_corrections, dot_precision: Optional[str] = None, *,
                                grad_scale: Optional[torch.Tensor] = None,
                                found_inf: Optional[torch.Tensor] = None) -> None:
    """``project_adam_launch`` for every weight i of the lists, one launch per group of weights
    with equal shapes, strides and dtypes; ``bias_corrections`` is a (len, 2) sequence or
    float64 CPU tensor (row i: bias_correction1, bias_correction2 of weight i). ``grad_scale`` /
    ``found_inf``: None or GradScaler's one-element tensors on the grads' device (module docstring).

    The grouping and each group's plan (grid, constexprs, strides) are cached by the lists'
    signatures, so a call's host work is one table of addresses and one upload per group.
    """
    if len(grads) == 0:
        return
    rows = bias_corrections.tolist() if isinstance(bias_corrections, torch.Tensor) else list(bias_corrections)
    precision = resolve_dot_precision(grads[0].dtype, dot_precision)

    def make_plan(first, count, table):
        return project_adam_plan(*first, side, beta1, beta2, eps, 1.0, 1.0, precision, weights=count, table=table,
                                 grad_scale=grad_scale, found_inf=found_inf)

    amp = {name: t for name, t in (("grad_scale_ptr", grad_scale), ("found_inf_ptr", found_inf)) if t is not None}
    run_foreach(_FOREACH_PLANS, list(zip(grads, projs, exp_avgs, exp_avg_sqs, outs)), rows,
                (side, precision, grad_scale is not None, found_inf is not None), make_plan, TABLE_COLUMNS,
                ("g_ptr", "a_ptr", "m_ptr", "v_ptr", "n_ptr"),
                dict(beta1=beta1, one_minus_beta1=1.0 - beta1, beta2=beta2, one_minus_beta2=1.0 - beta2, eps=eps,
                     **amp))
