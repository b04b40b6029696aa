"""``torch.amp.GradScaler`` inside the three foreach ops: ``grad_scale`` and ``found_inf``, on
every backend that runs here (the reference, C++, Triton in the interpreter or on CUDA).

What is checked, and why the comparisons are what they are:

* A power-of-two scale (GradScaler's: 2^16 at start, halved or doubled) is bit for bit the
  same op, same backend, on the unscaled problem. Binary floating point commutes with
  multiplying by 2^k as long as nothing overflows or underflows (the values here are O(1),
  far from both ends of fp32 and of fp16's 65504 / 2^10 = 64): ``G * 2^10`` is exact in any
  float dtype, every rounding of the projection's sums scales with it, and ``x / 2^10`` is
  exact. So for adamw ``upcast(G 2^10) / 2^10 = upcast(G)`` and for project_adam
  ``fl(P^T (G 2^10)) / 2^10 = fl(P^T G)`` in the same summation order (same backend, same
  shapes, same tiling): everything downstream sees the same bits. The unscaled op is checked
  against fp64 oracles in test_op_foreach.py.
* A scale that is not a power of two (1000) against the fp64 oracles of test_op_foreach.py
  on the exactly unscaled gradient ``G' / 1000`` (G' the stored, scaled gradient), with one
  more rounding in each bound (derivations at each test).
* ``found_inf`` nonzero (1, and NaN, which is not 0 either): every tensor the op writes keeps
  every bit, also right after a normal call of the same signatures (a Triton plan cached
  without the flag would write); zero: the bits of the call without it.
* Bad values (two elements, an integer dtype, a number, another device: ``meta`` stands in
  for a GPU here) raise naming the argument, before anything is written; the fake
  implementation (``torch.compile``, memory traces under FakeTensorMode) takes the arguments
  and raises the same errors; the C++ kernels refuse them on direct calls.
"""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from op_samples import (SIDES, U32, UNIT_ROUNDOFF, adam_bounds, assert_within, backend_device_params, dispatching_to,
                        projection, projection_bound)
from owlore_kernels.ops.adamw import adamw_foreach_
from owlore_kernels.ops.back_project_update import back_project_update_foreach_
from owlore_kernels.ops.project_adam import project_adam_foreach_
from test_op_foreach import (ADAMW_DTYPES, BETAS, OPCHECK_UTILS, _opcheck_cases, adamw_bounds, adamw_coefficients,
                             adamw_weights, assert_stored, low_shape, over)

# (m, n, r) of one call: odd shapes, a 1-row weight, r equal to the width; tiny for the interpreter
SHAPES = [(19, 37, 5), (1, 5, 1), (12, 8, 8)]
POWER_OF_TWO = 1024.0
NOT_POWER_OF_TWO = 1000.0
PA_BACKENDS = backend_device_params("project_adam_foreach")
BPU_BACKENDS = backend_device_params("back_project_update_foreach")
ADAMW_BACKENDS = backend_device_params("adamw_foreach")
# (grad dtype, projection dtype, moment dtype)
PA_CASES = [(torch.float32, torch.float32, torch.float32), (torch.bfloat16, torch.float32, torch.bfloat16),
            (torch.bfloat16, torch.bfloat16, torch.float32), (torch.float16, torch.float32, torch.float32),
            (torch.float16, torch.float16, torch.bfloat16)]


def bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bit patterns as integers: equal bits compare equal, NaN included."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_same_bits(actual, expected, what):
    for i, (a, b) in enumerate(zip(actual, expected)):
        assert torch.equal(bits(a), bits(b)), f"{what}[{i}] differs"


def scalar(value, device):
    """GradScaler's form: a 0-dim fp32 scale, a 1-element fp32 found_inf, on the weights' device."""
    return torch.full((), value, device=device)


def found(value, device):
    return torch.full((1,), value, device=device)


def bias_corrections(step):
    """(bc1, bc2) per weight at call ``step``, the weights at different step counts."""
    return torch.tensor([(1 - BETAS["beta1"] ** (step + k), 1 - BETAS["beta2"] ** (step + 3 * k))
                         for k in range(len(SHAPES))], dtype=torch.float64)


# --------------------------------------------------------------------------- project_adam_foreach_


def project_adam_state(side, state_dtype, device):
    """(exp_avgs, exp_avg_sqs, outs) with nonzero moments (a step already taken) and NaN outs."""
    lows = [low_shape(side, *s) for s in SHAPES]
    exp_avgs = [(0.1 * torch.randn(s)).to(state_dtype).to(device) for s in lows]
    exp_avg_sqs = [(0.01 * torch.rand(s)).to(state_dtype).to(device) for s in lows]
    outs = [torch.full(s, float("nan"), device=device) for s in lows]
    return exp_avgs, exp_avg_sqs, outs


def clone_all(lists):
    return [[t.clone() for t in ts] for ts in lists]


@over(PA_BACKENDS, pytest.mark.parametrize("side", SIDES),
      pytest.mark.parametrize("dtype,proj_dtype,state_dtype", PA_CASES))
def test_project_adam_power_of_two_scale_is_the_unscaled_call_bit_for_bit(backend, device, side, dtype, proj_dtype,
                                                                          state_dtype):
    projs = [projection(side, m, n, r, device).to(proj_dtype) for m, n, r in SHAPES]
    unscaled_state = project_adam_state(side, state_dtype, device)
    scaled_state = clone_all(unscaled_state)
    for step in (1, 2):
        grads = [torch.randn(m, n, device=device).to(dtype) for m, n, _ in SHAPES]
        scaled = [g * POWER_OF_TWO for g in grads]  # exact in the grads' own dtype
        bcs = bias_corrections(step)
        project_adam_foreach_(grads, projs, *unscaled_state, side=side, bias_corrections=bcs, backend=backend,
                              **BETAS)
        project_adam_foreach_(scaled, projs, *scaled_state, side=side, bias_corrections=bcs, backend=backend,
                              grad_scale=scalar(POWER_OF_TWO, device), **BETAS)
        for name, a, b in zip(("exp_avgs", "exp_avg_sqs", "outs"), scaled_state, unscaled_state):
            assert_same_bits(a, b, f"step {step} {name}")


@pytest.mark.numerics
@over(PA_BACKENDS, pytest.mark.parametrize("side", SIDES),
      pytest.mark.parametrize("dtype,proj_dtype,state_dtype", PA_CASES))
def test_project_adam_any_scale_matches_fp64_oracle_of_the_unscaled_gradient(backend, device, side, dtype,
                                                                            proj_dtype, state_dtype):
    """R is projected from the stored G' and divided by s = 1000 (exact in fp32): with
    R1 = fl(P^T G'), |R1 - P^T G'| <= B' (``projection_bound`` of G', in any summation order),
    and R2 = fl(R1 / s) = (R1 / s)(1 + d), |d| <= u. Against R = P^T (G' / s):
    |R2 - R| <= B' / s + u (|R| + B' / s), where B' / s is ``projection_bound`` of G' / s (it is
    linear in |G'|). ``adam_bounds`` carries that through the moments and N."""
    projs = [projection(side, m, n, r, device).to(proj_dtype) for m, n, r in SHAPES]
    state = project_adam_state(side, state_dtype, device)
    before = [[t.double() for t in ts] for ts in state[:2]]
    scaled = [(torch.randn(m, n, device=device).double() * NOT_POWER_OF_TWO).to(dtype) for m, n, _ in SHAPES]
    bcs = bias_corrections(1)
    project_adam_foreach_(scaled, projs, *state, side=side, bias_corrections=bcs, backend=backend,
                          grad_scale=scalar(NOT_POWER_OF_TWO, device), **BETAS)
    for i, (grad, proj) in enumerate(zip(scaled, projs)):
        g64, p64 = grad.double() / NOT_POWER_OF_TWO, proj.double()
        low64 = p64.t().mm(g64) if side == "left" else g64.mm(p64.t())
        # Triton's bf16/fp16 dot rounds an fp32 P to G's type (a 16-bit P is used as stored)
        dot_rounding = (UNIT_ROUNDOFF[dtype] if backend == "triton" and dtype != torch.float32
                        and proj_dtype == torch.float32 else 0.0)
        projected = projection_bound(g64, p64, side, dot_rounding)
        r_bound = projected + U32 * (low64.abs() + projected)
        (m, dm), (v, dv), (n, dn) = adam_bounds(low64, r_bound, before[0][i], before[1][i], BETAS["beta1"],
                                                BETAS["beta2"], BETAS["eps"], *bcs[i].tolist())
        assert_stored(state[0][i], m, dm, f"exp_avgs[{i}]")
        assert_stored(state[1][i], v, dv, f"exp_avg_sqs[{i}]")
        assert_within(state[2][i], n, dn, f"outs[{i}]")


@over(PA_BACKENDS, pytest.mark.parametrize("flag", [1.0, float("nan"), 0.0]),
      pytest.mark.parametrize("with_scale", [False, True]))
def test_project_adam_found_inf_writes_nothing_and_zero_changes_nothing(backend, device, flag, with_scale):
    side, dtype = "right", torch.bfloat16
    projs = [projection(side, m, n, r, device).to(dtype) for m, n, r in SHAPES]
    grads = [torch.randn(m, n, device=device).to(dtype) for m, n, _ in SHAPES]
    state = project_adam_state(side, torch.float32, device)
    amp = dict(grad_scale=scalar(POWER_OF_TWO, device)) if with_scale else {}
    call = dict(side=side, bias_corrections=bias_corrections(1), backend=backend, **amp, **BETAS)
    # a normal call first: a Triton plan cached for these signatures without the flag must not be reused
    project_adam_foreach_(grads, projs, *state, **call)
    without_flag = clone_all(state)
    project_adam_foreach_(grads, projs, *without_flag, **call)
    before = clone_all(state)
    project_adam_foreach_(grads, projs, *state, found_inf=found(flag, device), **call)
    expected = without_flag if flag == 0.0 else before
    for name, a, b in zip(("exp_avgs", "exp_avg_sqs", "outs"), state, expected):
        assert_same_bits(a, b, f"found_inf={flag} {name}")
    if flag != 0.0:  # the call would have changed them: the test can tell a skip from a no-op
        assert not all(torch.equal(bits(a), bits(b)) for a, b in zip(without_flag[2], before[2]))


# --------------------------------------------------------------------------- back_project_update_foreach_


@over(BPU_BACKENDS, pytest.mark.parametrize("flag", [1.0, float("nan"), 0.0]),
      pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16]))
def test_back_project_update_found_inf_writes_nothing_and_zero_changes_nothing(backend, device, flag, dtype):
    side = "left"
    projs = [projection(side, m, n, r, device).to(dtype) for m, n, r in SHAPES]
    norms = [torch.randn(low_shape(side, *s), device=device) for s in SHAPES]
    params = [torch.randn(m, n, device=device).to(dtype) for m, n, _ in SHAPES]
    call = dict(side=side, coefficients=[(0.99, -0.1 * (i + 1)) for i in range(len(SHAPES))], backend=backend)
    back_project_update_foreach_(params, projs, norms, **call)  # warms a Triton plan without the flag
    without_flag = [p.clone() for p in params]
    back_project_update_foreach_(without_flag, projs, norms, **call)
    before = [p.clone() for p in params]
    back_project_update_foreach_(params, projs, norms, found_inf=found(flag, device), **call)
    assert_same_bits(params, without_flag if flag == 0.0 else before, f"found_inf={flag} params")
    assert not all(torch.equal(a, b) for a, b in zip(without_flag, before))


# --------------------------------------------------------------------------- adamw_foreach_


def adamw_case(backend, device, dtype, state_dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels take fp32/bf16/fp16 weights")
    return adamw_weights(device, dtype, state_dtype)


@over(ADAMW_BACKENDS, pytest.mark.parametrize("variant", ["galore", "torch"]),
      pytest.mark.parametrize("dtype,state_dtype", ADAMW_DTYPES))
def test_adamw_power_of_two_scale_is_the_unscaled_call_bit_for_bit(backend, device, variant, dtype, state_dtype):
    """upcast(G 2^10) / 2^10 = upcast(G) exactly (module docstring), so every later bit agrees;
    the weights include a transposed and a strided one (the copy paths)."""
    params, grads, exp_avgs, exp_avg_sqs = adamw_case(backend, device, dtype, state_dtype)
    unscaled = [params, exp_avgs, exp_avg_sqs]
    scaled = [[t.clone() for t in ts] for ts in unscaled]  # clone keeps the layouts
    for step in (1, 2):
        for g in grads:
            g.copy_(torch.randn(g.shape))
        coefficients = adamw_coefficients(variant, [step + k for k in range(len(params))])
        call = dict(variant=variant, coefficients=coefficients, backend=backend, **BETAS)
        adamw_foreach_(unscaled[0], grads, *unscaled[1:], **call)
        adamw_foreach_(scaled[0], [g * POWER_OF_TWO for g in grads], *scaled[1:],
                       grad_scale=scalar(POWER_OF_TWO, device), **call)
        for name, a, b in zip(("params", "exp_avgs", "exp_avg_sqs"), scaled, unscaled):
            assert_same_bits(a, b, f"step {step} {name}")


@pytest.mark.numerics
@over(ADAMW_BACKENDS, pytest.mark.parametrize("variant", ["galore", "torch"]),
      pytest.mark.parametrize("dtype,state_dtype", ADAMW_DTYPES))
def test_adamw_any_scale_matches_fp64_oracle_of_the_unscaled_gradient(backend, device, variant, dtype, state_dtype):
    """g = fl(upcast(G') / s) = (G' / s)(1 + d), |d| <= u: one rounding more than the unscaled
    op, on g alone. ``adamw_bounds`` with u doubled covers it: its m bound 4u (b1 |m0| +
    (1 - b1) |g|) becomes 8u (...) >= the old + (1 - b1) |g| u, its v bound 5u (b2 v0 +
    (1 - b2) g^2) becomes 10u (...) >= the old + (1 - b2) g^2 (2u + u^2), and every later term
    grows with u. fp64 weights: the oracle rounds like the backend, so twice the bound."""
    params, grads, exp_avgs, exp_avg_sqs = adamw_case(backend, device, dtype, state_dtype)
    u, factor = (2.0**-53, 2.0) if dtype == torch.float64 else (U32, 1.0)
    for g in grads:
        g.copy_(torch.randn(g.shape, dtype=torch.float64) * NOT_POWER_OF_TWO)  # G', rounded to its dtype
    coefficients = adamw_coefficients(variant, [1 + k for k in range(len(params))])
    before = [tuple(t.detach().clone().double() for t in ts) for ts in zip(params, exp_avgs, exp_avg_sqs)]
    adamw_foreach_(params, grads, exp_avgs, exp_avg_sqs, variant=variant, coefficients=coefficients, backend=backend,
                   grad_scale=scalar(NOT_POWER_OF_TWO, device), **BETAS)
    for i, (w0, m0, v0) in enumerate(before):
        (w, dw), (m, dm), (v, dv) = adamw_bounds(w0, grads[i].double() / NOT_POWER_OF_TWO, m0, v0, variant,
                                                 coefficients[i].tolist(), 2 * u)
        assert_stored(params[i], w, factor * dw, f"params[{i}]")
        assert_stored(exp_avgs[i], m, factor * dm, f"exp_avgs[{i}]")
        assert_stored(exp_avg_sqs[i], v, factor * dv, f"exp_avg_sqs[{i}]")


@over(ADAMW_BACKENDS, pytest.mark.parametrize("flag", [1.0, float("nan"), 0.0]),
      pytest.mark.parametrize("with_scale", [False, True]))
def test_adamw_found_inf_writes_nothing_and_zero_changes_nothing(backend, device, flag, with_scale):
    """bf16 weights with bf16 moments, among them a strided weight (updated through a copy)."""
    params, grads, exp_avgs, exp_avg_sqs = adamw_case(backend, device, torch.bfloat16, torch.bfloat16)
    state = [params, exp_avgs, exp_avg_sqs]
    amp = dict(grad_scale=scalar(POWER_OF_TWO, device)) if with_scale else {}
    call = dict(variant="torch", coefficients=adamw_coefficients("torch", [3] * len(params)), backend=backend,
                **amp, **BETAS)
    adamw_foreach_(state[0], grads, *state[1:], **call)
    without_flag = clone_all(state)
    adamw_foreach_(without_flag[0], grads, *without_flag[1:], **call)
    before = clone_all(state)
    adamw_foreach_(state[0], grads, *state[1:], found_inf=found(flag, device), **call)
    for name, a, b in zip(("params", "exp_avgs", "exp_avg_sqs"), state, without_flag if flag == 0.0 else before):
        assert_same_bits(a, b, f"found_inf={flag} {name}")
    assert not all(torch.equal(a, b) for a, b in zip(without_flag[0], before[0]))


# --------------------------------------------------------------------------- bad arguments

def _small_calls(device="cpu"):
    """{op: (public function, its positional lists, the lists it writes, its options)}: one small call each."""
    side = "left"
    grads = [torch.randn(m, n, device=device) for m, n, _ in SHAPES]
    projs = [projection(side, m, n, r, device) for m, n, r in SHAPES]
    lows = [[torch.randn(low_shape(side, *s), device=device).abs() for s in SHAPES] for _ in range(3)]
    params = [torch.randn(m, n, device=device) for m, n, _ in SHAPES]
    moments = [[torch.zeros(m, n, device=device) for m, n, _ in SHAPES] for _ in range(2)]
    return {
        "project_adam_foreach": (project_adam_foreach_, (grads, projs, *lows), lows,
                                 dict(side=side, bias_corrections=bias_corrections(1), **BETAS)),
        "back_project_update_foreach": (back_project_update_foreach_, (params, projs, lows[2]), [params],
                                        dict(side=side, coefficients=[(0.9, -0.1)] * len(SHAPES))),
        "adamw_foreach": (adamw_foreach_, (params, grads, *moments), [params, *moments],
                          dict(variant="galore", coefficients=[(-0.1, 0.0)] * len(SHAPES), **BETAS)),
    }


AMP_ARGS = {"project_adam_foreach": ("grad_scale", "found_inf"), "back_project_update_foreach": ("found_inf",),
            "adamw_foreach": ("grad_scale", "found_inf")}
BAD_VALUES = [
    ("two elements", lambda: torch.ones(2), ValueError, r"must be a floating tensor with exactly one element, "
                                                        r"got shape \(2,\) of torch.float32"),
    ("integer dtype", lambda: torch.tensor(1024), ValueError, r"must be a floating tensor with exactly one element, "
                                                              r"got shape \(\) of torch.int64"),
    ("a number", lambda: 1024.0, TypeError, r"must be None or a torch.Tensor with one element, got float 1024.0"),
    ("another device", lambda: torch.ones((), device="meta"), ValueError, r"is on meta; expected cpu"),
]
BAD_CASES = [(op, arg, *bad) for op, args in AMP_ARGS.items() for arg in args for bad in BAD_VALUES]


def _op_options(options):
    """The public functions' options as the op takes them: per-weight numbers as float64 tensors."""
    return {k: (torch.tensor(v, dtype=torch.float64) if k in ("bias_corrections", "coefficients")
                and not isinstance(v, torch.Tensor) else v) for k, v in options.items()}


@pytest.mark.parametrize("op,arg,what,make,error,pattern", BAD_CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in BAD_CASES])
def test_bad_grad_scale_or_found_inf_names_it_and_changes_nothing(op, arg, what, make, error, pattern):
    fn, lists, written, options = _small_calls()[op]
    before = clone_all(written)
    with pytest.raises(error, match=rf"{op}_: {arg} {pattern}"):
        fn(*lists, **options, **{arg: make()})
    for a, b in zip(written, before):
        assert_same_bits(a, b, "written")
    if what == "a number":  # the op's schema itself refuses a number for a Tensor? argument
        return
    # the fake implementation (torch.compile tracing) raises the same, on meta weights
    meta = [[t.to("meta") for t in ts] for ts in lists]
    bad, pattern = (torch.ones(()), r"is on cpu; expected meta") if what == "another device" else (make(), pattern)
    with pytest.raises(error, match=rf"{op}_: {arg} {pattern}"):
        getattr(torch.ops.owlore, f"{op}_")(*meta, **_op_options(options), **{arg: bad})


@pytest.mark.parametrize("backend,device", [p for p in PA_BACKENDS if p.id == "cpp-cpu"])
def test_cpp_kernels_refuse_bad_grad_scale_and_found_inf_on_direct_calls(backend, device):
    """Called through the dispatcher without the Python checks, the C++ kernels name the argument."""
    calls = _small_calls()
    for op, args in AMP_ARGS.items():
        _, lists, written, options = calls[op]
        options = _op_options(options)
        before = clone_all(written)
        for arg in args:
            for bad, pattern in ((torch.ones(2), r"must be a floating tensor with exactly one element, got shape \[2\]"),
                                 (torch.tensor(1), r"must be a floating tensor with exactly one element, got shape "
                                                   r"\[\] of Long")):
                with pytest.raises(RuntimeError, match=rf"{arg} {pattern}"):
                    getattr(torch.ops.owlore, f"{op}_")(*lists, **options, **{arg: bad})
        for a, b in zip(written, before):
            assert_same_bits(a, b, f"{op} written")


# --------------------------------------------------------------------------- tracing

def test_ops_run_with_grad_scale_and_found_inf_under_fake_tensor_mode():
    """Memory traces run the optimizer step on fake tensors: the ops take GradScaler's tensors
    there (no value is read) and still refuse a bad one."""
    with FakeTensorMode():
        calls = _small_calls()
        for op, (fn, lists, _, options) in calls.items():
            amp = {arg: torch.ones((), dtype=torch.float32) for arg in AMP_ARGS[op]}
            fn(*lists, **options, **amp)
            with pytest.raises(ValueError, match=rf"{op}_: found_inf must be a floating tensor with exactly one"):
                fn(*lists, **options, found_inf=torch.ones(3))


@pytest.mark.parametrize("op", ["project_adam_foreach", "back_project_update_foreach", "adamw_foreach"])
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_opcheck_with_grad_scale_and_found_inf(op, backend):
    """Schema (grad_scale and found_inf are read, never written), fake implementation, autograd
    registration and AOT dispatch with both arguments given."""
    from owlore_kernels import ops

    if backend not in ops._REGISTRY[op]:
        pytest.skip(f"{backend} implements no {op}")
    device = torch.device("cpu")
    overload, args, kwargs = _opcheck_cases(device)[op]
    kwargs = dict(kwargs, found_inf=torch.zeros(1))
    if op != "back_project_update_foreach":
        kwargs["grad_scale"] = torch.full((), 8.0)
    with dispatching_to(op, backend, device):
        torch.library.opcheck(overload, args, kwargs, test_utils=OPCHECK_UTILS)


def test_compiled_step_takes_grad_scale_and_found_inf_as_graph_inputs():
    """A compiled step with GradScaler's tensors reuses its graph when their values change (a
    new scale, an overflowed step), and matches the eager step bit for bit (same kernels)."""
    import torch._dynamo.testing

    def step(grads, projs, exp_avgs, exp_avg_sqs, outs, params, moments, bcs, coefficients, grad_scale, found_inf):
        project_adam_foreach_(grads, projs, exp_avgs, exp_avg_sqs, outs, side="left", bias_corrections=bcs,
                              grad_scale=grad_scale, found_inf=found_inf, **BETAS)
        back_project_update_foreach_(params, projs, outs, side="left", coefficients=coefficients,
                                     found_inf=found_inf)
        adamw_foreach_(params, grads, *moments, variant="galore", coefficients=coefficients, grad_scale=grad_scale,
                       found_inf=found_inf, **BETAS)

    def state():
        torch.manual_seed(1)
        grads = [torch.randn(m, n) for m, n, _ in SHAPES]
        projs = [projection("left", *s) for s in SHAPES]
        lows = [[torch.rand(r, n) for _, n, r in SHAPES] for _ in range(3)]
        params = [torch.randn(m, n) for m, n, _ in SHAPES]
        return grads, projs, *lows, params, [[torch.zeros(m, n) for m, n, _ in SHAPES] for _ in range(2)]

    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(step, fullgraph=True, backend=counter)
    eager_state, compiled_state = state(), state()
    coefficients = torch.tensor([[0.99, -0.1]] * len(SHAPES), dtype=torch.float64)
    for t, (scale, flag) in enumerate([(2.0**16, 0.0), (2.0**16, 1.0), (2.0**15, 0.0)], start=1):
        numbers = (bias_corrections(t), coefficients, torch.full((), scale), torch.full((1,), flag))
        step(*eager_state, *numbers)
        compiled(*compiled_state, *numbers)
    assert counter.frame_count == 1, counter.frame_count
    for a, b in zip(eager_state, compiled_state):
        assert_same_bits(b if isinstance(b[0], torch.Tensor) else [x for y in b for x in y],
                         a if isinstance(a[0], torch.Tensor) else [x for y in a for x in y], "state")
