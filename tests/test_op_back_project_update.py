"""torch.ops.owlore.back_project_update_ on every backend, against an fp64 evaluation of
W <- beta W + alpha (A B), with (A, B) = (P, N) for side="left" and (N, Q) for "right".

Tolerance: each entry of A B is a dot product of length r of fp32 values, within
gamma_r * (|A| |B|) of the exact value in any summation order (``op_samples.gamma``);
scaling by alpha and beta, the fp32 rounding of alpha and beta, and the addition add at
most 5 more roundings, so the fp32 result x obeys
|x - W'| <= gamma_{r+5} (|beta W| + |alpha| (|A| |B|)). Triton's tensor-core dot for a
bf16/fp16 W rounds A and B to W's type first: 2 u16 more per product. A bf16/fp16 W then
stores round-to-nearest-even(x), which is bracketed exactly by rounding the two ends of
that interval (``op_samples.rounded_bracket``): no "1 ulp" allowance is needed.

Shapes cross the C++ tiles (fp32: full-height panels at most 2048 wide, a thread-count
multiple of them; bf16/fp16: 512 x 512 tiles) and end mid-tile.
"""
from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing

from op_samples import (over_projection_cases, DTYPES, SIDES, UNIT_ROUNDOFF, LargestNewTensor, assert_within, backend_device_params,
                        dispatching_to, gamma, interpreted, low_shape, projection, rounded_bracket)
from owlore_kernels.ops.back_project_update import back_project_update_

# rerun by `make test` on torch's generic CPU kernels (other summation orders)
pytestmark = pytest.mark.numerics

BACKENDS = backend_device_params("back_project_update")
CASES = [(67, 131, 5), (1, 5, 1), (131, 67, 16), (67, 131, 64), (130, 4097, 17), (600, 1100, 128), (2100, 520, 3)]
INTERPRETER_CASES = [(67, 131, 5), (1, 5, 1), (131, 67, 16), (67, 131, 64)]
# torch.optim.AdamW-style decay (beta = 1 - lr wd) and a step (alpha = -lr scale) large
# enough that most results are inexact in bf16, so the rounding is exercised
BETA, ALPHA = 1 - 0.05 * 0.1, -0.05 * 4.0


def dot_rounding(backend: str, dtype: torch.dtype) -> float:
    return 2 * UNIT_ROUNDOFF[dtype] if backend == "triton" and dtype != torch.float32 else 0.0


def check_against_oracle(backend, before, after, proj, norm, side, beta, alpha):
    w64, p64, n64 = before.double(), proj.double(), norm.double()
    a, b = (p64, n64) if side == "left" else (n64, p64)
    exact = beta * w64 + alpha * a.mm(b)
    r = a.shape[1]
    bound = gamma(r + 5) * (abs(beta) * w64.abs() + abs(alpha) * a.abs().mm(b.abs()))
    bound += dot_rounding(backend, before.dtype) * abs(alpha) * a.abs().mm(b.abs())
    if after.dtype == torch.float32:
        assert_within(after, exact, bound, "W")
        return
    lo, hi = rounded_bracket(exact, bound, after.dtype)
    outside = (after < lo) | (after > hi)
    assert not bool(outside.any()), (
        f"{int(outside.sum())} of {after.numel()} entries are not a rounding of a value within the bound; "
        f"first: {after[outside][0].item()} not in [{lo[outside][0].item()}, {hi[outside][0].item()}]")


@over_projection_cases(BACKENDS, CASES)
def test_matches_fp64_oracle(backend, device, dtype, side, m, n, r):
    if interpreted(backend, device) and (m, n, r) not in INTERPRETER_CASES:
        pytest.skip("large for the Triton interpreter")
    proj = projection(side, m, n, r, device)
    norm = torch.randn(low_shape(side, m, n, r), device=device)
    weight = torch.nn.Parameter(torch.randn(m, n, device=device).to(dtype))  # a leaf that requires grad
    before = weight.detach().clone()
    with torch.no_grad():  # as in optimizer.step()
        returned = back_project_update_(weight, proj, norm, side=side, beta=BETA, alpha=ALPHA, backend=backend)
    assert returned is weight
    check_against_oracle(backend, before, weight.detach(), proj, norm, side, BETA, ALPHA)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transposed_weight_is_updated_through_its_strides(backend, device, dtype):
    m, n, r = (67, 131, 5) if interpreted(backend, device) else (300, 520, 7)
    storage = torch.randn(n, m, device=device).to(dtype)
    weight = storage.t()  # column-major W: the C++ tiles are column-major views
    before = weight.clone()
    proj, norm = projection("left", m, n, r, device), torch.randn(r, n, device=device)
    back_project_update_(weight, proj, norm, side="left", beta=1.0, alpha=-1e-2, backend=backend)
    check_against_oracle(backend, before, storage.t(), proj, norm, "left", 1.0, -1e-2)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_operands_with_no_unit_stride(backend, device, side, dtype):
    """W, the projection and N as every-other-row, every-third-column slices: no unit stride, which
    BLAS cannot read or write in place (the C++ tile GEMMs take another path)."""
    m, n, r = 45, 38, 6

    def sliced(dense):
        big = torch.zeros(dense.shape[0] * 2, dense.shape[1] * 3, device=device, dtype=dense.dtype)
        big[::2, ::3] = dense
        return big[::2, ::3]

    weight = sliced(torch.randn(m, n, device=device).to(dtype))
    proj = sliced(projection(side, m, n, r, device))
    norm = sliced(torch.randn(low_shape(side, m, n, r), device=device))
    before = weight.clone()
    back_project_update_(weight, proj, norm, side=side, beta=BETA, alpha=ALPHA, backend=backend)
    check_against_oracle(backend, before, weight, proj, norm, side, BETA, ALPHA)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype,half_ulp", [(torch.bfloat16, 2.0**-8), (torch.float16, 2.0**-11)])
def test_store_rounds_ties_to_even(backend, device, dtype, half_ulp):
    """1 + half an ulp lies exactly between 1 and the next value up: nearest-even gives 1
    (even mantissa), truncation and round-half-up disagree with each other. From 1 + 1 ulp
    (odd mantissa) the same step is a tie that goes up to 1 + 2 ulps."""
    proj = torch.ones(3, 1, device=device)
    norm = torch.full((1, 4), half_ulp, device=device)  # exact in fp32, bf16 and fp16
    w = torch.ones(3, 4, dtype=dtype, device=device)
    back_project_update_(w, proj, norm, side="left", beta=1.0, alpha=1.0, backend=backend)
    assert torch.equal(w, torch.ones(3, 4, dtype=dtype, device=device))
    w = torch.full((3, 4), 1.0 + 2 * half_ulp, dtype=dtype, device=device)
    back_project_update_(w, proj, norm, side="left", beta=1.0, alpha=1.0, backend=backend)
    assert torch.equal(w, torch.full((3, 4), 1.0 + 4 * half_ulp, dtype=dtype, device=device))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_rank_zero_only_decays_and_empty_weight_is_a_no_op(backend, device):
    weight = torch.randn(6, 9, device=device)
    want = weight * 0.95
    back_project_update_(weight, torch.zeros(6, 0, device=device), torch.zeros(0, 9, device=device), side="left",
                         beta=0.95, alpha=-0.1, backend=backend)
    torch.testing.assert_close(weight, want, rtol=2**-23, atol=0)  # one fp32 rounding of beta W
    empty = torch.zeros(0, 9, device=device)
    back_project_update_(empty, torch.zeros(0, 3, device=device), torch.zeros(3, 9, device=device), side="left",
                         beta=0.95, alpha=-0.1, backend=backend)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_runs_under_inference_mode(backend, device):
    """The C++ tiles run on worker threads, which must see the caller's inference mode."""
    m, n, r = (67, 131, 5) if interpreted(backend, device) else (300, 1100, 7)
    with torch.inference_mode():
        weight, norm = torch.randn(m, n, device=device), torch.randn(r, n, device=device)
        before = weight.clone()
        back_project_update_(weight, projection("left", m, n, r, device), norm, side="left", beta=1.0, alpha=-0.1,
                             backend=backend)
    assert not torch.equal(weight, before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reference_makes_no_full_size_temporary(dtype):
    """The reference upcasts a 16-bit W a row chunk (~1M entries) at a time, never whole."""
    m, n, r = 1536, 1024, 8
    weight, proj, norm = torch.randn(m, n).to(dtype), projection("left", m, n, r), torch.randn(r, n)
    with LargestNewTensor() as mode:
        back_project_update_(weight, proj, norm, side="left", beta=0.99, alpha=-0.1, backend="torch")
    assert 0 < mode.largest < weight.numel(), mode.largest


# --------------------------------------------------------------------------- argument checks

BAD_ARGUMENTS = [
    ("side", dict(side="up"), ValueError, r"side must be one of \('left', 'right'\), got 'up'"),
    ("right shapes", dict(side="right"), ValueError, r"side='right': weight \(30, 50\) needs proj \(r, n\)"),
    ("proj dtype", dict(proj=torch.randn(30, 4, dtype=torch.float64)), ValueError, r"proj must have dtype.*float64"),
    ("param dtype", dict(param=torch.randn(30, 50, dtype=torch.float64)), ValueError, r"param must have dtype"),
    ("1-D param", dict(param=torch.randn(1500)), ValueError, r"expected 2-D tensors, got \(1500,\)"),
]


@pytest.mark.parametrize("what,change,error,pattern", BAD_ARGUMENTS, ids=[b[0] for b in BAD_ARGUMENTS])
def test_bad_arguments_raise_before_anything_changes(what, change, error, pattern):
    kwargs = dict(param=torch.randn(30, 50), proj=torch.randn(30, 4), norm_update=torch.randn(4, 50), side="left",
                  beta=0.9, alpha=-0.1)
    kwargs.update(change)
    before = kwargs["param"].clone()
    with pytest.raises(error, match=pattern):
        back_project_update_(**kwargs)
    assert torch.equal(kwargs["param"], before)
    meta = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    with pytest.raises(error, match=pattern):  # the fake implementation, as torch.compile runs it
        torch.ops.owlore.back_project_update_(meta.pop("param"), meta.pop("proj"), meta.pop("norm_update"), **meta)


# --------------------------------------------------------------------------- torch.library / torch.compile


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("side,dtype", [("left", torch.float32), ("right", torch.bfloat16)])
@pytest.mark.parametrize("overload", ["default", "tensor"])
def test_opcheck(backend, device, side, dtype, overload):
    """Schema (only param is written), fake implementation, autograd registration and AOT
    dispatch (static and dynamic shapes), with the dispatcher running this backend's kernel;
    for both overloads (beta and alpha as numbers, or as 0-dim CPU tensors)."""
    m, n, r = 19, 37, 5
    args = (torch.randn(m, n, device=device).to(dtype), projection(side, m, n, r, device),
            torch.randn(low_shape(side, m, n, r), device=device))
    scalar = (lambda x: torch.tensor(x, dtype=torch.float64)) if overload == "tensor" else float
    with dispatching_to("back_project_update", backend, device):
        torch.library.opcheck(getattr(torch.ops.owlore.back_project_update_, overload), args,
                              dict(side=side, beta=scalar(0.99), alpha=scalar(-0.1)),
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                          "test_aot_dispatch_static", "test_aot_dispatch_dynamic"))


@torch._dynamo.config.patch(capture_scalar_outputs=True)
def test_compiles_fullgraph_in_place_without_recompiling_per_step():
    """beta and alpha change every step with the learning rate; passed as tensors and read
    with ``.item()`` they reach the op's Scalar arguments unspecialised: one compile for all
    steps. Inductor calls the op on the weight itself (no copy of W, no copy back)."""
    from torch._inductor.utils import run_and_get_code


    def update(weight, proj, norm, beta, alpha):
        back_project_update_(weight, proj, norm, side="left", beta=beta.item(), alpha=alpha.item())

    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(update, fullgraph=True, backend=counter)
    m, n, r = 24, 40, 4
    weight, proj = torch.randn(m, n), projection("left", m, n, r)
    eager = weight.clone()
    for t, lr in enumerate((1e-2, 5e-3, 2.5e-3)):
        norm, beta, alpha = torch.randn(r, n), torch.tensor(1 - lr * 0.1), torch.tensor(-lr)
        if t == 0:
            _, (code,) = run_and_get_code(compiled, weight, proj, norm, beta, alpha)
            assert "owlore.back_project_update_" in code and "copy_" not in code and "clone" not in code, code
        else:
            compiled(weight, proj, norm, beta, alpha)
        update(eager, proj, norm, beta, alpha)
        torch.testing.assert_close(weight, eager, rtol=0, atol=0)  # the same kernel on the same inputs
    assert counter.frame_count == 1


def test_tensor_beta_alpha_compile_fullgraph_once_without_config():
    """beta and alpha as 0-dim CPU tensors (the ``.tensor`` overload) are graph inputs with
    torch.compile's defaults: one compile for all steps (dynamo may restart its first analysis once, which is not
    a recompile), the eager kernel's result bit for bit."""
    def update(weight, proj, norm, beta, alpha):
        back_project_update_(weight, proj, norm, side="right", beta=beta, alpha=alpha)

    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(update, fullgraph=True, backend=counter)
    m, n, r = 24, 40, 4
    weight, proj = torch.randn(m, n).bfloat16(), projection("right", m, n, r)
    eager = weight.clone()
    for t, lr in enumerate((1e-2, 5e-3, 2.5e-3)):
        norm = torch.randn(m, r)
        beta, alpha = torch.tensor(1 - lr * 0.1, dtype=torch.float64), torch.tensor(-lr, dtype=torch.float64)
        with torch._dynamo.config.patch(error_on_recompile=t > 0):
            compiled(weight, proj, norm, beta, alpha)
        back_project_update_(eager, proj, norm, side="right", beta=1 - lr * 0.1, alpha=-lr)  # numbers
        assert torch.equal(weight, eager)
    assert counter.frame_count >= 1 and "owlore.back_project_update_.tensor" in counter.graphs[-1].code


@pytest.mark.parametrize("name,value,pattern", [
    ("beta", torch.tensor([0.99]), r"beta must be a 0-dim floating CPU tensor, got shape \(1,\)"),
    ("alpha", torch.tensor(1, dtype=torch.int64), r"alpha must be a 0-dim floating CPU tensor, got shape \(\), torch.int64"),
    ("alpha", torch.tensor(-0.1, device="meta"), r"alpha must be a 0-dim floating CPU tensor.* on meta"),
])
def test_bad_tensor_beta_alpha_raise_before_anything_changes(name, value, pattern):
    weight, proj, norm = torch.randn(30, 50), projection("left", 30, 50, 4), torch.randn(4, 50)
    before = weight.clone()
    kwargs = dict(beta=1.0, alpha=-0.1)
    kwargs[name] = value
    with pytest.raises(ValueError, match=pattern):
        back_project_update_(weight, proj, norm, side="left", **kwargs)
    assert torch.equal(weight, before)


# --------------------------------------------------------------------------- the Triton kernel's store and guards


def _triton_devices():
    return [p for p in BACKENDS if p.id.startswith("triton")]


if _triton_devices():
    import triton
    import triton.language as tl

    from owlore_kernels.kernels._common import fp32_to_bf16_bits_rne

    @triton.jit
    def round_bf16_kernel(x_ptr, out_ptr, numel, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        tl.store(out_ptr + offs, fp32_to_bf16_bits_rne(tl.load(x_ptr + offs, mask=mask, other=0.0)), mask=mask)


@pytest.mark.parametrize("backend,device", _triton_devices())
def test_triton_bf16_rounding_is_torchs_bit_for_bit(backend, device):
    """The kernels' fp32 -> bf16 store (integer rounding on the fp32 bits, because the
    interpreter's ``.to(tl.bfloat16)`` truncates) gives torch's bits on every kind of input."""
    def as_int32(*patterns):  # fp32 bit patterns written unsigned, stored as int32
        return torch.tensor([b - (1 << 32) if b >= 1 << 31 else b for b in patterns], dtype=torch.int32)

    special = as_int32(
        0x3F808000, 0x3F818000,  # exact ties: round down to even, round up to even
        0x3F807FFF, 0x3F808001,  # just below / above a tie
        0x7F7FFFFF, 0x7F7F8000, 0x7F7F7FFF,  # largest fp32 (-> inf), tie at the top, just below
        0x7F800000, 0xFF800000,  # +inf, -inf
        0x00000001, 0x00008000, 0x00018000, 0x807FFFFF,  # denormals, incl. ties, and a negative one
        0x00000000, 0x80000000,  # +0, -0
    )
    x = torch.cat([special, torch.randint(-(2**31), 2**31 - 1, (8000,), dtype=torch.int32)]).view(torch.float32)
    x = x[~torch.isnan(x)].to(device)  # NaNs below: their payload is a convention, not rounding
    out = torch.empty(x.numel(), dtype=torch.int16, device=device)
    round_bf16_kernel[(triton.cdiv(x.numel(), 4096),)](x, out, x.numel(), BLOCK=4096)
    want = x.to(torch.bfloat16).view(torch.int16)
    assert torch.equal(out, want), [hex(int(b) & 0xFFFFFFFF) for b in x[out != want][:5].view(torch.int32)]
    nans = as_int32(0x7FC00000, 0x7F800001, 0x7FFFFFFF, 0xFFFFFFFF, 0xFFC00000).view(torch.float32).to(device)
    out = torch.empty(nans.numel(), dtype=torch.int16, device=device)
    round_bf16_kernel[(1,)](nans, out, nans.numel(), BLOCK=16)
    assert torch.isnan(out.view(torch.bfloat16).float()).all()
    # one canonical NaN, c10::BFloat16's (CPU) choice; CUDA's cvt.rn.bf16.f32 writes 0x7FFF,
    # equally a quiet NaN, so on GPU only the NaN-ness is torch's, not the payload
    assert (out == 0x7FC0).all()


@pytest.mark.parametrize("backend,device", _triton_devices())
def test_triton_launcher_guards_memory_on_direct_calls(backend, device):
    from owlore_kernels.kernels import back_project_update_launch

    weight = torch.randn(67, 131, device=device)
    with pytest.raises(ValueError):
        back_project_update_launch(weight, torch.randn(67, 5, device=device), torch.randn(5, 130, device=device),
                                   "left", 0.9, -0.1)
    with pytest.raises(ValueError):
        back_project_update_launch(weight, torch.randn(67, 5, device=device, dtype=torch.float64),
                                   torch.randn(5, 131, device=device), "left", 0.9, -0.1)
