"""The Triton backend against the torch references (the test oracle).

On a CPU-only machine conftest.py sets TRITON_INTERPRET=1 before anything imports a
kernel module, so the kernels run in Triton's interpreter on CPU tensors (~1 ms per
program, ~2 ms per program per tl.dot K-step): shapes are small and ragged (67 x 131,
ranks 5 and 16, a 4097-wide row) and chosen so that the whole file runs in well under
a minute. On a CUDA machine the same tests run on CUDA tensors.

Tolerances, per dtype of the *result*:
* fp32 results (moments, N, fp32 weights, the mean): rtol 1e-5, atol 1e-6. The kernel
  and the reference compute the same fp32 formula; only the summation order of the
  dot products (and of the mean) differs, which moves the last 1-3 bits. With
  "ieee" dot precision (the default; no TF32) this holds on the GPU too.
* bf16 G gives fp32 results, and G is upcast exactly, so the fp32 tolerance holds there.
* bf16 weights: rtol 1e-2, atol 1e-3, i.e. one bf16 ulp (2^-8 relative): an fp32
  difference of one ulp can move a value across a rounding boundary. Separately,
  the rounding itself is checked to be bit-exact against torch's ``.to(torch.bfloat16)``.
* The outlier count is exact except for entries whose score lies within 1e-5 (relative)
  of the cut, where the two means' last bits decide; the test allows exactly those.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch

try:  # not importorskip: a broken install raises a plain ImportError, which it would not skip
    import triton
    import triton.language as tl
except Exception as exc:
    pytest.skip(f"triton is not importable ({type(exc).__name__}: {exc}): no Triton backend to test",
                allow_module_level=True)

from owlore_kernels.ops import _REGISTRY, _UNAVAILABLE, _load_backends  # noqa: E402
from owlore_kernels.ops.back_project_update import back_project_update_  # noqa: E402
from owlore_kernels.ops.outlier_count import outlier_count  # noqa: E402
from owlore_kernels.ops.project_adam import project_adam  # noqa: E402

_load_backends()
if "triton" not in _REGISTRY["project_adam"]:
    pytest.skip(f"the triton backend did not register: {_UNAVAILABLE.get('triton')}", allow_module_level=True)

from owlore_kernels.kernels import back_project_update_launch, project_adam_launch  # noqa: E402
from owlore_kernels.kernels._common import fp32_to_bf16_bits_rne  # noqa: E402

# CUDA when there is one; CPU tensors only under the interpreter (a forced "triton"
# backend refuses CPU tensors otherwise)
DEVICES = (["cuda"] if torch.cuda.is_available() else []) + (
    ["cpu"] if os.environ.get("TRITON_INTERPRET") == "1" else []
)
if not DEVICES:
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1: Triton cannot run here", allow_module_level=True)

FP32_TOL = dict(rtol=1e-5, atol=1e-6)
BF16_TOL = dict(rtol=1e-2, atol=1e-3)
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(params=DEVICES)
def dev(request):
    return torch.device(request.param)


def _tol(dtype):
    return FP32_TOL if dtype == torch.float32 else BF16_TOL


def _orthonormal(rows, cols, device):
    q, _ = torch.linalg.qr(torch.randn(max(rows, cols), min(rows, cols)))
    q = q if rows >= cols else q.t()
    return q.contiguous().to(device)


def _proj(side, m, n, r, device):
    """P (m x r, orthonormal columns) for left, Q (r x n, orthonormal rows) for right."""
    return _orthonormal(m, r, device) if side == "left" else _orthonormal(r, n, device)


def _low_shape(side, m, n, r):
    return (r, n) if side == "left" else (m, r)


# --------------------------------------------------------------------------- bf16 rounding


@triton.jit
def _round_bf16_kernel(x_ptr, out_ptr, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, fp32_to_bf16_bits_rne(x), mask=mask)


def test_bf16_rounding_is_torchs_bit_for_bit(dev):
    """The kernels' fp32 -> bf16 rounding gives torch's bits on every kind of input."""
    def as_int32(*patterns):  # fp32 bit patterns written unsigned, stored as int32
        return torch.tensor([b - (1 << 32) if b >= 1 << 31 else b for b in patterns], dtype=torch.int32)

    special = as_int32(
        *[
            0x3F808000, 0x3F818000,  # exact ties: round down to even, round up to even
            0x3F807FFF, 0x3F808001,  # just below / above a tie
            0x7F7FFFFF, 0x7F7F8000, 0x7F7F7FFF,  # largest fp32 (-> inf), tie at the top, just below
            0x7F800000, 0xFF800000,  # +inf, -inf
            0x00000001, 0x00008000, 0x00018000, 0x807FFFFF,  # denormals, incl. ties, and a negative one
            0x00000000, 0x80000000,  # +0, -0
        ]
    )
    random_bits = torch.randint(-(2**31), 2**31 - 1, (8000,), dtype=torch.int32)
    bits = torch.cat([special, random_bits])
    x = bits.view(torch.float32)
    finite = ~torch.isnan(x)
    x = x[finite].to(dev)  # NaNs are checked below: their payload is a convention, not rounding
    out = torch.empty(x.numel(), dtype=torch.int16, device=dev)
    _round_bf16_kernel[(triton.cdiv(x.numel(), 4096),)](x, out, x.numel(), BLOCK=4096)
    want = x.to(torch.bfloat16).view(torch.int16)
    mismatch = (out != want).nonzero().flatten()
    assert mismatch.numel() == 0, [
        (hex(x[i].view(torch.int32).item() & 0xFFFFFFFF), hex(out[i].item() & 0xFFFF), hex(want[i].item() & 0xFFFF))
        for i in mismatch[:5].tolist()
    ]
    nans = as_int32(0x7FC00000, 0x7F800001, 0x7FFFFFFF, 0xFFFFFFFF, 0xFFC00000).view(torch.float32)
    out = torch.empty(nans.numel(), dtype=torch.int16, device=dev)
    _round_bf16_kernel[(1,)](nans.to(dev), out, nans.numel(), BLOCK=16)
    assert torch.isnan(out.view(torch.bfloat16).float()).all()
    # one canonical NaN, c10::BFloat16's (CPU) choice; CUDA's cvt.rn.bf16.f32 writes 0x7FFF,
    # equally a quiet NaN, so on GPU only the NaN-ness is torch's, not the payload
    assert (out == 0x7FC0).all()


# --------------------------------------------------------------------------- outlier count


def _count_band(tensors, scales, threshold, mean, rel=1e-5):
    """(lowest, highest) count consistent with a cut known to 1e-5 relative."""
    lo = hi = 0
    for t, s in zip(tensors, scales):
        score = t.detach().float().abs().reshape(-1, t.shape[-1]).cpu()
        if s is not None:
            score = score * s.float().cpu()
        cut = threshold * mean
        lo += int((score > cut * (1 + rel)).sum())
        hi += int((score > cut * (1 - rel)).sum())
    return lo, hi


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_scales", [False, True], ids=["plain", "col_scaled"])
def test_outlier_count_matches_reference(dev, dtype, with_scales):
    tensors = [
        torch.randn(67, 131, device=dev).to(dtype),
        torch.randn(3, 4097, device=dev).mul(2.0).to(dtype),  # 4097-wide rows: 9 column tiles, ragged
        torch.randn(131, 67, device=dev).to(dtype).t(),  # a transposed (non-contiguous) view
        torch.randn(40, device=dev).to(dtype),  # 1-D: one row
    ]
    scales = [None] * len(tensors)
    if with_scales:
        scales = [torch.rand(t.shape[-1], device=dev) + 0.5 for t in tensors]
        scales[1] = None  # mixed: some tensors scaled, some not
    for threshold in (0.0, 1.0, 3.0):
        mean, count = outlier_count(tensors, threshold, scales, backend="triton")
        # clones: the reference scores fp32 tensors in place (see the report to the lead)
        ref_mean, ref_count = outlier_count([t.clone() for t in tensors], threshold, scales, backend="torch")
        assert mean == pytest.approx(ref_mean, rel=FP32_TOL["rtol"])
        lo, hi = _count_band(tensors, scales, threshold, ref_mean)
        assert lo <= count <= hi, (count, ref_count, lo, hi)
        if threshold == 0.0:
            assert count == sum((t != 0).sum().item() for t in tensors)  # every nonzero score beats 0


def test_outlier_count_leaves_inputs_alone(dev):
    t = torch.randn(67, 131, device=dev)
    before = t.clone()
    outlier_count([t], 3.0, [torch.rand(131, device=dev)], backend="triton")
    assert torch.equal(t, before)


# --------------------------------------------------------------------------- project + Adam


def _adam_case(side, m, n, r, gdtype, dev):
    proj = _proj(side, m, n, r, dev)
    shape = _low_shape(side, m, n, r)
    exp_avg = torch.zeros(shape, device=dev)
    exp_avg_sq = torch.zeros(shape, device=dev)
    return proj, exp_avg, exp_avg_sq


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("gdtype", DTYPES)
@pytest.mark.parametrize("m,n,r", [(67, 131, 5), (131, 67, 16)])
def test_project_adam_matches_reference(dev, side, gdtype, m, n, r):
    proj, exp_avg, exp_avg_sq = _adam_case(side, m, n, r, gdtype, dev)
    ref_avg, ref_avg_sq = exp_avg.clone(), exp_avg_sq.clone()
    hyper = dict(side=side, beta1=0.9, beta2=0.999, eps=1e-6)
    for step in (1, 2, 3):  # three steps: the moments carry history, bias corrections change
        grad = torch.randn(m, n, device=dev).to(gdtype)
        out = project_adam(grad, proj, exp_avg, exp_avg_sq, step=step, backend="triton", **hyper)
        ref = project_adam(grad, proj, ref_avg, ref_avg_sq, step=step, backend="torch", **hyper)
        # fp32 results for any G dtype: bf16 G is upcast exactly on load
        torch.testing.assert_close(exp_avg, ref_avg, **FP32_TOL)
        torch.testing.assert_close(exp_avg_sq, ref_avg_sq, **FP32_TOL)
        torch.testing.assert_close(out, ref, **FP32_TOL)


def test_project_adam_strided_inputs_and_out(dev):
    """A column-major G, a transposed-view projection, and a caller-given ``out``."""
    m, n, r = 67, 131, 16
    grad = torch.randn(n, m, device=dev).t()  # m x n, column-major
    proj = _orthonormal(r, m, dev).t()  # m x r view of an r x m tensor
    exp_avg = torch.randn(r, n, device=dev) * 0.1
    exp_avg_sq = torch.rand(r, n, device=dev) * 0.01
    ref_avg, ref_avg_sq = exp_avg.clone(), exp_avg_sq.clone()
    out = torch.full((n, r), float("nan"), device=dev).t()  # r x n, non-contiguous
    hyper = dict(side="left", beta1=0.8, beta2=0.99, eps=1e-8, step=7)
    project_adam(grad, proj, exp_avg, exp_avg_sq, out=out, backend="triton", **hyper)
    ref = project_adam(grad, proj, ref_avg, ref_avg_sq, backend="torch", **hyper)
    torch.testing.assert_close(out, ref, **FP32_TOL)
    torch.testing.assert_close(exp_avg, ref_avg, **FP32_TOL)
    torch.testing.assert_close(exp_avg_sq, ref_avg_sq, **FP32_TOL)


def test_project_adam_launcher_rejects_bad_shapes(dev):
    grad = torch.randn(67, 131, device=dev)
    proj = torch.randn(67, 5, device=dev)
    bad = torch.zeros(5, 130, device=dev)
    with pytest.raises(ValueError):
        project_adam_launch(grad, proj, bad, bad.clone(), bad.clone(), "left", 0.9, 0.999, 1e-6, 1)
    good = torch.zeros(5, 131, device=dev)
    with pytest.raises(ValueError):
        project_adam_launch(grad, proj, good, good.clone(), good.clone(), "up", 0.9, 0.999, 1e-6, 1)
    with pytest.raises(ValueError):
        project_adam_launch(grad, proj, good, good.clone(), good.clone(), "left", 0.9, 0.999, 1e-6, 1,
                            dot_precision="fp8")


# --------------------------------------------------------------------------- back-project + update


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("wdtype", DTYPES + [torch.float16])
@pytest.mark.parametrize("m,n,r", [(67, 131, 5), (131, 67, 16)])
def test_back_project_update_matches_reference(dev, side, wdtype, m, n, r):
    proj = _proj(side, m, n, r, dev)
    norm = torch.randn(_low_shape(side, m, n, r), device=dev)
    weight = torch.randn(m, n, device=dev).to(wdtype)
    ref = weight.clone()
    hyper = dict(side=side, lr=0.05, weight_decay=0.1, scale=0.25)
    back_project_update_(weight, proj, norm, backend="triton", **hyper)
    back_project_update_(ref, proj, norm, backend="torch", **hyper)
    # fp16: 2^-11 relative ulp; the bf16 tolerance covers it with room
    torch.testing.assert_close(weight, ref, **_tol(wdtype if wdtype != torch.float16 else torch.bfloat16))


@pytest.mark.parametrize("side", ["left", "right"])
def test_back_project_update_bf16_store_is_round_to_nearest_even(dev, side):
    """bf16 W must equal, bit for bit, torch's rounding of the kernel's own fp32 result.

    The fp32 result comes from the same kernel run on the bf16 weight upcast to fp32
    (same code, same operation order), so any difference is the rounding at the store.
    """
    m, n, r = 67, 131, 16
    proj = _proj(side, m, n, r, dev)
    norm = torch.randn(_low_shape(side, m, n, r), device=dev) * 40.0  # big steps: many inexact results
    weight = torch.randn(m, n, device=dev).to(torch.bfloat16)
    as_fp32 = weight.float()
    back_project_update_launch(weight, proj, norm, side, 0.05, 0.1, 0.25)
    back_project_update_launch(as_fp32, proj, norm, side, 0.05, 0.1, 0.25)
    want = as_fp32.to(torch.bfloat16)
    assert not torch.equal(as_fp32, want.float())  # the test rounds something
    assert torch.equal(weight.view(torch.int16), want.view(torch.int16))


def test_back_project_update_strided_weight(dev):
    """A transposed weight view is updated in place through its strides."""
    m, n, r = 67, 131, 5
    storage = torch.randn(n, m, device=dev)
    weight = storage.t()  # m x n view
    proj = _proj("left", m, n, r, dev)
    norm = torch.randn(r, n, device=dev)
    ref = weight.clone()
    back_project_update_(weight, proj, norm, side="left", lr=0.01, weight_decay=0.0, scale=1.0, backend="triton")
    back_project_update_(ref, proj, norm, side="left", lr=0.01, weight_decay=0.0, scale=1.0, backend="torch")
    torch.testing.assert_close(storage.t(), ref, **FP32_TOL)


def test_back_project_update_launcher_rejects_bad_shapes(dev):
    weight = torch.randn(67, 131, device=dev)
    with pytest.raises(ValueError):
        back_project_update_launch(weight, torch.randn(67, 5, device=dev), torch.randn(5, 130, device=dev),
                                   "left", 0.1, 0.0, 1.0)
    with pytest.raises(ValueError):
        back_project_update_launch(weight, torch.randn(67, 5, device=dev, dtype=torch.float64),
                                   torch.randn(5, 131, device=dev), "left", 0.1, 0.0, 1.0)


# --------------------------------------------------------------------------- end to end


def _owlore():
    try:
        from owlore_kernels import OwLoreAdamW
    except (ImportError, AttributeError) as exc:  # the optimizer module is not there yet
        pytest.skip(f"owlore_kernels.OwLoreAdamW is not available: {exc}")
    return OwLoreAdamW


def test_owlore_adamw_triton_matches_torch_over_20_steps(dev):
    """OwLoreAdamW(backend="triton") tracks backend="torch": weights and every state tensor,
    over 20 steps with projection refreshes (gap 7), both sides, a bf16 weight, a plain-AdamW
    bias, a param whose grad is None, and a state_dict save and reload at step 10."""
    OwLoreAdamW = _owlore()

    def make_params():
        g = torch.Generator().manual_seed(1)
        return [
            torch.randn(67, 131, generator=g).to(dev).requires_grad_(),  # left (m < n)
            torch.randn(131, 67, generator=g).to(dev).requires_grad_(),  # right (m >= n)
            torch.randn(40, 72, generator=g).to(torch.bfloat16).to(dev).requires_grad_(),
            torch.randn(67, generator=g).to(dev).requires_grad_(),  # plain AdamW
            torch.randn(16, 24, generator=g).to(dev).requires_grad_(),  # grad stays None
        ]

    def make_opt(params, backend):
        galore, plain = params[:3] + params[4:], params[3:4]
        groups = [
            {"params": plain},
            {"params": galore, "rank": 5, "update_proj_gap": 7, "scale": 0.25, "proj_type": "std"},
        ]
        return OwLoreAdamW(groups, lr=1e-2, weight_decay=0.01, backend=backend)

    fast, slow = make_params(), make_params()
    opt_fast, opt_slow = make_opt(fast, "triton"), make_opt(slow, "torch")
    g = torch.Generator().manual_seed(2)
    for step in range(20):
        for pf, ps in zip(fast[:4], slow[:4]):
            grad = torch.randn(pf.shape, generator=g).to(pf.dtype).to(dev)
            pf.grad, ps.grad = grad.clone(), grad.clone()
        opt_fast.step()
        opt_slow.step()
        if step == 9:  # save and reload mid-run: the fused path must resume from loaded state
            saved = copy.deepcopy(opt_fast.state_dict())
            opt_fast = make_opt(fast, "triton")
            opt_fast.load_state_dict(saved)

    assert fast[4].grad is None and opt_fast.state[fast[4]] == {}
    for pf, ps in zip(fast, slow):
        torch.testing.assert_close(pf.detach(), ps.detach(), **_tol(pf.dtype))
        state_f, state_s = opt_fast.state[pf], opt_slow.state[ps]
        assert state_f.keys() == state_s.keys()
        for key in state_s:
            if torch.is_tensor(state_s[key]):
                # 20 steps of Adam amplify last-bit differences a little: N divides by
                # sqrt(v), so 10x the single-step fp32 tolerance
                torch.testing.assert_close(state_f[key], state_s[key], rtol=1e-4, atol=1e-5)
            else:
                assert state_f[key] == state_s[key]


def test_empty_and_rank_zero_edges(dev):
    """r = 0 leaves the weight only decayed; an empty weight is a no-op (no 0-program launch)."""
    weight = torch.randn(6, 9, device=dev)
    want = weight * (1 - 0.1 * 0.5)
    back_project_update_launch(weight, torch.zeros(6, 0, device=dev), torch.zeros(0, 9, device=dev),
                               "left", 0.1, 0.5, 1.0)
    torch.testing.assert_close(weight, want, **FP32_TOL)
    empty = torch.zeros(0, 9, device=dev)
    back_project_update_launch(empty, torch.zeros(0, 3, device=dev), torch.zeros(3, 9, device=dev),
                               "left", 0.1, 0.5, 1.0)
    low = torch.zeros(0, 9, device=dev)
    project_adam_launch(torch.randn(6, 9, device=dev), torch.zeros(6, 0, device=dev), low, low.clone(),
                        low.clone(), "left", 0.9, 0.999, 1e-6, 1)
