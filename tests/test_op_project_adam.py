"""torch.ops.owlore.project_adam_ on every backend, against an fp64 evaluation of its formula.

Tolerance (see ``op_samples.projection_bound`` and ``adam_bounds``): R's entries are dot
products of length K (m for side="left", n for "right") of inputs that are exact in fp32
(bf16/fp16 G upcasts exactly), so any summation order puts R within
gamma_{K+1} * (|P|^T |G|) of the exact value, about (K+1) * 2^-24 times the sum of the
absolute products; Triton's tensor-core dot for bf16/fp16 G also rounds P to G's type,
adding 2^-8 (bf16) or 2^-11 (fp16) times the same sum. That bound is carried through
Adam's moments and N elementwise, with fp32 rounding of each operation added. A fixed
atol would not do: R entries near 0 have large relative error, and N = m/(sqrt(v)+eps)
magnifies that where sqrt(v) is near eps; the bound follows each entry instead.

Shapes cross the C++ kernel's tile and staging boundaries (tiles at most
min(2048, 262144 // r) wide, fp32 G staged 256 rows at a time when its row stride is
a multiple of 4 KB, e.g. n = 1024), with ranks 1, odd, 64 and above 128.
"""
from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing

from op_samples import (over_projection_cases, DTYPES, SIDES, UNIT_ROUNDOFF, LargestNewTensor, adam_bounds, assert_within,
                        backend_device_params, dispatching_to, interpreted, low_shape, projection, projection_bound)
from owlore_kernels.ops.project_adam import project_adam_

# rerun by `make test` on torch's generic CPU kernels (other summation orders)
pytestmark = pytest.mark.numerics

BACKENDS = backend_device_params("project_adam")
# (m, n, r): odd shapes; rank 1, odd ranks, 64, 128 and 130 (two r-tiles in Triton);
# 4097-wide rows; n = 1024 sends fp32 G through the C++ staged path on the left side
CASES = [(67, 131, 5), (1, 5, 1), (131, 67, 16), (67, 131, 64), (130, 4097, 17), (1100, 67, 3),
         (300, 600, 128), (520, 1100, 130), (300, 1024, 7)]
INTERPRETER_CASES = [(67, 131, 5), (1, 5, 1), (131, 67, 16), (67, 131, 64)]  # ~1 ms per program there
BETAS = dict(beta1=0.9, beta2=0.999, eps=1e-6)


def dot_rounding(backend: str, dtype: torch.dtype) -> float:
    """Extra relative error per product: Triton's bf16/fp16 dot rounds P to G's type."""
    return UNIT_ROUNDOFF[dtype] if backend == "triton" and dtype != torch.float32 else 0.0


def check_against_oracle(backend, grad, proj, side, before, after, out, bc1, bc2, betas=BETAS):
    """``before``/``after``: (exp_avg, exp_avg_sq) as the op found and left them."""
    g64, p64 = grad.double(), proj.double()
    low64 = p64.t().mm(g64) if side == "left" else g64.mm(p64.t())
    r_bound = projection_bound(g64, p64, side, dot_rounding(backend, grad.dtype))
    (m, dm), (v, dv), (n, dn) = adam_bounds(low64, r_bound, before[0].double(), before[1].double(),
                                            betas["beta1"], betas["beta2"], betas["eps"], bc1, bc2)
    assert_within(after[0], m, dm, "exp_avg")
    assert_within(after[1], v, dv, "exp_avg_sq")
    assert_within(out, n, dn, "N")


@over_projection_cases(BACKENDS, CASES)
def test_matches_fp64_oracle(backend, device, dtype, side, m, n, r):
    if interpreted(backend, device) and (m, n, r) not in INTERPRETER_CASES:
        pytest.skip("large for the Triton interpreter")
    proj = projection(side, m, n, r, device)
    exp_avg = torch.zeros(low_shape(side, m, n, r), device=device)
    exp_avg_sq = torch.zeros_like(exp_avg)
    for step in (1, 2):  # from zero moments (the first update), then from the moments the op wrote
        grad = torch.randn(m, n, device=device).to(dtype)
        before = (exp_avg.clone(), exp_avg_sq.clone())
        bc1, bc2 = 1 - BETAS["beta1"] ** step, 1 - BETAS["beta2"] ** step
        out = project_adam_(grad, proj, exp_avg, exp_avg_sq, side=side, bias_correction1=bc1,
                            bias_correction2=bc2, backend=backend, **BETAS)
        assert out.dtype == torch.float32 and out.shape == exp_avg.shape
        check_against_oracle(backend, grad, proj, side, before, (exp_avg, exp_avg_sq), out, bc1, bc2)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("side", SIDES)
def test_strided_inputs_moments_and_out(backend, device, side):
    """Column-major G and projection, moments and ``out`` as transposed views (the C++
    epilogue's non-unit-stride path), warm moments, galore-torch's bias correction of 1."""
    m, n, r = 90, 70, 9
    grad = torch.randn(n, m, device=device).t()
    proj = projection(side, m, n, r, device).t().contiguous().t()
    shape = low_shape(side, m, n, r)
    exp_avg = (torch.randn(shape[::-1], device=device) * 0.1).t()
    exp_avg_sq = (torch.rand(shape[::-1], device=device) + 0.5).t()
    out = torch.full(shape[::-1], float("nan"), device=device).t()
    before = (exp_avg.clone(), exp_avg_sq.clone())
    betas = dict(beta1=0.8, beta2=0.99, eps=1e-8)
    result = project_adam_(grad, proj, exp_avg, exp_avg_sq, side=side, bias_correction1=1.0, bias_correction2=1.0,
                           out=out, backend=backend, **betas)
    assert result is out
    check_against_oracle(backend, grad, proj, side, before, (exp_avg, exp_avg_sq), out, 1.0, 1.0, betas)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_operands_with_no_unit_stride(backend, device, side, dtype):
    """G, the projection, the moments and ``out`` as every-other-row, every-third-column slices:
    no unit stride, which BLAS cannot read in place (the C++ tile GEMMs take another path)."""
    m, n, r = 45, 38, 6

    def sliced(shape, fill):
        return fill((shape[0] * 2, shape[1] * 3))[::2, ::3]

    grad = sliced((m, n), lambda s: torch.randn(s, device=device)).to(dtype)
    dense = projection(side, m, n, r, device)
    proj = sliced(tuple(dense.shape), lambda s: torch.zeros(s, device=device))
    proj.copy_(dense)
    shape = low_shape(side, m, n, r)
    exp_avg = sliced(shape, lambda s: torch.randn(s, device=device) * 0.1)
    exp_avg_sq = sliced(shape, lambda s: torch.rand(s, device=device) + 0.5)
    out = sliced(shape, lambda s: torch.full(s, float("nan"), device=device))
    before = (exp_avg.clone(), exp_avg_sq.clone())
    project_adam_(grad, proj, exp_avg, exp_avg_sq, side=side, bias_correction1=0.5, bias_correction2=0.25, out=out,
                  backend=backend, **BETAS)
    check_against_oracle(backend, grad, proj, side, before, (exp_avg, exp_avg_sq), out, 0.5, 0.25)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_runs_under_inference_mode(backend, device):
    """The C++ tile loops run on worker threads, which must see the caller's inference
    mode: inference tensors may only be updated in place inside it."""
    m, n, r = (67, 131, 5) if interpreted(backend, device) else (300, 1100, 7)  # several tiles per thread
    with torch.inference_mode():
        grad, proj = torch.randn(m, n, device=device), projection("left", m, n, r, device)
        exp_avg, exp_avg_sq = torch.zeros(r, n, device=device), torch.zeros(r, n, device=device)
        out = project_adam_(grad, proj, exp_avg, exp_avg_sq, side="left", bias_correction1=0.1,
                            bias_correction2=0.001, backend=backend, **BETAS)
    assert exp_avg.abs().sum() > 0 and torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("side", SIDES)
def test_reference_makes_no_full_size_temporary(dtype, side):
    """The reference upcasts a 16-bit G a row chunk (~1M entries) at a time, never whole."""
    m, n, r = 1536, 1024, 8  # 1.5M entries, more than one chunk
    grad, proj = torch.randn(m, n).to(dtype), projection(side, m, n, r)
    exp_avg = torch.zeros(low_shape(side, m, n, r))
    with LargestNewTensor() as mode:
        project_adam_(grad, proj, exp_avg, exp_avg.clone(), side=side, bias_correction1=1.0, bias_correction2=1.0,
                      backend="torch", **BETAS)
    assert 0 < mode.largest < grad.numel(), mode.largest


# --------------------------------------------------------------------------- argument checks


def _args(side="left", m=30, n=50, r=4):
    grad, proj = torch.randn(m, n), projection(side, m, n, r)
    shape = low_shape(side, m, n, r)
    return grad, proj, torch.zeros(shape), torch.zeros(shape)


BAD_ARGUMENTS = [
    # (what is wrong, change to the good arguments, error type, message pattern)
    ("side", dict(side="up"), ValueError, r"side must be one of \('left', 'right'\), got 'up'"),
    ("proj rows", dict(proj=torch.randn(29, 4)), ValueError, r"side='left'.*got proj \(29, 4\)"),
    ("moment shape", dict(exp_avg=torch.zeros(4, 49)), ValueError, r"subspace \(4, 49\)"),
    ("exp_avg_sq shape", dict(exp_avg_sq=torch.zeros(4, 49)), ValueError, r"exp_avg_sq shape \(4, 49\)"),
    ("grad dtype", dict(grad=torch.randn(30, 50, dtype=torch.float64)), ValueError, r"grad must have dtype.*float64"),
    ("moment dtype", dict(exp_avg=torch.zeros(4, 50, dtype=torch.float16)), ValueError, r"exp_avg must have dtype"),
    ("out shape", dict(out=torch.zeros(4, 49)), ValueError, r"out shape \(4, 49\)"),
    ("bias correction 0", dict(bias_correction1=0.0), ValueError, r"bias_correction1 must be in \(0, 1\].*got 0.0"),
    ("bias correction > 1", dict(bias_correction2=1.5), ValueError, r"bias_correction2 must be in \(0, 1\].*1.5"),
    ("not a tensor", dict(grad=[[1.0]]), TypeError, r"grad must be a torch.Tensor, got list"),
]


@pytest.mark.parametrize("what,change,error,pattern", BAD_ARGUMENTS, ids=[b[0] for b in BAD_ARGUMENTS])
def test_bad_arguments_raise_before_anything_changes(what, change, error, pattern):
    grad, proj, exp_avg, exp_avg_sq = _args()
    kwargs = dict(grad=grad, proj=proj, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, side="left", bias_correction1=1.0,
                  bias_correction2=1.0, **BETAS)
    kwargs.update(change)
    before = [t.clone() for t in (exp_avg, exp_avg_sq)]
    with pytest.raises(error, match=pattern):
        project_adam_(**kwargs)
    assert all(torch.equal(a, b) for a, b in zip((exp_avg, exp_avg_sq), before))
    if what == "not a tensor":
        return
    # the fake implementation raises the same error while tracing (meta tensors here)
    meta = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    out = meta.pop("out", torch.empty(meta["exp_avg"].shape, device="meta"))
    with pytest.raises(error, match=pattern):
        torch.ops.owlore.project_adam_(meta.pop("grad"), meta.pop("proj"), meta.pop("exp_avg"),
                                       meta.pop("exp_avg_sq"), out, **meta)


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.id == "cpp-cpu"])
def test_cpp_kernel_guards_memory_on_direct_calls(backend, device):
    """Called directly (no Python checks), the C++ kernel still refuses shapes it would
    read out of bounds with."""
    grad, proj, exp_avg, exp_avg_sq = _args()
    with pytest.raises(RuntimeError, match="proj shape"):
        torch.ops.owlore.project_adam_(grad, torch.randn(29, 4), exp_avg, exp_avg_sq, torch.empty_like(exp_avg),
                                       side="left", bias_correction1=1.0, bias_correction2=1.0, **BETAS)


# --------------------------------------------------------------------------- torch.library / torch.compile


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("side,dtype", [("left", torch.float32), ("right", torch.bfloat16)])
@pytest.mark.parametrize("overload", ["default", "tensor"])
def test_opcheck(backend, device, side, dtype, overload):
    """Schema (only exp_avg, exp_avg_sq and out are written), fake implementation, autograd
    registration and AOT dispatch (functionalized, static and dynamic shapes), with the
    dispatcher running this backend's kernel; for both overloads (bias corrections as
    numbers, or as 0-dim CPU tensors)."""
    m, n, r = 19, 37, 5
    grad, proj = torch.randn(m, n, device=device).to(dtype), projection(side, m, n, r, device)
    shape = low_shape(side, m, n, r)
    args = (grad, proj, torch.randn(shape, device=device), torch.rand(shape, device=device),
            torch.empty(shape, device=device))
    scalar = (lambda x: torch.tensor(x, dtype=torch.float64)) if overload == "tensor" else float
    kwargs = dict(side=side, bias_correction1=scalar(0.19), bias_correction2=scalar(0.002), **BETAS)
    with dispatching_to("project_adam", backend, device):
        torch.library.opcheck(getattr(torch.ops.owlore.project_adam_, overload), args, kwargs,
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                          "test_aot_dispatch_static", "test_aot_dispatch_dynamic"))


def test_tensor_bias_corrections_compile_fullgraph_once_without_config():
    """Bias corrections as 0-dim CPU tensors (the ``.tensor`` overload) are graph inputs with
    torch.compile's defaults: one compile for all steps (dynamo may restart its first analysis once, which is not
    a recompile), the eager kernel's result bit for bit."""
    m, n, r = 40, 24, 4

    def step(grad, proj, exp_avg, exp_avg_sq, bc1, bc2):
        return project_adam_(grad, proj, exp_avg, exp_avg_sq, side="left", bias_correction1=bc1,
                             bias_correction2=bc2, **BETAS)

    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(step, fullgraph=True, backend=counter)
    proj = projection("left", m, n, r)
    state, eager_state = [torch.zeros(r, n), torch.zeros(r, n)], [torch.zeros(r, n), torch.zeros(r, n)]
    for t in range(1, 4):
        grad = torch.randn(m, n)
        bc1, bc2 = 1 - 0.9**t, 1 - 0.999**t
        with torch._dynamo.config.patch(error_on_recompile=t > 1):
            out = compiled(grad, proj, *state, torch.tensor(bc1, dtype=torch.float64), torch.tensor(bc2, dtype=torch.float64))
        want = step(grad, proj, *eager_state, bc1, bc2)  # numbers: the default overload
        assert torch.equal(out, want) and all(map(torch.equal, state, eager_state))
    assert counter.frame_count >= 1 and "owlore.project_adam_.tensor" in counter.graphs[-1].code


@pytest.mark.parametrize("value,pattern", [
    (torch.tensor([0.5]), r"bias_correction1 must be a 0-dim floating CPU tensor, got shape \(1,\)"),
    (torch.tensor(1.5, dtype=torch.float64), r"bias_correction1 must be in \(0, 1\].*got 1.5"),
    (torch.tensor(0.0), r"bias_correction1 must be in \(0, 1\].*got 0.0"),
])
def test_bad_tensor_bias_corrections_raise_before_anything_changes(value, pattern):
    grad, proj, exp_avg, exp_avg_sq = _args()
    before = [t.clone() for t in (exp_avg, exp_avg_sq)]
    with pytest.raises(ValueError, match=pattern):
        project_adam_(grad, proj, exp_avg, exp_avg_sq, side="left", bias_correction1=value, bias_correction2=1.0,
                      **BETAS)
    assert all(torch.equal(a, b) for a, b in zip((exp_avg, exp_avg_sq), before))


@torch._dynamo.config.patch(capture_scalar_outputs=True)
def test_compiles_fullgraph_without_recompiling_per_step():
    """A compiled step whose bias corrections come in as tensors (read with ``.item()``: the
    op's Scalar arguments take the traced value, so nothing is specialised on it) compiles
    once for many steps and matches eager."""
    m, n, r = 40, 24, 4

    def step(grad, proj, exp_avg, exp_avg_sq, bc1, bc2):
        return project_adam_(grad, proj, exp_avg, exp_avg_sq, side="right", bias_correction1=bc1.item(),
                             bias_correction2=bc2.item(), **BETAS)

    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(step, fullgraph=True, backend=counter)
    proj = projection("right", m, n, r)
    state = [torch.zeros(m, r), torch.zeros(m, r)]
    eager_state = [torch.zeros(m, r), torch.zeros(m, r)]
    for t in range(1, 4):
        grad = torch.randn(m, n)
        bias_corrections = torch.tensor(1 - 0.9**t), torch.tensor(1 - 0.999**t)
        out = compiled(grad, proj, *state, *bias_corrections)
        want = step(grad, proj, *eager_state, *bias_corrections)
        # the same kernel on the same inputs: identical
        torch.testing.assert_close(out, want, rtol=0, atol=0)
        torch.testing.assert_close(state, eager_state, rtol=0, atol=0)
    assert counter.frame_count == 1


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.id.startswith("triton")])
def test_triton_launcher_guards_memory_on_direct_calls(backend, device):
    from owlore_kernels.kernels import project_adam_launch

    grad, proj = torch.randn(67, 131, device=device), torch.randn(67, 5, device=device)
    bad, good = torch.zeros(5, 130, device=device), torch.zeros(5, 131, device=device)
    with pytest.raises(ValueError):
        project_adam_launch(grad, proj, bad, bad.clone(), bad.clone(), "left", 0.9, 0.999, 1e-6, 1.0, 1.0)
    with pytest.raises(ValueError):
        project_adam_launch(grad, proj, good, good.clone(), good.clone(), "up", 0.9, 0.999, 1e-6, 1.0, 1.0)


_EPILOGUE_PROBE = """
import sys, torch
from owlore_kernels.ops.project_adam import project_adam_
results = []
for grad, proj, exp_avg, exp_avg_sq in torch.load(sys.argv[1]):
    out = project_adam_(grad, proj, exp_avg, exp_avg_sq, side="left", beta1=0.9, beta2=0.999, eps=1e-6,
                        bias_correction1=0.19, bias_correction2=0.002, out=torch.empty(exp_avg.shape), backend="cpp")
    results += [exp_avg, exp_avg_sq, out]
torch.save(results, sys.argv[2])
"""


@pytest.mark.skipif("cpp" not in __import__("owlore_kernels.ops", fromlist=["_REGISTRY"])._REGISTRY["project_adam"],
                    reason="the C++ extension did not load")
def test_cpp_epilogue_copies_agree_bit_for_bit(tmp_path):
    """The C++ Adam epilogue has a copy compiled for AVX2 (8 lanes) and a baseline one (4 lanes),
    chosen by torch's CPU capability; ATEN_CPU_CAPABILITY=default selects the baseline one. Both
    round every +, *, / and sqrt correctly, so from the same inputs (made here, once: torch's own
    random kernels differ by capability) moments and N must agree bit for bit (fp32 and bf16
    moments, 203 columns: full vectors and a remainder). On a CPU without AVX2 both runs take the
    baseline copy."""
    import os
    import subprocess
    import sys

    torch.manual_seed(0)
    inputs = [(torch.randn(37, 203), torch.linalg.qr(torch.randn(37, 9))[0], (torch.randn(9, 203) * 0.1).to(dtype),
               (torch.rand(9, 203) + 0.01).to(dtype)) for dtype in (torch.float32, torch.bfloat16)]
    torch.save(inputs, tmp_path / "inputs.pt")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runs = {}
    for capability in ("default", None):
        env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
        if capability is not None:
            env["ATEN_CPU_CAPABILITY"] = capability
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        path = tmp_path / f"{capability}.pt"
        proc = subprocess.run([sys.executable, "-c", _EPILOGUE_PROBE, str(tmp_path / "inputs.pt"), str(path)],
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[capability] = torch.load(path)
    for baseline, wide in zip(runs["default"], runs[None]):
        assert baseline.dtype == wide.dtype and torch.equal(baseline, wide)
