"""The multi-tensor ("foreach") ops on every backend, against fp64 oracles written here.

One call updates a list of weights of mixed odd shapes (ranks 1 to 16, a 1-row weight,
a rank equal to the width), each with its own per-step numbers (the weights sit at
different step counts), over several steps; every state tensor is checked after every
step. Each step's oracle starts from what the backend stored the step before, so the
bounds below are those of one step and do not grow with the step count.

Tolerances, per step, elementwise:

* project_adam_foreach_: the bound of ``test_op_project_adam`` (``op_samples.projection_bound``
  carried through ``adam_bounds``): R's dot products of length K are within gamma_{K+1} of
  the exact value in any order, a 16-bit P or G upcasts exactly, and each fp32 operation of
  Adam adds one rounding. bf16 moments are the fp32 result rounded to nearest even, so they
  must lie in the rounding of the two ends of the fp32 interval (``op_samples.rounded_bracket``);
  N is computed from the fp32 moments and keeps the fp32 bound.
* back_project_update_foreach_: |x - W'| <= gamma_{r+5} (|beta W| + |alpha| |A| |B|) for the
  fp32 result x (a length-r dot, scaling, the fp32 rounding of alpha and beta, the addition);
  a 16-bit W is bracketed by the rounding of that interval.
* adamw_foreach_: derived in ``adamw_bounds`` below, one rounding per operation of the
  spec's order; a 16-bit W and bf16 moments are bracketed as above. fp64 weights compute in
  fp64 like the oracle, so there both carry the bound (with u = 2^-53): their difference is
  within twice it.

The oracles' own fp64 rounding (about 2^-53 relative) is below 2^-28 of every fp32 bound,
which each leave at least one unit roundoff of margin per operation.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch._dynamo.testing

from op_samples import (SIDES, UNIT_ROUNDOFF, adam_bounds, assert_within, backend_device_params, dispatching_to,
                        gamma, interpreted, projection, projection_bound, rounded_bracket)
from owlore_kernels.ops.adamw import adamw_foreach_
from owlore_kernels.ops.back_project_update import back_project_update_foreach_
from owlore_kernels.ops.project_adam import project_adam_foreach_

BETAS = dict(beta1=0.9, beta2=0.999, eps=1e-6)
# (m, n, r) of one call: odd shapes, rank 1 to 16, a 1-row weight, r equal to the width
SHAPES = [(67, 131, 5), (1, 5, 1), (33, 8, 8), (20, 45, 16)]
STEPS = 3
# weight i is at update step STEP_OFFSETS[i] + s in the call of step s: per-weight bias corrections
STEP_OFFSETS = [0, 5, 1, 40]
# (grad/param dtype, projection dtype): fp32 P next to any G; a 16-bit P only next to its own dtype
PROJ_CASES = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.float32),
              (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16)]
STATE_DTYPES = [torch.float32, torch.bfloat16]


def low_shape(side, m, n, r):
    return (r, n) if side == "left" else (m, r)


def bias_corrections(step):
    """(bc1, bc2) of each weight at call ``step`` (1-based), as a float64 (len, 2) tensor."""
    rows = [(1 - BETAS["beta1"] ** (step + k), 1 - BETAS["beta2"] ** (step + k)) for k in STEP_OFFSETS]
    return torch.tensor(rows, dtype=torch.float64)


def assert_stored(actual, exact64, bound, what):
    """fp32/fp64 storage: within the bound; 16-bit storage: a nearest-even rounding of a value within it."""
    if actual.dtype in (torch.float32, torch.float64):
        assert_within(actual, exact64, bound, what)
        return
    lo, hi = rounded_bracket(exact64, bound, actual.dtype)
    outside = (actual < lo) | (actual > hi)
    assert not bool(outside.any()), (
        f"{what}: {int(outside.sum())} of {actual.numel()} entries are not a rounding of a value within the bound; "
        f"first: {actual[outside][0].item()} not in [{lo[outside][0].item()}, {hi[outside][0].item()}]")


def over(backends, *more):
    def wrap(test):
        for mark in reversed([pytest.mark.parametrize("backend,device", backends), *more]):
            test = mark(test)
        return test
    return wrap


# --------------------------------------------------------------------------- project_adam_foreach_

PA_BACKENDS = backend_device_params("project_adam_foreach")


def project_adam_oracle_check(backend, grad, proj, side, before, after, out, bc1, bc2):
    """One weight: the fp64 oracle of R = P^T G (G Q^T), Adam and N, from the stored inputs."""
    g64, p64 = grad.double(), proj.double()
    low64 = p64.t().mm(g64) if side == "left" else g64.mm(p64.t())
    # Triton's bf16/fp16 dot rounds an fp32 P to G's type (a 16-bit P is used as stored)
    dot_rounding = (UNIT_ROUNDOFF[grad.dtype] if backend == "triton" and grad.dtype != torch.float32
                    and proj.dtype == torch.float32 else 0.0)
    r_bound = projection_bound(g64, p64, side, dot_rounding)
    (m, dm), (v, dv), (n, dn) = adam_bounds(low64, r_bound, before[0].double(), before[1].double(),
                                            BETAS["beta1"], BETAS["beta2"], BETAS["eps"], bc1, bc2)
    assert_stored(after[0], m, dm, "exp_avg")
    assert_stored(after[1], v, dv, "exp_avg_sq")
    assert_within(out, n, dn, "N")


@pytest.mark.numerics
@over(PA_BACKENDS, pytest.mark.parametrize("side", SIDES), pytest.mark.parametrize("dtype,proj_dtype", PROJ_CASES),
      pytest.mark.parametrize("state_dtype", STATE_DTYPES))
def test_project_adam_foreach_matches_fp64_oracle(backend, device, side, dtype, proj_dtype, state_dtype):
    projs = [projection(side, m, n, r, device).to(proj_dtype) for m, n, r in SHAPES]
    exp_avgs = [torch.zeros(low_shape(side, *s), device=device, dtype=state_dtype) for s in SHAPES]
    exp_avg_sqs = [torch.zeros_like(t) for t in exp_avgs]
    for step in range(1, STEPS + 1):
        grads = [torch.randn(m, n, device=device).to(dtype) for m, n, _ in SHAPES]
        outs = [torch.full(t.shape, float("nan"), device=device) for t in exp_avgs]
        before = [(a.clone(), b.clone()) for a, b in zip(exp_avgs, exp_avg_sqs)]
        bcs = bias_corrections(step)
        project_adam_foreach_(grads, projs, exp_avgs, exp_avg_sqs, outs, side=side, bias_corrections=bcs,
                              backend=backend, **BETAS)
        for i in range(len(SHAPES)):
            project_adam_oracle_check(backend, grads[i], projs[i], side, before[i], (exp_avgs[i], exp_avg_sqs[i]),
                                      outs[i], *bcs[i].tolist())


# --------------------------------------------------------------------------- back_project_update_foreach_

BPU_BACKENDS = backend_device_params("back_project_update_foreach")


def back_project_update_oracle_check(backend, before, after, proj, norm, side, beta, alpha):
    w64, p64, n64 = before.double(), proj.double(), norm.double()
    a, b = (p64, n64) if side == "left" else (n64, p64)
    exact = beta * w64 + alpha * a.mm(b)
    product_bound = abs(alpha) * a.abs().mm(b.abs())
    bound = gamma(a.shape[1] + 5) * (abs(beta) * w64.abs() + product_bound)
    if backend == "triton" and before.dtype != torch.float32:  # the tensor-core dot rounds both operands
        bound += 2 * UNIT_ROUNDOFF[before.dtype] * product_bound
    assert_stored(after, exact, bound, "W")


@pytest.mark.numerics
@over(BPU_BACKENDS, pytest.mark.parametrize("side", SIDES), pytest.mark.parametrize("dtype,proj_dtype", PROJ_CASES))
def test_back_project_update_foreach_matches_fp64_oracle(backend, device, side, dtype, proj_dtype):
    projs = [projection(side, m, n, r, device).to(proj_dtype) for m, n, r in SHAPES]
    params = [torch.nn.Parameter(torch.randn(m, n, device=device).to(dtype)) for m, n, _ in SHAPES]  # leaves
    for step in range(1, STEPS + 1):
        norms = [torch.randn(low_shape(side, *s), device=device) for s in SHAPES]
        # per weight: AdamW-style decay beta = 1 - lr wd and a step alpha large enough that most
        # 16-bit results are inexact, so the rounding is exercised
        coefficients = torch.tensor([(1 - 0.01 * (i + 1), -0.05 * (i + step)) for i in range(len(SHAPES))],
                                    dtype=torch.float64)
        before = [p.detach().clone() for p in params]
        with torch.no_grad():  # as in optimizer.step()
            back_project_update_foreach_(params, projs, norms, side=side, coefficients=coefficients, backend=backend)
        for i in range(len(SHAPES)):
            back_project_update_oracle_check(backend, before[i], params[i].detach(), projs[i], norms[i], side,
                                             *coefficients[i].tolist())


# --------------------------------------------------------------------------- adamw_foreach_

ADAMW_BACKENDS = backend_device_params("adamw_foreach")
ADAMW_DTYPES = [(torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32), (torch.float16, torch.bfloat16),
                (torch.float64, torch.float64)]
LR, WEIGHT_DECAY = 1e-2, 0.1  # a step large enough that 16-bit weights round


def adamw_weights(device, dtype, state_dtype):
    """(params, grads, exp_avgs, exp_avg_sqs) of mixed shapes and layouts: 2-D, 1-D, 0-d, 3-D, a
    transposed weight whose grad and moments share its layout (read in memory order), and a
    strided slice next to contiguous grad and moments (updated through contiguous copies)."""
    def make(shape):
        return torch.randn(shape, device=device).to(dtype)

    params = [make((67, 131)), make((5,)), make(()), make((3, 11, 7)), make((9, 13)).t(), make((10, 24))[:, ::3]]
    grads = [torch.empty_like(p) for p in params]  # empty_like keeps a dense layout (the transposed one)
    grads[-1] = torch.empty(params[-1].shape, device=device, dtype=dtype)
    for g in grads:
        g.copy_(torch.randn(g.shape))
    exp_avgs = [torch.zeros_like(g, dtype=state_dtype) for g in grads]
    exp_avg_sqs = [torch.zeros_like(g, dtype=state_dtype) for g in grads]
    return params, grads, exp_avgs, exp_avg_sqs


def adamw_coefficients(variant, steps):
    rows = []
    for t in steps:
        bc1, bc2 = 1 - BETAS["beta1"] ** t, 1 - BETAS["beta2"] ** t
        if variant == "galore":
            rows.append((-LR * math.sqrt(bc2) / bc1, -LR * WEIGHT_DECAY, 1.0))
        else:
            rows.append((-LR / bc1, 1 - LR * WEIGHT_DECAY, math.sqrt(bc2)))
    return torch.tensor(rows, dtype=torch.float64)


def adamw_bounds(w, g, m0, v0, variant, c, u):
    """fp64 oracle and elementwise bounds of (W, m, v) after one step from the stored inputs
    (exact in fp64), for a backend that rounds each operation of the spec's order (unit
    roundoff ``u``; beta1, 1 - beta1, ..., c0, c1, c2 and eps are rounded to the math type too):

    * m = b1 m0 + (1 - b1) g: two rounded constants, two products, a sum:
      |dm| <= 3u (|b1 m0| + |(1 - b1) g|); 4u leaves a margin.
    * v = b2 v0 + (1 - b2) g g: one more product: 5u (|b2 v0| + (1 - b2) g^2).
    * s = sqrt(v): |ds| <= min(sqrt(dv), dv / s) + u s (sqrt(a) - sqrt(b) = (a - b) / (sqrt a + sqrt b)).
      "torch" divides by c2 first: ds / c2 + 2u s / c2 (c2 and the quotient rounded).
    * d = s + eps: |dd| <= ds + 2u d (eps and the sum rounded); the computed d is at least
      eps (1 - 2u), so U = c0 m / d has |dU| <= |c0| (dm + |m / d| dd) / max(d - dd, eps (1 - 4u))
      + 4u |U| (c0, the product and the quotient rounded, one u spare).
    * "galore": w1 = w + U: dU + u |w1|; then w2 = w1 + c1 w1: (1 + |c1|) dw1 + 3u (|c1 w1| + |w2|).
      "torch": w1 = w c1: 2u |w c1|; then w2 = w1 + U: dw1 + dU + u |w2|.
    """
    b1, b2, eps = BETAS["beta1"], BETAS["beta2"], BETAS["eps"]
    c0, c1, c2 = c
    m = b1 * m0 + (1 - b1) * g
    v = b2 * v0 + (1 - b2) * g * g
    dm = 4 * u * (b1 * m0.abs() + (1 - b1) * g.abs())
    dv = 5 * u * (b2 * v0 + (1 - b2) * g * g)
    s = v.sqrt()
    ds = torch.minimum(dv.sqrt(), dv / s.clamp_min(1e-300)) + u * s
    if variant == "torch":
        s, ds = s / c2, ds / c2 + 2 * u * s / c2
    d = s + eps
    dd = ds + 2 * u * d
    update = c0 * m / d
    d_update = abs(c0) * (dm + (m / d).abs() * dd) / torch.clamp(d - dd, min=eps * (1 - 4 * u)) + 4 * u * update.abs()
    if variant == "galore":
        w1 = w + update
        dw1 = d_update + u * w1.abs()
        w2 = w1 + c1 * w1 if c1 != 0 else w1
        dw2 = (1 + abs(c1)) * dw1 + 3 * u * (abs(c1) * w1.abs() + w2.abs()) if c1 != 0 else dw1
    else:
        w1 = w * c1
        dw1 = 2 * u * w1.abs()
        w2 = w1 + update
        dw2 = dw1 + d_update + u * w2.abs()
    return (w2, dw2), (m, dm), (v, dv)


@pytest.mark.numerics
@over(ADAMW_BACKENDS, pytest.mark.parametrize("variant", ["galore", "torch"]),
      pytest.mark.parametrize("dtype,state_dtype", ADAMW_DTYPES))
def test_adamw_foreach_matches_fp64_oracle(backend, device, variant, dtype, state_dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels take fp32/bf16/fp16 weights")
    params, grads, exp_avgs, exp_avg_sqs = adamw_weights(device, dtype, state_dtype)
    # fp64: the oracle rounds like the backend, so the two differ by up to twice the bound
    u, factor = (2.0**-53, 2.0) if dtype == torch.float64 else (2.0**-24, 1.0)
    offsets = [0, 3, 1, 7, 2, 10]
    for step in range(1, STEPS + 1):
        for g in grads:
            g.copy_(torch.randn(g.shape))
        coefficients = adamw_coefficients(variant, [step + k for k in offsets])
        if variant == "galore" and step == 2:
            coefficients[1, 1] = 0.0  # no weight decay on one weight: the c1 != 0 branch is skipped
        # clone: .double() of an fp64 tensor is the tensor itself, which the step overwrites
        before = [tuple(t.detach().clone().double() for t in ts) for ts in zip(params, exp_avgs, exp_avg_sqs)]
        adamw_foreach_(params, grads, exp_avgs, exp_avg_sqs, variant=variant, coefficients=coefficients,
                       backend=backend, **BETAS)
        for i, (w0, m0, v0) in enumerate(before):
            (w, dw), (m, dm), (v, dv) = adamw_bounds(w0, grads[i].double(), m0, v0, variant,
                                                     coefficients[i].tolist(), u)
            assert_stored(params[i], w, factor * dw, f"params[{i}]")
            assert_stored(exp_avgs[i], m, factor * dm, f"exp_avgs[{i}]")
            assert_stored(exp_avg_sqs[i], v, factor * dv, f"exp_avg_sqs[{i}]")


@pytest.mark.parametrize("backend,device", ADAMW_BACKENDS)
def test_adamw_foreach_two_columns_and_the_empty_list(backend, device):
    """variant "galore" takes (len, 2) coefficients (c2 unused) and a list of tuples; empty lists do nothing."""
    p, g = torch.ones(4, device=device), torch.full((4,), 2.0, device=device)
    m, v = torch.zeros(4, device=device), torch.zeros(4, device=device)
    adamw_foreach_([p], [g], [m], [v], variant="galore", coefficients=[(-0.5, 0.0)], backend=backend, **BETAS)
    # m = 0.2, v = 0.004, w = 1 - 0.5 * 0.2 / (sqrt(0.004) + 1e-6)
    want = 1 - 0.5 * 0.2 / (math.sqrt(0.004) + 1e-6)
    torch.testing.assert_close(p, torch.full((4,), want, device=device), rtol=4 * 2**-24, atol=0)
    adamw_foreach_([], [], [], [], variant="torch", coefficients=[], backend=backend, **BETAS)


# --------------------------------------------------------------------------- inference mode, many weights


@pytest.mark.parametrize("backend,device", [p for p in PA_BACKENDS if p.id == "cpp-cpu"])
def test_cpp_many_weights_split_across_threads_under_inference_mode(backend, device):
    """Enough work to split across threads (the C++ kernels run a call on one thread below ~1M
    multiply-adds per thread); the worker threads must see the caller's inference mode, and
    every weight, the last included, must be updated."""
    shapes = [(96, 64 + k, 16) for k in range(40)]
    with torch.inference_mode():
        grads = [torch.randn(m, n, device=device) for m, n, _ in shapes]
        projs = [projection("left", m, n, r, device) for m, n, r in shapes]
        exp_avgs = [torch.zeros(r, n, device=device) for _, n, r in shapes]
        exp_avg_sqs = [torch.zeros_like(t) for t in exp_avgs]
        outs = [torch.empty_like(t) for t in exp_avgs]
        project_adam_foreach_(grads, projs, exp_avgs, exp_avg_sqs, outs, side="left", backend=backend,
                              bias_corrections=[(0.1, 0.001)] * len(shapes), **BETAS)
        params = [torch.zeros(m, n, device=device) for m, n, _ in shapes]
        back_project_update_foreach_(params, projs, outs, side="left", coefficients=[(1.0, -1.0)] * len(shapes),
                                     backend=backend)
        adamw_foreach_(params, grads, [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params],
                       variant="galore", coefficients=[(-0.1, 0.0)] * len(shapes), backend=backend, **BETAS)
    assert all(bool((m != 0).any()) and bool(torch.isfinite(o).all()) for m, o in zip(exp_avgs, outs))
    assert all(bool((p != 0).any()) for p in params)


# --------------------------------------------------------------------------- argument checks

def _project_adam_lists(side="left"):
    grads = [torch.randn(m, n) for m, n, _ in SHAPES]
    projs = [projection(side, m, n, r) for m, n, r in SHAPES]
    lows = [[torch.zeros(low_shape(side, *s)) for s in SHAPES] for _ in range(3)]
    return dict(grads=grads, projs=projs, exp_avgs=lows[0], exp_avg_sqs=lows[1], outs=lows[2])


def _replace(lists, name, i, tensor):
    lists = dict(lists)
    lists[name] = list(lists[name])
    lists[name][i] = tensor
    return lists


# (what is wrong, list, index, replacement(lists) -> tensor, message pattern)
PROJECT_ADAM_BAD = [
    ("moment shape", "exp_avgs", 2, lambda: torch.zeros(7, 8),
     r"exp_avgs\[2\] has shape \(7, 8\); grads\[2\] \(33, 8\) with side='left' needs \(r, 8\) with "
     r"r = projs\[2\]\.shape\[1\] = 8"),
    ("proj rows", "projs", 3, lambda: torch.zeros(19, 16),
     r"projs\[3\] has shape \(19, 16\); grads\[3\] \(20, 45\) with side='left' needs \(20, r\)"),
    ("out dtype", "outs", 1, lambda: torch.zeros(1, 5, dtype=torch.bfloat16),
     r"outs\[1\] has dtype torch.bfloat16; expected torch.float32"),
    ("grad dtype", "grads", 3, lambda: torch.zeros(20, 45, dtype=torch.float16),
     r"grads\[3\] has dtype torch.float16; expected torch.float32 \(the dtype of grads\[0\]"),
    ("moment device", "exp_avg_sqs", 2, lambda: torch.zeros(8, 8, device="meta"),
     r"exp_avg_sqs\[2\] is on meta; expected cpu"),
    ("not a tensor", "grads", 1, lambda: [[1.0]], r"grads\[1\] must be a torch.Tensor, got list"),
]


@pytest.mark.parametrize("what,name,index,make,pattern", PROJECT_ADAM_BAD, ids=[b[0] for b in PROJECT_ADAM_BAD])
def test_project_adam_foreach_bad_weight_names_list_and_index_and_changes_nothing(what, name, index, make, pattern):
    lists = _replace(_project_adam_lists(), name, index, make())
    written = [t.clone() if t.device.type != "meta" else t for key in ("exp_avgs", "exp_avg_sqs", "outs")
               for t in lists[key] if isinstance(t, torch.Tensor)]
    error = TypeError if what == "not a tensor" else ValueError
    with pytest.raises(error, match=pattern):
        project_adam_foreach_(**lists, side="left", bias_corrections=[(0.5, 0.5)] * len(SHAPES), **BETAS)
    after = [t for key in ("exp_avgs", "exp_avg_sqs", "outs") for t in lists[key] if isinstance(t, torch.Tensor)]
    assert all(a.device.type == "meta" or torch.equal(a, b) for a, b in zip(after, written))
    if what in ("not a tensor", "moment device"):
        return
    # the fake implementation raises the same error while tracing (meta tensors here)
    meta = {k: [t.to("meta") for t in v] for k, v in lists.items()}
    with pytest.raises(error, match=pattern):
        torch.ops.owlore.project_adam_foreach_(*meta.values(), side="left", **BETAS,
                                               bias_corrections=torch.full((len(SHAPES), 2), 0.5, dtype=torch.float64))


SCALARS_BAD = [
    ("list length", dict(drop_last="outs"), r"outs has 3 tensors but grads has 4"),
    ("bias row count", dict(bias_corrections=torch.ones(3, 2, dtype=torch.float64)),
     r"bias_corrections must have shape \(4, 2\), one row per weight, got \(3, 2\)"),
    ("bias dtype", dict(bias_corrections=torch.ones(4, 2)), r"bias_corrections must be a float64 CPU tensor"),
    ("bias value", dict(bias_corrections=[(0.5, 0.5), (0.5, 0.5), (0.5, 0.0), (0.5, 0.5)]),
     r"bias_corrections\[2, 1\] must be in \(0, 1\]"),
    ("side", dict(side="up"), r"side must be one of \('left', 'right'\), got 'up'"),
]


@pytest.mark.parametrize("what,change,pattern", SCALARS_BAD, ids=[b[0] for b in SCALARS_BAD])
def test_project_adam_foreach_bad_call_arguments(what, change, pattern):
    lists = _project_adam_lists()
    change = dict(change)
    if "drop_last" in change:
        lists[change.pop("drop_last")].pop()
    before = [t.clone() for t in lists["exp_avgs"]]
    kwargs = dict(side="left", bias_corrections=[(0.5, 0.5)] * len(SHAPES), **BETAS)
    kwargs.update(change)
    with pytest.raises(ValueError, match=pattern):
        project_adam_foreach_(**lists, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(lists["exp_avgs"], before))


def test_back_project_update_foreach_bad_weight():
    params = [torch.randn(m, n) for m, n, _ in SHAPES]
    projs = [projection("right", m, n, r) for m, n, r in SHAPES]
    norms = [torch.randn(m, r) for m, _, r in SHAPES]
    norms[3] = torch.randn(20, 15)
    before = [p.clone() for p in params]
    with pytest.raises(ValueError, match=r"back_project_update_foreach_: norm_updates\[3\] has shape \(20, 15\); "
                                         r"params\[3\] \(20, 45\) with side='right' needs \(20, r\) with "
                                         r"r = projs\[3\]\.shape\[0\] = 16"):
        back_project_update_foreach_(params, projs, norms, side="right", coefficients=[(1.0, -0.1)] * len(SHAPES))
    assert all(torch.equal(a, b) for a, b in zip(params, before))
    projs[2] = projs[2].double()
    with pytest.raises(ValueError, match=r"projs\[2\] has dtype torch.float64; expected torch.float32"):
        back_project_update_foreach_(params, projs, norms, side="right", coefficients=[(1.0, -0.1)] * len(SHAPES))


ADAMW_BAD = [
    ("grad shape", "grads", 3, lambda p: torch.zeros(3, 11, 6), r"grads\[3\] has shape \(3, 11, 6\); expected "
                                                                r"\(3, 11, 7\), as params\[3\]"),
    ("moment dtype", "exp_avg_sqs", 1, lambda p: torch.zeros(5, dtype=torch.float16),
     r"exp_avg_sqs\[1\] has dtype torch.float16; expected torch.float32 \(the dtype of exp_avgs\[0\]"),
    ("param dtype", "params", 4, lambda p: p.double(), r"params\[4\] has dtype torch.float64; expected torch.float32"),
    ("grad device", "grads", 2, lambda p: torch.zeros((), device="meta"), r"grads\[2\] is on meta; expected cpu"),
]


@pytest.mark.parametrize("what,name,index,make,pattern", ADAMW_BAD, ids=[b[0] for b in ADAMW_BAD])
def test_adamw_foreach_bad_weight_names_list_and_index_and_changes_nothing(what, name, index, make, pattern):
    lists = dict(zip(("params", "grads", "exp_avgs", "exp_avg_sqs"), adamw_weights("cpu", torch.float32,
                                                                                   torch.float32)))
    lists = _replace(lists, name, index, make(lists[name][index]))
    written = [t.clone() for key in ("params", "exp_avgs", "exp_avg_sqs") for t in lists[key]]
    with pytest.raises(ValueError, match=pattern):
        adamw_foreach_(*lists.values(), variant="torch", coefficients=adamw_coefficients("torch", [1] * 6), **BETAS)
    after = [t for key in ("params", "exp_avgs", "exp_avg_sqs") for t in lists[key]]
    assert all(torch.equal(a, b) for a, b in zip(after, written))


def test_adamw_foreach_bad_variant_and_coefficients():
    lists = adamw_weights("cpu", torch.float32, torch.float32)
    with pytest.raises(ValueError, match=r"variant must be one of \('galore', 'torch'\), got 'adam'"):
        adamw_foreach_(*lists, variant="adam", coefficients=adamw_coefficients("torch", [1] * 6), **BETAS)
    with pytest.raises(ValueError, match=r"coefficients must have shape \(6, 3\), one row per weight, got \(6, 2\)"):
        adamw_foreach_(*lists, variant="torch", coefficients=torch.ones(6, 2, dtype=torch.float64), **BETAS)


@pytest.mark.parametrize("backend,device", [p for p in PA_BACKENDS if p.id == "cpp-cpu"])
def test_cpp_foreach_kernels_guard_memory_on_direct_calls(backend, device):
    """Called directly (no Python checks), the C++ kernels refuse a weight they would read out
    of bounds with, naming its index, before writing any weight."""
    lists = _replace(_project_adam_lists(), "outs", 3, torch.zeros(16, 44))
    before = [t.clone() for t in lists["exp_avgs"]]
    with pytest.raises(RuntimeError, match=r"moments and out\[3\] must be \[16, 45\], got \[16, 44\]"):
        torch.ops.owlore.project_adam_foreach_(*lists.values(), side="left", **BETAS,
                                               bias_corrections=torch.full((len(SHAPES), 2), 0.5, dtype=torch.float64))
    assert all(torch.equal(a, b) for a, b in zip(lists["exp_avgs"], before))
    params = [torch.randn(m, n) for m, n, _ in SHAPES]
    with pytest.raises(RuntimeError, match=r"coefficients must be a float64 CPU tensor of shape \(4, 2\)"):
        torch.ops.owlore.back_project_update_foreach_(params, lists["projs"], lists["outs"], side="left",
                                                      coefficients=torch.ones(3, 2, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"grads\[1\] must be Float"):
        torch.ops.owlore.adamw_foreach_(params, [params[0], params[1].half()] + params[2:], params, params,
                                        variant="galore", **BETAS, coefficients=torch.ones(4, 2, dtype=torch.float64))


# --------------------------------------------------------------------------- torch.library / torch.compile

OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_static",
                 "test_aot_dispatch_dynamic")


def _opcheck_cases(device):
    """(op, args, kwargs) of one small call of each foreach op, with a bf16 weight."""
    shapes = [(19, 37, 5), (4, 6, 2)]
    grads = [torch.randn(m, n, device=device).bfloat16() for m, n, _ in shapes]
    projs = [projection("right", m, n, r, device) for m, n, r in shapes]
    lows = [torch.rand(m, r, device=device) for m, _, r in shapes]
    numbers = torch.tensor([[0.19, 0.002], [0.5, 0.25]], dtype=torch.float64)
    return {
        "project_adam_foreach": (torch.ops.owlore.project_adam_foreach_.default,
                                 (grads, projs, [t.clone() for t in lows], [t.clone() for t in lows],
                                  [torch.empty_like(t) for t in lows]),
                                 dict(side="right", bias_corrections=numbers, **BETAS)),
        "back_project_update_foreach": (torch.ops.owlore.back_project_update_foreach_.default,
                                        ([g.clone() for g in grads], projs, lows),
                                        dict(side="right", coefficients=torch.tensor([[0.99, -0.1], [1.0, -0.2]],
                                                                                     dtype=torch.float64))),
        "adamw_foreach": (torch.ops.owlore.adamw_foreach_.default,
                          ([g.clone() for g in grads], grads, [torch.zeros(g.shape, device=device) for g in grads],
                           [torch.zeros(g.shape, device=device) for g in grads]),
                          dict(variant="torch", coefficients=torch.tensor([[-0.1, 0.99, 0.1], [-0.2, 0.9, 0.3]],
                                                                          dtype=torch.float64), **BETAS)),
    }


@pytest.mark.parametrize("op", ["project_adam_foreach", "back_project_update_foreach", "adamw_foreach"])
@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_opcheck(op, backend):
    """Schema (only the (a!) lists are written), fake implementation, autograd registration
    and AOT dispatch (static and dynamic shapes), with the dispatcher running this backend."""
    device = torch.device("cuda" if backend == "triton" and torch.cuda.is_available() else "cpu")
    if backend not in ops_registry(op):
        pytest.skip(f"{backend} implements no {op}")
    if backend == "triton" and device.type == "cpu":
        pytest.skip("the interpreter is too slow for opcheck's repeated runs")
    overload, args, kwargs = _opcheck_cases(device)[op]
    with dispatching_to(op, backend, device):
        torch.library.opcheck(overload, args, kwargs, test_utils=OPCHECK_UTILS)


def ops_registry(op):
    from owlore_kernels import ops
    return ops._REGISTRY[op]


def test_compiled_foreach_step_does_not_recompile_for_new_numbers():
    """The per-weight numbers are graph inputs: a compiled step with new bias corrections and
    coefficients reuses its graph, and matches the eager step bit for bit (same kernels)."""
    shapes = [(30, 50, 4), (7, 9, 2)]

    def step(params, grads, projs, exp_avgs, exp_avg_sqs, outs, bcs, coefficients, plain, plain_m, plain_v, ac):
        project_adam_foreach_(grads, projs, exp_avgs, exp_avg_sqs, outs, side="left", bias_corrections=bcs, **BETAS)
        back_project_update_foreach_(params, projs, outs, side="left", coefficients=coefficients)
        adamw_foreach_(plain, grads, plain_m, plain_v, variant="torch", coefficients=ac, **BETAS)

    def state():
        params = [torch.randn(m, n) for m, n, _ in shapes]
        return (params, [torch.randn(m, n) for m, n, _ in shapes], [projection("left", *s) for s in shapes],
                [torch.zeros(r, n) for _, n, r in shapes], [torch.zeros(r, n) for _, n, r in shapes],
                [torch.zeros(r, n) for _, n, r in shapes], [p.clone() for p in params],
                [torch.zeros(m, n) for m, n, _ in shapes], [torch.zeros(m, n) for m, n, _ in shapes])

    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(step, fullgraph=True, backend=counter)
    torch.manual_seed(1)
    eager_state = state()
    torch.manual_seed(1)
    compiled_state = state()
    for t in (1, 2, 3):
        numbers = (torch.tensor([[1 - 0.9**t, 1 - 0.999**t]] * 2, dtype=torch.float64),
                   torch.tensor([[1 - 0.01 * t, -0.1 * t]] * 2, dtype=torch.float64),
                   torch.tensor([[-0.1 * t, 0.99, (1 - 0.999**t) ** 0.5]] * 2, dtype=torch.float64))
        s = eager_state
        step(s[0], s[1], s[2], s[3], s[4], s[5], *numbers[:2], s[6], s[7], s[8], numbers[2])
        s = compiled_state
        compiled(s[0], s[1], s[2], s[3], s[4], s[5], *numbers[:2], s[6], s[7], s[8], numbers[2])
    assert counter.frame_count == 1, counter.frame_count
    for a, b in zip(eager_state, compiled_state):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
