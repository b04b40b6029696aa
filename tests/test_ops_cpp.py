"""The C++ CPU backend (csrc/, torch.ops.owlore.*) against the torch references.

Shapes are chosen against the kernels' tile sizes so every path has ragged
edges: outlier_count works in 16384-column segments and 1024-element fp32
blocks; project_adam tiles R into a thread-count multiple of tiles at most
min(2048, 262144 // r) wide, 16-aligned, and stages (upcasts) bf16/fp16 G, or
fp32 G with a 4 KB-multiple row stride on the left side, 256 rows (left) or columns (right) at a
time; back_project_update tiles fp32 W into
full-height panels at most 2048 wide (a thread-count multiple of them) and
bf16/fp16 W by 512 x 512.

Tolerances, per dtype:
* fp32 results (moments, N, fp32 W): rtol 1e-5, atol 1e-6. The backends sum
  the same products in a different order (tile GEMMs vs one GEMM), which moves
  an fp32 result by a few ulps (2^-24 relative each).
* bf16/fp16 W: at most 1 ulp of the storage dtype, and bit-identical for
  >= 99% of entries. Both backends compute the new weight in fp32 and round it
  to nearest even; fp32 values a few ulps apart only round differently when
  they straddle a rounding boundary, which is then a 1-ulp difference.
* outlier mean: rtol 1e-5 (fp32 accumulation in both, different order);
  count: exact except for entries whose score lies within that mean tolerance
  of the threshold, counted in the test.
"""
import pytest
import torch

# exc_type=ImportError: also skip when a stale or broken build fails to load, not only when it is missing
_C = pytest.importorskip(
    "owlore_kernels._C",
    reason="C++ extension not built or not loadable (OWLORE_REQUIRE_EXT=1 pip install -e . builds it)",
    exc_type=ImportError,
)

from owlore_kernels import ops  # noqa: E402
from owlore_kernels.ops.back_project_update import back_project_update_, back_project_update_reference  # noqa: E402
from owlore_kernels.ops.outlier_count import outlier_count, outlier_count_reference  # noqa: E402
from owlore_kernels.ops.project_adam import project_adam, project_adam_reference  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
RTOL32, ATOL32 = 1e-5, 1e-6
MEAN_RTOL = 1e-5


def test_auto_backend_on_cpu_is_cpp():
    report = ops.backend_report()
    assert "cpp" not in report["unavailable"], report["unavailable"]
    assert report["cpu"] == {op: "cpp" for op in ops.OPS}


# ----------------------------------------------------------------- outlier_count
def _reference_outlier_count(tensors, threshold, col_scales):
    # float64 copies: the reference's .float() then makes a fresh fp32 tensor
    # (values unchanged, all inputs are exact in fp64), so its in-place abs_/mul_
    # cannot touch the caller's tensors.
    return outlier_count_reference([t.double() for t in tensors], threshold, col_scales)


def _scores32(tensors, col_scales):
    """All scores in fp32, as both backends compute them (|w| upcast, times s)."""
    out = []
    for t, s in zip(tensors, col_scales):
        a = t.float().abs().reshape(-1, t.shape[-1] if t.dim() else 1)
        out.append((a * s.float() if s is not None else a).flatten())
    return torch.cat(out)


def _check_outlier(tensors, threshold, col_scales):
    before = [t.clone() for t in tensors]
    mean, count = outlier_count(tensors, threshold, col_scales, backend="cpp")
    for t, b in zip(tensors, before):
        assert torch.equal(t, b), "the cpp op must not modify its inputs"
    ref_mean, ref_count = _reference_outlier_count(tensors, threshold, col_scales)
    assert mean == pytest.approx(ref_mean, rel=MEAN_RTOL)
    # entries whose score is within the mean's tolerance of the cut may fall either way
    scores = _scores32(tensors, col_scales)
    cut = threshold * ref_mean
    ambiguous = int(((scores - cut).abs() <= MEAN_RTOL * abs(cut) * 2).sum())
    assert abs(count - ref_count) <= ambiguous, (count, ref_count, ambiguous)
    return mean, count


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(67, 131), (1, 5), (130, 4097), (3, 7, 33), (40000,)])
@pytest.mark.parametrize("scaled", [False, True])
def test_outlier_count_one_tensor(dtype, shape, scaled):
    w = torch.randn(shape).to(dtype)
    s = torch.rand(shape[-1]) + 0.5 if scaled else None
    for threshold in (0.0, 1.0, 3.0):
        _check_outlier([w], threshold, [s])


@pytest.mark.parametrize("dtype", DTYPES)
def test_outlier_count_several_tensors_share_one_mean(dtype):
    # a block's linear weights scored together, some with column scales, one a transposed view
    q = torch.randn(64, 96).to(dtype)
    up = (torch.randn(96, 200) * 3).to(dtype)
    down_t = torch.randn(200, 96).to(dtype).t()  # non-contiguous, strides (1, 96)
    scales = [torch.rand(96) + 0.1, None, (torch.rand(200) + 0.1).to(dtype)]
    mean, count = _check_outlier([q, up, down_t], 2.5, scales)
    # the shared mean is not the mean of the per-tensor means
    per = [outlier_count([t], 2.5, [s], backend="cpp")[0] for t, s in zip([q, up, down_t], scales)]
    assert mean != pytest.approx(sum(per) / 3, rel=1e-3)


def test_outlier_count_direct_op_matches_public_api():
    w = torch.randn(67, 131)
    assert torch.ops.owlore.outlier_count([w], 3.0, [None]) == outlier_count(w, 3.0, backend="cpp")


# ----------------------------------------------------------------- project_adam
# (m, n, r): ranks 1 and odd; extents that cross tile and staging-block boundaries at
# those ranks; n = 1024 (a 4 KB row stride) sends fp32 G through the staged path too (left)
PROJECT_CASES = [(67, 131, 5), (1, 5, 1), (130, 4097, 17), (1100, 67, 3), (300, 600, 128), (520, 1100, 130),
                 (300, 1024, 7)]


def _projection(m, n, r, side):
    """P (m, r) for left, Q (r, n) for right, scaled like GaLore's orthonormal bases
    (unit-norm columns of P / rows of Q), so R = P^T G has O(1) entries for O(1) G.
    Random rather than orthonormal: the ops do not rely on orthonormality, and a QR
    costs seconds on a busy 2-core machine."""
    if side == "left":
        return torch.randn(m, r) / m**0.5
    return torch.randn(r, n) / n**0.5


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,r", PROJECT_CASES)
def test_project_adam_matches_reference(side, dtype, m, n, r):
    proj = _projection(m, n, r, side)
    low = (r, n) if side == "left" else (m, r)
    # non-zero starting moments keep sqrt(v) away from 0, so N is a smooth function
    # of R and the fp32 tolerance above holds for it too
    state = {"cpp": [torch.randn(low) * 0.1, torch.rand(low) + 0.5], "torch": None}
    state["torch"] = [t.clone() for t in state["cpp"]]
    for step in (5, 6):  # two steps: the second starts from moments the op itself wrote
        grad = torch.randn(m, n).to(dtype)
        out = project_adam(grad, proj, *state["cpp"], side=side, beta1=0.9, beta2=0.999, eps=1e-6, step=step,
                           backend="cpp")
        ref_out = torch.empty(low)
        project_adam_reference(grad, proj, *state["torch"], ref_out, side, 0.9, 0.999, 1e-6, step)
        torch.testing.assert_close(state["cpp"][0], state["torch"][0], rtol=RTOL32, atol=ATOL32)
        torch.testing.assert_close(state["cpp"][1], state["torch"][1], rtol=RTOL32, atol=ATOL32)
        torch.testing.assert_close(out, ref_out, rtol=RTOL32, atol=ATOL32)


@pytest.mark.parametrize("side", ["left", "right"])
def test_project_adam_strided_inputs_and_moments(side):
    m, n, r = 90, 70, 9
    grad = torch.randn(n, m).t()  # column-major G
    proj = _projection(m, n, r, side)
    proj = proj.t().contiguous().t()  # same values, column-major
    low = (r, n) if side == "left" else (m, r)
    # moments and out as transposed views: the epilogue's non-unit-stride path
    cpp = [torch.randn(low[::-1]).t() * 0.1, torch.rand(low[::-1]).t() + 0.5, torch.empty(low[::-1]).t()]
    ref = [t.contiguous() for t in cpp]
    torch.ops.owlore.project_adam_(grad, proj, *cpp, side, 0.9, 0.999, 1e-6, 3)
    project_adam_reference(grad, proj, *ref, side, 0.9, 0.999, 1e-6, 3)
    for a, b in zip(cpp, ref):
        torch.testing.assert_close(a, b, rtol=RTOL32, atol=ATOL32)


def test_project_adam_rejects_bad_shapes():
    with pytest.raises(RuntimeError, match="proj shape"):
        torch.ops.owlore.project_adam_(torch.randn(8, 9), torch.randn(7, 2), torch.zeros(2, 9), torch.zeros(2, 9),
                                       torch.zeros(2, 9), "left", 0.9, 0.999, 1e-6, 1)
    with pytest.raises(RuntimeError, match="side"):
        torch.ops.owlore.project_adam_(torch.randn(8, 9), torch.randn(8, 2), torch.zeros(2, 9), torch.zeros(2, 9),
                                       torch.zeros(2, 9), "up", 0.9, 0.999, 1e-6, 1)


# ----------------------------------------------------------------- back_project_update
def _ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Units in the last place between two bf16/fp16 tensors (bits mapped to an ordered integer line)."""

    def ordered(t):
        bits = t.view(torch.int16).to(torch.int32)
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)

    return (ordered(a) - ordered(b)).abs()


# (m, n, r): fp32 panels split n in two or more; bf16/fp16 tiles are 512 x 512; these end mid-tile
BACK_CASES = [(67, 131, 5), (1, 5, 1), (130, 4097, 17), (600, 1100, 128), (2100, 520, 3)]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,r", BACK_CASES)
def test_back_project_update_matches_reference(side, dtype, m, n, r):
    proj = _projection(m, n, r, side)
    norm = torch.randn((r, n) if side == "left" else (m, r))
    w = torch.nn.Parameter(torch.randn(m, n).to(dtype))  # a leaf that requires grad, as in training
    ref = w.detach().clone()
    with torch.no_grad():  # as in optimizer.step()
        back_project_update_(w, proj, norm, side=side, lr=1e-2, weight_decay=0.1, scale=0.25, backend="cpp")
    back_project_update_reference(ref, proj, norm, side, 1e-2, 0.1, 0.25)
    if dtype == torch.float32:
        torch.testing.assert_close(w.detach(), ref, rtol=RTOL32, atol=ATOL32)
    else:
        ulps = _ulp_distance(w.detach(), ref)
        assert int(ulps.max()) <= 1
        assert float((ulps == 0).float().mean()) >= 0.99


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_back_project_update_into_transposed_weight(dtype):
    m, n, r = 300, 520, 7
    w = torch.randn(n, m).to(dtype).t()  # column-major W: tiles are column-major views
    ref = w.contiguous()
    proj, norm = _projection(m, n, r, "left"), torch.randn(r, n)
    torch.ops.owlore.back_project_update_(w, proj, norm, "left", 1e-2, 0.0, 1.0)
    back_project_update_reference(ref, proj, norm, "left", 1e-2, 0.0, 1.0)
    if dtype == torch.float32:
        torch.testing.assert_close(w, ref, rtol=RTOL32, atol=ATOL32)
    else:
        assert int(_ulp_distance(w, ref).max()) <= 1


def test_back_project_update_rounds_to_nearest_even():
    # 1 + 2^-8 lies exactly halfway between the bf16 neighbours 1 and 1 + 2^-7:
    # round to nearest even gives 1 (even mantissa); truncation or round-half-up would not agree on all.
    w = torch.ones(3, 4, dtype=torch.bfloat16)
    proj = torch.ones(3, 1)
    norm = torch.full((1, 4), -(2.0**-8))  # W - lr * scale * (P N) = 1 + 2^-8 with lr = scale = 1
    torch.ops.owlore.back_project_update_(w, proj, norm, "left", 1.0, 0.0, 1.0)
    assert torch.equal(w, torch.ones(3, 4, dtype=torch.bfloat16))
    w = torch.full((3, 4), 1.0 + 2.0**-7, dtype=torch.bfloat16)  # odd mantissa; + 2^-8 is halfway up
    torch.ops.owlore.back_project_update_(w, proj, norm, "left", 1.0, 0.0, 1.0)
    assert torch.equal(w, torch.full((3, 4), 1.0 + 2.0**-6, dtype=torch.bfloat16))


def test_ops_run_under_inference_mode():
    # the tile loops run on worker threads, which must see the caller's inference
    # mode: in-place updates of inference tensors are refused outside it
    m, n, r = 300, 1100, 7  # several tiles per op, so both threads take part
    with torch.inference_mode():
        w, grad = torch.randn(m, n), torch.randn(m, n)
        proj = _projection(m, n, r, "left")
        exp_avg, exp_avg_sq = torch.zeros(r, n), torch.zeros(r, n)
        norm = project_adam(grad, proj, exp_avg, exp_avg_sq, side="left", beta1=0.9, beta2=0.999, eps=1e-6, step=1,
                            backend="cpp")
        before = w.clone()
        back_project_update_(w, proj, norm, side="left", lr=1e-2, weight_decay=0.0, scale=1.0, backend="cpp")
    assert not torch.equal(w, before)
