"""Plain AdamW over a list of tensors on the GPU: one elementwise launch for the whole list.

Formula and reference: ``owlore_kernels.ops.adamw`` (``adamw_foreach_``). Per element, with
g the gradient upcast to the math dtype (the moments' dtype; fp32 for bf16 moments)::

    m = beta1 m + (1 - beta1) g;   v = beta2 v + (1 - beta2) g^2
    "galore": w = w + c0 m / (sqrt(v) + eps);  if c1 != 0: w = w + c1 w
    "torch":  w = w c1;  w = w + c0 m / (sqrt(v) / c2 + eps)

(c0, c1, c2) are per tensor (the optimizer folds lr, weight decay and the bias corrections
into them). W and the moments are stored back in their own dtypes, rounded to nearest even.

One launch: the list's tensors are cut into BLOCK-element blocks, numbered across the list;
program p finds its tensor by a binary search over the tensors' first block numbers (log2 of
the list's length, e.g. 9 dependent loads from a table of a few KB that stays in L1/L2 for a
300-tensor list), then reads that tensor's addresses and coefficients from the same int64
table, uploaded in one small copy per call. Each tensor is walked as flat memory, so w, g, m
and v must be dense with equal strides (``torch.zeros_like(p)`` moments and torch's
gradients are); a tensor that is not goes through contiguous copies, written back after.
BLOCK = 4096 elements at 8 warps: 16 per thread, 16 KB of fp32 W per program, and a 4096 x
4096 weight is 4096 programs.

``torch.amp.GradScaler``: ``grad_scale`` and ``found_inf`` are one-element tensors on the
GPU that every program loads itself (no host sync): g = g / grad_scale (IEEE division in
the math dtype) before the moments, and the loads of w, m, v and every store are masked with
found_inf == 0, so an overflowed step writes nothing (g is still read). Constexpr
flags say whether each is given; an absent one gets a stand-in pointer that is never read.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (check_aligned, device_ctx, interpreting, pointer_table, store_rounded, table_pointer,
                      unless_found_inf)

__all__ = ["adamw_foreach_launch", "VARIANTS"]

VARIANTS = ("galore", "torch")
BLOCK = 4096
NUM_WARPS = 8
# w, g, m, v addresses; numel; first block; c0, c1, c2, beta1, 1 - beta1, beta2, 1 - beta2, eps (fp64 bits;
# 1 - beta formed in fp64 on the host, as torch.optim does: 1 - fp32(0.999) is 1.3e-5 off 0.001)
TABLE_COLUMNS = 14


@triton.jit
def _table_value(row_ptr, column: tl.constexpr, dtype: tl.constexpr):
    return tl.load(row_ptr + column).to(tl.float64, bitcast=True).to(dtype)


@triton.jit
def _adamw_foreach_kernel(
    table_ptr, w_ptr, g_ptr, m_ptr, v_ptr,  # the first tensor of each kind: the pointer types
    grad_scale_ptr, found_inf_ptr,  # GradScaler's scale and overflow flag (one element each), if given
    count,  # tensors in the list
    VARIANT: tl.constexpr,  # "galore" | "torch": where weight decay and eps apply (module docstring)
    HAS_GRAD_SCALE: tl.constexpr,  # code path: divide g by grad_scale (absent: no division at all)
    HAS_FOUND_INF: tl.constexpr,  # code path: mask the stores with found_inf == 0
    EMULATE: tl.constexpr,  # interpreter: bf16 stores emulated (see _common)
    SEARCH_STEPS: tl.constexpr,  # ceil(log2(count)): the binary search's length
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    lo = 0
    hi = count  # invariant: first_block[lo] <= pid < first_block[hi] (first_block[count] = total)
    for _ in tl.static_range(SEARCH_STEPS):
        mid = (lo + hi) // 2
        right = tl.load(table_ptr + mid * 14 + 5) <= pid  # TABLE_COLUMNS, first block
        lo = tl.where(right, mid, lo)
        hi = tl.where(right, hi, mid)
    row = table_ptr + lo * 14
    math: tl.constexpr = tl.float64 if v_ptr.dtype.element_ty == tl.float64 else tl.float32
    w_ptr = table_pointer(row, 0, w_ptr)
    g_ptr = table_pointer(row, 1, g_ptr)
    m_ptr = table_pointer(row, 2, m_ptr)
    v_ptr = table_pointer(row, 3, v_ptr)
    numel = tl.load(row + 4)
    offs = (pid - tl.load(row + 5)).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    c0 = _table_value(row, 6, math)
    c1 = _table_value(row, 7, math)
    c2 = _table_value(row, 8, math)
    beta1 = _table_value(row, 9, math)
    one_minus_beta1 = _table_value(row, 10, math)
    beta2 = _table_value(row, 11, math)
    one_minus_beta2 = _table_value(row, 12, math)
    eps = _table_value(row, 13, math)

    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(math)
    if HAS_GRAD_SCALE:
        g = _div(g, tl.load(grad_scale_ptr).to(math))
    if HAS_FOUND_INF:
        mask = unless_found_inf(mask, found_inf_ptr)  # masks the loads below and every store
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(math)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(math)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(math)
    m = beta1 * m + one_minus_beta1 * g
    v = beta2 * v + one_minus_beta2 * g * g
    store_rounded(m_ptr + offs, m, mask, EMULATE)
    store_rounded(v_ptr + offs, v, mask, EMULATE)
    root = _sqrt(v)
    if VARIANT == "galore":
        w = w + c0 * _div(m, root + eps)
        w = tl.where(c1 != 0.0, w + c1 * w, w)
    else:
        w = w * c1
        w = w + c0 * _div(m, _div(root, c2) + eps)
    store_rounded(w_ptr + offs, w, mask, EMULATE)


@triton.jit
def _sqrt(x):
    """IEEE-rounded square root, as torch's (the plain fp32 GPU one is approximate)."""
    if x.dtype == tl.float64:
        return tl.sqrt(x)
    return tl.sqrt_rn(x)


@triton.jit
def _div(x, y):
    """IEEE-rounded division, as torch's."""
    if x.dtype == tl.float64:
        return x / y
    return tl.div_rn(x, y)


def _flat(t: torch.Tensor, like: torch.Tensor) -> bool:
    """``t`` can be walked as ``t.numel()`` consecutive elements in the same order as ``like``:
    equal strides, and (dims sorted by stride) each stride the product of the sizes inside it."""
    if t.stride() != like.stride():
        return False
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


# (signatures, variant, device, interpret) -> (grid, numel and first-block columns, search steps)
_PLANS: dict = {}


def adamw_foreach_launch(params, grads, exp_avgs, exp_avg_sqs, variant: str, beta1: float, beta2: float, eps: float,
                         coefficients, grad_scale=None, found_inf=None) -> None:
    """One AdamW step for every tensor i of the lists (module docstring); ``coefficients`` is a
    (len, 3) or (len, 2) sequence or float64 CPU tensor, row i = (c0, c1[, c2]) of tensor i
    ("galore" does not use c2). ``grad_scale`` / ``found_inf``: None or one-element floating
    tensors on the params' device (checked by the op; read by the kernel)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    count = len(params)
    if count == 0:
        return
    rows = coefficients.tolist() if isinstance(coefficients, torch.Tensor) else [list(r) for r in coefficients]
    items = list(zip(params, grads, exp_avgs, exp_avg_sqs))
    # tensors that are not dense with p's strides run on contiguous copies, written back below
    copies = {}
    for i, (w, g, m, v) in enumerate(items):
        if not all(_flat(t, w) for t in (w, g, m, v)):
            copies[i] = (w, m, v)
            items[i] = tuple(t.contiguous() for t in (w, g, m, v))
    device = params[0].device
    key = (tuple(tuple((t.numel(), t.dtype) for t in item) for item in items), variant, str(device), interpreting())
    plan = _PLANS.get(key)
    if plan is None:
        numels = [item[0].numel() for item in items]
        firsts, total = [], 0
        for numel in numels:
            firsts.append(total)
            total += triton.cdiv(numel, BLOCK)
        plan = (total, [[numel, first] for numel, first in zip(numels, firsts)],
                max(0, (count - 1).bit_length()))
        _PLANS[key] = plan
    total, static_columns, steps = plan
    for item in items:
        check_aligned(item)
    if total:
        table = pointer_table([[t.data_ptr() for t in item] + static for item, static in zip(items, static_columns)],
                              [(row + [1.0])[:3] + [beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps] for row in rows], device)
        first = items[0]
        with device_ctx(params[0]):
            # an absent scale or flag: the table stands in (never read, the flag is off)
            _adamw_foreach_kernel[(total,)](table, *first, table if grad_scale is None else grad_scale,
                                            table if found_inf is None else found_inf, count, VARIANT=variant,
                                            HAS_GRAD_SCALE=grad_scale is not None,
                                            HAS_FOUND_INF=found_inf is not None, EMULATE=interpreting(),
                                            SEARCH_STEPS=steps, BLOCK=BLOCK, num_warps=NUM_WARPS)
    for i, (w, m, v) in copies.items():
        w.copy_(items[i][0])
        m.copy_(items[i][2])
        v.copy_(items[i][3])
