"""torch.ops.owlore.outlier_count on every backend, against an fp64 evaluation.

What is exact and what is bounded:
* Scores are fp32 products |w_ij| * s_j of values exact in fp32: one rounding each,
  the same on every backend (a single IEEE multiply). The fp64 oracle's products are
  exact (24 + 24 significant bits < 53).
* The mean is an fp32 sum of N non-negative scores, in an order each backend chooses
  (C++: 16 lanes over 1024-element blocks folded in double; torch: its cascade sum;
  Triton: tile sums added atomically), then one division. In any order it is within
  gamma_{N+1} = (N + 1) 2^-24 / (1 - (N + 1) 2^-24) relative of the exact mean
  (Higham eq. 4.4; non-negative terms make the bound relative to the sum itself).
* Given the mean a backend returns, the count is exact: #{score > fp32(threshold * mean)},
  with threshold exactly representable in fp32 here, so no tolerance band is needed.
* With small-integer weights and scales every partial sum is an integer below 2^24, so
  the sum is exact in any order and the mean must equal the correctly rounded quotient.

Shapes cross the C++ kernel's 16384-column segments and 1024-element blocks, and Triton's
16 x 512 tiles (4097-wide rows: 9 column tiles).
"""
from __future__ import annotations

import pytest
import torch

from op_samples import (DTYPES, LargestNewTensor, backend_device_params, dispatching_to, exact_product_grid,
                        gamma, interpreted)
from owlore_kernels.ops.outlier_count import outlier_count

# rerun by `make test` on torch's generic CPU kernels (other summation orders)
pytestmark = pytest.mark.numerics

BACKENDS = backend_device_params("outlier_count")
SHAPES = [(67, 131), (1, 5), (130, 4097), (3, 7, 33), (40000,), (3, 4097), (40,)]
INTERPRETER_SHAPES = [(67, 131), (1, 5), (3, 7, 33), (3, 4097), (40,)]
THRESHOLDS = (0.0, 1.0, 2.5, 3.0)  # exact in fp32


def scores32(tensors, col_scales):
    """All scores as every backend computes them: |w| upcast to fp32, times s in fp32."""
    out = []
    for t, s in zip(tensors, col_scales):
        a = t.float().abs().reshape(-1, t.shape[-1])
        out.append((a * s.float() if s is not None else a).flatten())
    return torch.cat(out)


def check(backend, tensors, col_scales, threshold):
    before = [t.clone() for t in tensors]
    mean, count = outlier_count(tensors, threshold=threshold, col_scales=col_scales, backend=backend)
    assert isinstance(mean, float) and isinstance(count, int)
    assert all(torch.equal(t, b) for t, b in zip(tensors, before)), "the op must not modify its inputs"
    exact = [(t.double().abs().reshape(-1, t.shape[-1]) * (s.double() if s is not None else 1.0)).flatten()
             for t, s in zip(tensors, col_scales)]
    numel = sum(e.numel() for e in exact)
    mean64 = float(sum(e.sum() for e in exact)) / numel
    # scores rounded once, an fp32 sum of numel terms, one division: numel + 1 roundings
    assert abs(mean - mean64) <= gamma(numel + 1) * mean64, (mean, mean64, gamma(numel + 1))
    cut = torch.tensor(mean, dtype=torch.float32) * torch.tensor(threshold, dtype=torch.float32)
    scores = scores32(tensors, col_scales).cpu()
    assert count == int((scores > cut).sum())
    if threshold == 0.0:  # every nonzero score beats a zero cut
        assert count == int((scores != 0).sum())
    return mean, count


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "col_scaled"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_one_tensor_matches_fp64_oracle(backend, device, dtype, scaled, shape):
    if interpreted(backend, device) and shape not in INTERPRETER_SHAPES:
        pytest.skip("large for the Triton interpreter")
    w = torch.distributions.StudentT(3.0).sample(shape).to(dtype).to(device)  # heavy tails, like LLM weights
    s = (torch.rand(shape[-1]) + 0.5).to(device) if scaled else None
    for threshold in THRESHOLDS:
        check(backend, [w], [s], threshold)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_several_tensors_share_one_mean(backend, device, dtype):
    """A block's linear weights scored together: some with column scales (one in the
    weight's own 16-bit dtype), a transposed (non-contiguous) view, a 1-D tensor."""
    tensors = [
        torch.randn(64, 96).to(dtype),
        (torch.randn(96, 200) * 3).to(dtype),
        torch.randn(200, 96).to(dtype).t(),
        torch.randn(40).to(dtype),
    ]
    tensors = [t.to(device) for t in tensors]
    scales = [(torch.rand(96) + 0.1).to(device), None, (torch.rand(200) + 0.1).to(dtype).to(device), None]
    mean, _ = check(backend, tensors, scales, 2.5)
    per_tensor = [outlier_count([t], threshold=2.5, col_scales=[s], backend=backend)[0] for t, s in zip(tensors, scales)]
    assert abs(mean - sum(per_tensor) / len(per_tensor)) > 1e-3 * mean  # one pooled mean, not a mean of means


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_exact_sums_give_the_correctly_rounded_mean(backend, device, dtype):
    """Integer weights and scales: the sum is exact in any order, so every element must be
    read exactly once by both passes, and the mean is total / numel rounded once."""
    shape = (3, 4097) if interpreted(backend, device) else (130, 4097)
    w = exact_product_grid(shape, device, dtype)
    s = torch.randint(1, 5, (shape[-1],)).float().to(device)
    mean, count = outlier_count(w, threshold=1.0, col_scales=[s], backend=backend)
    total = (w.double().abs() * s.double()).sum()
    assert total < 2**24
    assert mean == (total.float() / w.numel()).item()
    assert count == int((w.float().abs() * s > mean).sum())


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_makes_no_full_size_temporary(dtype):
    """The reference scores ~1M-entry row chunks, never the whole (fp32 copy of the) tensor."""
    w = torch.randn(1536, 1024).to(dtype)
    with LargestNewTensor() as mode:
        outlier_count(w, threshold=3.0, col_scales=[torch.rand(1024)], backend="torch")
    assert 0 < mode.largest < w.numel(), mode.largest


# --------------------------------------------------------------------------- argument checks

BAD_ARGUMENTS = [
    ("empty list", dict(tensors=[]), ValueError, "at least one tensor"),
    ("negative threshold", dict(threshold=-1.0), ValueError, r"threshold must be a finite number >= 0, got -1.0"),
    ("inf threshold", dict(threshold=float("inf")), ValueError, r"threshold must be a finite number >= 0, got inf"),
    ("scale length", dict(col_scales=[torch.ones(49)]), ValueError, r"col_scales\[0\] must be 1-D with 50 entries"),
    ("scale count", dict(col_scales=[None, None]), ValueError, r"one entry per tensor \(1\), got 2"),
    ("dtype", dict(tensors=[torch.randn(30, 50, dtype=torch.float64)]), ValueError, r"tensors\[0\] must have dtype"),
    ("empty tensor", dict(tensors=[torch.randn(0, 50)]), ValueError, r"tensors\[0\] is empty"),
]


@pytest.mark.parametrize("what,change,error,pattern", BAD_ARGUMENTS, ids=[b[0] for b in BAD_ARGUMENTS])
def test_bad_arguments(what, change, error, pattern):
    kwargs = dict(tensors=[torch.randn(30, 50)], threshold=3.0, col_scales=[None])
    kwargs.update(change)
    with pytest.raises(error, match=pattern):
        outlier_count(**kwargs)
    if not kwargs["tensors"]:
        return  # an empty Tensor[] gives the dispatcher no device to dispatch on
    meta = lambda ts: [t.to("meta") if t is not None else None for t in ts]  # noqa: E731
    with pytest.raises(error, match=pattern):  # the fake implementation, as torch.compile runs it
        torch.ops.owlore.outlier_count(meta(kwargs["tensors"]), threshold=kwargs["threshold"],
                                       col_scales=meta(kwargs["col_scales"]))


def test_threshold_and_col_scales_are_keyword_only():
    with pytest.raises(TypeError):
        outlier_count(torch.randn(4, 4), 3.0)


# --------------------------------------------------------------------------- torch.library / torch.compile


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_opcheck(backend, device):
    """Schema (nothing written, fresh outputs), fake implementation, autograd registration and
    AOT dispatch (static and dynamic shapes), with the dispatcher running this backend's kernel."""
    tensors = [torch.randn(19, 37, device=device), torch.randn(37, 11, device=device).to(torch.bfloat16).t()]
    kwargs = dict(threshold=2.0, col_scales=[torch.rand(37, device=device), None])
    with dispatching_to("outlier_count", backend, device):
        torch.library.opcheck(torch.ops.owlore.outlier_count.default, (tensors,), kwargs,
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                          "test_aot_dispatch_static", "test_aot_dispatch_dynamic"))


def test_compiles_fullgraph():
    """The op returns device tensors, so a compiled function can use the count without a
    host sync or a graph break (the Python ``outlier_count`` reads them with ``.item()``)."""

    def ratio(w, s):
        _, count = torch.ops.owlore.outlier_count([w], threshold=3.0, col_scales=[s])
        return count

    torch._dynamo.reset()
    compiled = torch.compile(ratio, fullgraph=True, backend="inductor")
    w, s = torch.distributions.StudentT(3.0).sample((40, 24)), torch.rand(24) + 0.5
    assert compiled(w, s).item() == outlier_count(w, threshold=3.0, col_scales=[s])[1]
