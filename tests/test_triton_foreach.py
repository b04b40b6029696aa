"""The Triton multi-tensor launchers (one launch per group of same-shape weights; AdamW: one
launch per list) in the interpreter on CPU, or on CUDA where there is one.

* ``project_adam`` / ``back_project_update`` foreach: each weight's result is the
  single-weight launcher's, bit for bit (same tile code, same order of sums), over several
  steps with a different bias correction / coefficient row per weight, so a weight reading
  another weight's row or pointers fails; the single-weight kernels are checked against the
  fp64 oracle in tests/test_triton_kernels.py and tests/test_op_*.py. One case per dtype also
  checks the foreach result against an fp64 oracle directly.
* ``adamw_foreach_``: params and both moments against an fp64 evaluation of the formula with
  the storage roundings applied, several steps, mixed shapes (67 x 131, a 4097-element row,
  scalars, 3-D), a transposed (non-dense-in-order) tensor, fp32 / bf16 / fp16 / fp64 params,
  fp32 and bf16 moments.

Shapes are small: the interpreter runs ~1 ms per program.
"""
from __future__ import annotations

import os

import pytest
import torch

try:
    import triton  # noqa: F401
except Exception as exc:
    pytest.skip(f"triton is not importable ({type(exc).__name__}: {exc})", allow_module_level=True)

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1: Triton cannot run here", allow_module_level=True)

from op_samples import U32, UNIT_ROUNDOFF, adam_bounds, assert_within, projection_bound  # noqa: E402
from owlore_kernels.kernels import (back_project_update_foreach_launch, back_project_update_launch,  # noqa: E402
                                    project_adam_foreach_launch, project_adam_launch)
from owlore_kernels.kernels.adamw import adamw_foreach_launch  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BETA1, BETA2, EPS = 0.9, 0.999, 1e-8
# two weights of one shape (one launch, grid dim 1 = 2) and one of another (a second launch)
SHAPES = [(67, 131), (67, 131), (40, 24)]


def _weights(side, gdtype, pdtype, mdtype, r=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for m, n in SHAPES:
        k = m if side == "left" else n
        proj = (torch.randn((m, r) if side == "left" else (r, n), generator=gen) / k ** 0.5).to(pdtype)
        low = (r, n) if side == "left" else (m, r)
        out.append(dict(proj=proj.to(DEV), exp_avg=(0.1 * torch.randn(low, generator=gen)).to(mdtype).to(DEV),
                        exp_avg_sq=(0.01 * torch.rand(low, generator=gen)).to(mdtype).to(DEV),
                        out=torch.zeros(low, device=DEV)))
    return out


def _grads(side, gdtype, step):
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(shape, generator=gen).to(gdtype).to(DEV) for shape in SHAPES]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("gdtype,pdtype,mdtype", [
    (torch.float32, torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.float32, torch.bfloat16), (torch.float16, torch.float16, torch.bfloat16)])
def test_project_adam_foreach_is_the_single_weight_kernel_for_every_weight(side, gdtype, pdtype, mdtype):
    many = _weights(side, gdtype, pdtype, mdtype)
    one = [{k: v.clone() for k, v in w.items()} for w in many]
    for step in range(1, 4):
        grads = _grads(side, gdtype, step)
        # a different row per weight: a weight that read its neighbour's would differ
        bcs = [(1 - BETA1 ** (step + i), 1 - BETA2 ** (step + 2 * i)) for i in range(len(many))]
        project_adam_foreach_launch(grads, [w["proj"] for w in many], [w["exp_avg"] for w in many],
                                    [w["exp_avg_sq"] for w in many], [w["out"] for w in many], side, BETA1, BETA2,
                                    EPS, torch.tensor(bcs, dtype=torch.float64))
        for g, w, (bc1, bc2) in zip(grads, one, bcs):
            project_adam_launch(g, w["proj"], w["exp_avg"], w["exp_avg_sq"], w["out"], side, BETA1, BETA2, EPS,
                                bc1, bc2)
        for i, (a, b) in enumerate(zip(many, one)):
            for name in ("exp_avg", "exp_avg_sq", "out"):
                assert torch.equal(a[name], b[name]), f"step {step} weight {i} {name}"


def test_project_adam_foreach_split_k_per_weight():
    """K = 2100 with 2 tiles a weight: split-K (2 splits) in the foreach launch too, each weight
    with its own partial tiles and arrival counters; results equal the single-weight launches',
    which are checked against the oracle in test_triton_kernels.py."""
    from owlore_kernels.kernels import project_adam_plan

    gen = torch.Generator().manual_seed(11)
    m, n, r = 2100, 70, 16
    # bf16: 64-deep K-steps (fp32's "ieee" takes 16), so the interpreter runs 4x fewer of them
    grads = [torch.randn(m, n, generator=gen).bfloat16().to(DEV) for _ in range(2)]
    projs = [(torch.randn(m, r, generator=gen) / m ** 0.5).bfloat16().to(DEV) for _ in range(2)]
    states = [[torch.zeros(r, n, device=DEV) for _ in range(3)] for _ in range(4)]  # 2 foreach, 2 single
    table = torch.empty(2, 7, dtype=torch.int64, device=DEV)
    (launch,) = project_adam_plan(grads[0], projs[0], *states[0], "left", BETA1, BETA2, EPS, 1.0, 1.0, weights=2,
                                  table=table)
    assert launch.constexprs["SPLIT_K"] and launch.grid == (2 * 2, 2)
    bcs = [(0.1, 0.001), (0.5, 0.05)]
    project_adam_foreach_launch(grads, projs, *[[states[i][j] for i in range(2)] for j in range(3)], "left", BETA1,
                                BETA2, EPS, bcs)
    for i in range(2):
        project_adam_launch(grads[i], projs[i], *states[2 + i], "left", BETA1, BETA2, EPS, *bcs[i])
        assert all(torch.equal(a, b) for a, b in zip(states[i], states[2 + i])), f"weight {i}"


def test_project_adam_foreach_split_k_with_grad_scaler_arguments():
    """Split-K (2 splits a tile) with torch.amp.GradScaler's arguments: an overflowed step
    (found_inf = 1) writes no moment and no N but still resets every tile's arrival counter, so
    the next call (G scaled by 2^10, grad_scale = 2^10, found_inf = 0) is the single-weight
    launch on the unscaled G, bit for bit (the scaling is exact: see tests/test_op_amp.py)."""
    from owlore_kernels.kernels import project_adam as pa
    from owlore_kernels.kernels._common import stream_key

    gen = torch.Generator().manual_seed(12)
    m, n, r = 2100, 70, 16
    grads = [torch.randn(m, n, generator=gen).bfloat16().to(DEV) for _ in range(2)]
    projs = [(torch.randn(m, r, generator=gen) / m ** 0.5).bfloat16().to(DEV) for _ in range(2)]
    states = [[(0.1 * torch.randn(r, n, generator=gen)).abs().to(DEV) for _ in range(3)] for _ in range(2)]
    singles = [[t.clone() for t in state] for state in states]
    bcs = [(0.1, 0.001), (0.5, 0.05)]
    lists = [[states[i][j] for i in range(2)] for j in range(3)]
    before = [[t.clone() for t in state] for state in states]
    scale = torch.full((), 1024.0, device=DEV)
    project_adam_foreach_launch(grads, projs, *lists, "left", BETA1, BETA2, EPS, bcs, grad_scale=scale,
                                found_inf=torch.ones(1, device=DEV))
    assert all(torch.equal(a, b) for state, old in zip(states, before) for a, b in zip(state, old))
    assert not bool(pa._SEMAPHORES[stream_key(DEV)].any()), "a skipped split-K step left arrival counters set"
    project_adam_foreach_launch([g * 1024 for g in grads], projs, *lists, "left", BETA1, BETA2, EPS, bcs,
                                grad_scale=scale, found_inf=torch.zeros(1, device=DEV))
    for i in range(2):
        project_adam_launch(grads[i], projs[i], *singles[i], "left", BETA1, BETA2, EPS, *bcs[i])
        assert all(torch.equal(a, b) for a, b in zip(states[i], singles[i])), f"weight {i}"


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("gdtype", [torch.float32, torch.bfloat16, torch.float16])
def test_project_adam_foreach_matches_fp64_oracle(side, gdtype):
    """One step, fp32 moments, P in G's dtype: within the rounding bound of op_samples (R's
    fp32 sum over K; P already holds values of the dot's type, so no operand rounding)."""
    many = _weights(side, gdtype, gdtype, torch.float32)
    before = [(w["exp_avg"].double(), w["exp_avg_sq"].double()) for w in many]
    grads = _grads(side, gdtype, 1)
    bcs = [(0.1 + 0.2 * i, 0.001 + 0.01 * i) for i in range(len(many))]
    project_adam_foreach_launch(grads, [w["proj"] for w in many], [w["exp_avg"] for w in many],
                                [w["exp_avg_sq"] for w in many], [w["out"] for w in many], side, BETA1, BETA2, EPS,
                                bcs)
    for g, w, (m0, v0), (bc1, bc2) in zip(grads, many, before, bcs):
        g64, p64 = g.double().cpu(), w["proj"].double().cpu()
        low64 = p64.t() @ g64 if side == "left" else g64 @ p64.t()
        bound = projection_bound(g64, p64, side, 0.0)
        (m, dm), (v, dv), (n, dn) = adam_bounds(low64, bound, m0.cpu(), v0.cpu(), BETA1, BETA2, EPS, bc1, bc2)
        assert_within(w["exp_avg"].cpu(), m, dm, "exp_avg")
        assert_within(w["exp_avg_sq"].cpu(), v, dv, "exp_avg_sq")
        assert_within(w["out"].cpu(), n, dn, "N")


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("wdtype,pdtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                           (torch.bfloat16, torch.float32), (torch.float16, torch.float16)])
def test_back_project_update_foreach_is_the_single_weight_kernel_for_every_weight(side, wdtype, pdtype):
    gen = torch.Generator().manual_seed(3)
    r = 24  # not a multiple of BLOCK_K: the K tail's mask runs
    params, projs, norms = [], [], []
    for m, n in SHAPES:
        params.append(torch.randn(m, n, generator=gen).to(wdtype).to(DEV))
        projs.append((torch.randn((m, r) if side == "left" else (r, n), generator=gen) / r ** 0.5).to(pdtype).to(DEV))
        norms.append(torch.randn((r, n) if side == "left" else (m, r), generator=gen).to(DEV))
    singles = [p.clone() for p in params]
    for step in range(3):
        coefficients = [(1 - 1e-3 * (i + 1), -0.05 * (step + 1) * (i + 1)) for i in range(len(params))]
        back_project_update_foreach_launch(params, projs, norms, side, torch.tensor(coefficients, dtype=torch.float64))
        for w, p, nu, (beta, alpha) in zip(singles, projs, norms, coefficients):
            back_project_update_launch(w, p, nu, side, beta, alpha)
        for i, (a, b) in enumerate(zip(params, singles)):
            assert torch.equal(a, b), f"step {step} weight {i}"


def test_foreach_plans_are_cached_and_keep_no_call_tensors():
    """A second call with the same signatures reuses the plan; the plan holds no reference to
    a call's gradients or weights (it would keep a gradient alive between steps)."""
    import weakref

    from owlore_kernels.kernels import back_project_update as bpu

    params = [torch.randn(33, 20, device=DEV)]
    projs, norms = [torch.randn(33, 4, device=DEV)], [torch.randn(4, 20, device=DEV)]
    bpu._FOREACH_PLANS.clear()
    back_project_update_foreach_launch(params, projs, norms, "left", [(1.0, -0.1)])
    back_project_update_foreach_launch([p.clone() for p in params], projs, norms, "left", [(1.0, -0.1)])
    assert len(bpu._FOREACH_PLANS) == 1
    ref = weakref.ref(params[0])
    del params
    assert ref() is None


def test_empty_lists_are_a_no_op():
    project_adam_foreach_launch([], [], [], [], [], "left", BETA1, BETA2, EPS, torch.zeros(0, 2, dtype=torch.float64),
                                found_inf=torch.zeros(1, device=DEV))
    back_project_update_foreach_launch([], [], [], "right", torch.zeros(0, 2, dtype=torch.float64))
    adamw_foreach_launch([], [], [], [], "galore", BETA1, BETA2, EPS, torch.zeros(0, 3, dtype=torch.float64))


# --------------------------------------------------------------------------- adamw_foreach_

ADAMW_SHAPES = [(67, 131), (4097,), (1,), (3, 5, 7), (131, 67)]


def _adamw_oracle(w, g, m, v, variant, c):
    """One step in fp64 from the stored values, then the storage roundings (nearest even)."""
    w64, g64, m64, v64 = (t.double().clone() for t in (w, g, m, v))  # .double() of fp64 is no copy
    m64 = BETA1 * m64 + (1 - BETA1) * g64
    v64 = BETA2 * v64 + (1 - BETA2) * g64 * g64
    if variant == "galore":
        w64 = w64 + c[0] * m64 / (v64.sqrt() + EPS)
        if c[1] != 0:
            w64 = w64 + c[1] * w64
    else:
        w64 = w64 * c[1]
        w64 = w64 + c[0] * m64 / (v64.sqrt() / c[2] + EPS)
    return w64, m64, v64


@pytest.mark.parametrize("variant", ["galore", "torch"])
@pytest.mark.parametrize("wdtype,mdtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                           (torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                           (torch.float64, torch.float64)])
def test_adamw_foreach_matches_fp64_oracle_over_steps(variant, wdtype, mdtype):
    """Each step compares with the oracle run from the kernel's own previous state (so errors do
    not compound in the comparison). Per step the kernel's math dtype (fp32, or fp64 for fp64
    moments) rounds ~10 operations: relative 16 u of the math dtype on m, v, and on the update
    c0 m / (sqrt v + eps) (|c0| <= 1e-2, so against |w| ~ 1 it is far smaller); then the stores
    round to the storage dtype: half an ulp, i.e. its unit roundoff u_s relative. Bound:
    u_s |x| + 16 u_math (the magnitude of the terms summed: |w| + |update| for w, b1 |m| +
    (1 - b1) |g| for m, whose terms can cancel, v for v) + the smallest subnormal step."""
    gen = torch.Generator().manual_seed(7)
    ws = [torch.randn(s, generator=gen).to(wdtype).to(DEV) for s in ADAMW_SHAPES]
    ws[-1] = ws[-1].t()  # a transposed weight: walked through contiguous copies
    ms = [torch.zeros_like(w, dtype=mdtype) for w in ws]
    vs = [torch.zeros_like(w, dtype=mdtype) for w in ws]
    u_math = 2.0 ** -53 if mdtype == torch.float64 else U32
    unit = {torch.float64: 2.0 ** -53, torch.float32: U32, **UNIT_ROUNDOFF}
    for step in range(1, 4):
        gs = [torch.randn(w.shape, generator=gen).to(wdtype).to(DEV) for w in ws]
        if variant == "galore":
            coef = [(-1e-2 * (1 + i) * step ** 0.5, -1e-3 if i % 2 else 0.0, 1.0) for i in range(len(ws))]
        else:
            coef = [(-1e-2 / (1 + i), 1 - 1e-3 * i, (1 - BETA2 ** step) ** 0.5) for i in range(len(ws))]
        want = [_adamw_oracle(w, g, m, v, variant, c) for w, g, m, v, c in zip(ws, gs, ms, vs, coef)]
        before = [(w.double().clone(), (BETA1 * m.double().abs() + (1 - BETA1) * g.double().abs()))
                  for w, g, m in zip(ws, gs, ms)]
        adamw_foreach_launch(ws, gs, ms, vs, variant, BETA1, BETA2, EPS, torch.tensor(coef, dtype=torch.float64))
        for i, (w, m, v, (w0, m_terms), (w64, m64, v64)) in enumerate(zip(ws, ms, vs, before, want)):
            tiny = torch.finfo(w.dtype).smallest_normal * torch.finfo(w.dtype).eps
            # what the fp32 roundings scale with: the terms of each sum (m's two terms can cancel)
            math_scale = {"w": w0.abs() + (w64 - w0).abs(), "exp_avg": m_terms, "exp_avg_sq": v64}
            for name, got, exact, u_s in (("w", w, w64, unit[wdtype]), ("exp_avg", m, m64, unit[mdtype]),
                                          ("exp_avg_sq", v, v64, unit[mdtype])):
                bound = u_s * exact.abs() + 16 * u_math * math_scale[name] + tiny
                assert_within(got, exact, bound, f"step {step} tensor {i} {name}")


def test_adamw_foreach_bf16_rounds_to_nearest_even():
    """A result halfway between two bf16 numbers lands on the even one (the interpreter's own
    cast truncates; the kernel's stores round). "torch" variant with g = 0 and c0 = 0: w = w c1;
    with w = 1 and c1 = 1 + 3 * 2^-9 (exact in fp32) that is the tie between 1 + 2^-8 and
    1 + 2^-7, which rounds to 1 + 2^-7 (even last bit); truncation would give 1 + 2^-8."""
    w = torch.ones(5, dtype=torch.bfloat16, device=DEV)
    g = torch.zeros(5, dtype=torch.bfloat16, device=DEV)
    m, v = torch.zeros(5, device=DEV), torch.zeros(5, device=DEV)
    adamw_foreach_launch([w], [g], [m], [v], "torch", BETA1, BETA2, EPS, [(0.0, 1 + 3 * 2.0 ** -9, 1.0)])
    assert (w == 1 + 2.0 ** -7).all(), w


# --------------------------------------------------------------------------- through the public ops

def test_public_foreach_ops_reach_the_triton_launchers_with_their_arguments():
    """backend="triton" (the CUDA kernel; forced on CPU under the interpreter) runs the launchers
    with every argument in its place: the result is the launcher's, bit for bit, and differs from
    the input (so a call that did nothing would fail)."""
    from owlore_kernels.ops.adamw import adamw_foreach_
    from owlore_kernels.ops.back_project_update import back_project_update_foreach_
    from owlore_kernels.ops.project_adam import project_adam_foreach_

    side, gdtype = "right", torch.bfloat16
    via_op = _weights(side, gdtype, gdtype, torch.bfloat16)
    direct = [{k: v.clone() for k, v in w.items()} for w in via_op]
    grads = _grads(side, gdtype, 1)
    bcs = [(0.1, 0.001), (0.19, 0.002), (0.271, 0.003)]
    project_adam_foreach_(grads, [w["proj"] for w in via_op], [w["exp_avg"] for w in via_op],
                          [w["exp_avg_sq"] for w in via_op], [w["out"] for w in via_op], side=side, beta1=BETA1,
                          beta2=BETA2, eps=EPS, bias_corrections=bcs, backend="triton")
    project_adam_foreach_launch(grads, [w["proj"] for w in direct], [w["exp_avg"] for w in direct],
                                [w["exp_avg_sq"] for w in direct], [w["out"] for w in direct], side, BETA1, BETA2,
                                EPS, bcs)
    for a, b in zip(via_op, direct):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(w["out"].abs().sum() > 0 for w in via_op)

    params = [torch.randn(shape).to(gdtype).to(DEV) for shape in SHAPES]
    params_direct = [p.clone() for p in params]
    coefficients = [(0.999, -0.1), (0.998, -0.2), (0.997, -0.3)]
    projs, outs = [w["proj"] for w in via_op], [w["out"] for w in via_op]
    back_project_update_foreach_(params, projs, outs, side=side, coefficients=coefficients, backend="triton")
    back_project_update_foreach_launch(params_direct, projs, outs, side, coefficients)
    assert all(torch.equal(a, b) for a, b in zip(params, params_direct))

    grads_w = [torch.randn(p.shape).to(gdtype).to(DEV) for p in params]
    moments = [[torch.zeros(p.shape, device=DEV) for p in params] for _ in range(4)]
    before = [p.clone() for p in params]
    rows = [(-1e-2, -1e-3), (-2e-2, 0.0), (-3e-2, -1e-3)]  # "galore": (len, 2)
    adamw_foreach_(params, grads_w, moments[0], moments[1], variant="galore", beta1=BETA1, beta2=BETA2, eps=EPS,
                   coefficients=rows, backend="triton")
    adamw_foreach_launch(params_direct, grads_w, moments[2], moments[3], "galore", BETA1, BETA2, EPS, rows)
    assert all(torch.equal(a, b) for a, b in zip(params, params_direct))
    assert all(not torch.equal(a, b) for a, b in zip(params, before))
