"""The Triton kernels' precision paths, split-K and launch plans, in the interpreter on CPU.

What the interpreter can and cannot show: it runs every kernel's code path, but its tl.dot
is numpy's fp32 matmul whatever ``input_precision`` says, so "tf32"/"tf32x3" run exactly,
and a 16-bit dot is emulated by rounding the operands to bf16 / fp16 values in fp32 (the
products of such values are exact in fp32, so this equals the tensor-core result up to the
order of the fp32 sums). The tests therefore check (a) that each path is within the error
bound of its rounding, and (b) for bf16 / fp16 that the rounding really happens (the result
matches the product of the rounded operands, and not the unrounded one).

Tolerances are worst-case bounds, not fits. For R = P^T G with operands rounded to unit
roundoff u (bf16: 2^-9 on P, G already bf16; fp16: 2^-11; tf32: 2^-10 as truncation on both
operands, so 2 u; ieee: 0) and an fp32 sum of K terms (gamma_K <= K 2^-24 for any order):

    |R_kernel - R_fp64|_ij <= (u_P + u_G + K 2^-24) (|P|^T |G|)_ij      (+ a 2x margin)

Random signs make the typical error ~sqrt(K) smaller; the bound holds for any order, CPU
or BLAS. Shapes are small and ragged (67 x 131) so the file runs in well under a minute.
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

from owlore_kernels.kernels import (back_project_update_launch, back_project_update_plan,  # noqa: E402
                                    project_adam_launch, project_adam_plan, resolve_dot_precision)
from owlore_kernels.kernels import project_adam as pa_module  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
EPS32 = 2.0 ** -24
UNIT = {"ieee": 0.0, "tf32": 2 * 2.0 ** -10, "tf32x3": 2 * 2.0 ** -22, "bf16": 2.0 ** -9, "fp16": 2.0 ** -11}
DEFAULT = {torch.float32: "ieee", torch.bfloat16: "bf16", torch.float16: "fp16"}
ALLOWED = {torch.float32: ("ieee", "tf32x3", "tf32"), torch.bfloat16: ("bf16", "ieee"),
           torch.float16: ("fp16", "ieee")}


def _operands(side, m, n, r, gdtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    grad = torch.randn(m, n, generator=gen).to(gdtype)
    k = m if side == "left" else n
    proj = torch.randn((m, r) if side == "left" else (r, n), generator=gen) / k ** 0.5
    return grad.to(DEV), proj.to(DEV)


def _r64(grad, proj, side):
    g, p = grad.double(), proj.double()
    return p.t() @ g if side == "left" else g @ p.t()


def _abs_product(grad, proj, side):
    g, p = grad.double().abs(), proj.double().abs()
    return p.t() @ g if side == "left" else g @ p.t()


def _run_project(side, m, n, r, gdtype, precision):
    grad, proj = _operands(side, m, n, r, gdtype)
    low = (r, n) if side == "left" else (m, r)
    exp_avg, exp_avg_sq, out = (torch.zeros(low, device=DEV) for _ in range(3))
    # beta1 = beta2 = 0: m = R and v = R^2 exactly (no other rounding), so m shows the dot's error
    project_adam_launch(grad, proj, exp_avg, exp_avg_sq, out, side, 0.0, 0.0, 1e-8, 1.0, 1.0,
                        dot_precision=precision)
    return grad, proj, exp_avg, exp_avg_sq, out


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("r", [64, 512])
@pytest.mark.parametrize("gdtype,precision", [(d, p) for d, ps in ALLOWED.items() for p in ps])
def test_project_adam_each_precision_within_its_rounding_bound(side, r, gdtype, precision):
    m, n = 67, 131
    grad, proj, m_out, v_out, n_out = _run_project(side, m, n, r, gdtype, precision)
    k = m if side == "left" else n
    bound = 2 * (UNIT[precision] + k * EPS32) * _abs_product(grad, proj, side) + 1e-30
    err = (m_out.double() - _r64(grad, proj, side)).abs()
    assert (err <= bound).all(), f"max err/bound {(err / bound).max():.2f}"
    torch.testing.assert_close(v_out, m_out * m_out, rtol=2 * EPS32, atol=0)  # v = R^2 in fp32
    # N = m / (sqrt(v) + eps) recomputed in fp64 from the kernel's own m, v: the epilogue's rounding only
    want = m_out.double() / (v_out.double().sqrt() + 1e-8)
    torch.testing.assert_close(n_out.double(), want, rtol=4 * EPS32, atol=0)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("gdtype", [torch.bfloat16, torch.float16])
def test_project_adam_16bit_dot_rounds_p_to_gs_type(side, gdtype):
    """The default for a 16-bit G multiplies P rounded to G's type: the result is the product
    of the rounded operands (within the fp32 sum's bound) and measurably not the unrounded one."""
    m, n, r = 67, 131, 64
    grad, proj, m_out, _, _ = _run_project(side, m, n, r, gdtype, None)
    k = m if side == "left" else n
    rounded = _r64(grad, proj.to(gdtype).float(), side)
    sum_bound = 2 * k * EPS32 * _abs_product(grad, proj, side) + 1e-30
    assert ((m_out.double() - rounded).abs() <= sum_bound).all()
    assert (m_out.double() - _r64(grad, proj, side)).abs().max() > 2 * sum_bound.max()


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("gdtype", [torch.bfloat16, torch.float16])
def test_project_adam_16bit_proj_and_bf16_moments_over_steps(side, gdtype):
    """P stored in G's 16-bit type (both operands straight into the dot) and bf16 moments: at
    each of 3 steps, from the kernel's own previous state, the fp32 m and v lie within the
    rounding bound of op_samples (R's fp32 sum only: P's values already are the dot's type)
    and are then rounded to nearest even, which is monotone, so the stored bf16 value lies
    between the roundings of the bound's ends; N (from the unrounded fp32 moments) within its bound."""
    from op_samples import adam_bounds, assert_within, projection_bound, rounded_bracket

    m, n, r = 67, 131, 16
    gen = torch.Generator().manual_seed(5)
    _, proj = _operands(side, m, n, r, gdtype)
    proj = proj.to(gdtype)
    low = (r, n) if side == "left" else (m, r)
    exp_avg = (0.1 * torch.randn(low, generator=gen)).bfloat16().to(DEV)
    exp_avg_sq = (0.01 * torch.rand(low, generator=gen)).bfloat16().to(DEV)
    out = torch.empty(low, device=DEV)
    for step in range(1, 4):
        grad = torch.randn(m, n, generator=gen).to(gdtype).to(DEV)
        m0, v0 = exp_avg.double().cpu(), exp_avg_sq.double().cpu()
        bc1, bc2 = 1 - 0.9 ** step, 1 - 0.999 ** step
        project_adam_launch(grad, proj, exp_avg, exp_avg_sq, out, side, 0.9, 0.999, 1e-8, bc1, bc2)
        g64, p64 = grad.double().cpu(), proj.double().cpu()
        low64 = p64.t() @ g64 if side == "left" else g64 @ p64.t()
        (m1, dm), (v1, dv), (n1, dn) = adam_bounds(low64, projection_bound(g64, p64, side, 0.0), m0, v0, 0.9, 0.999,
                                                   1e-8, bc1, bc2)
        for name, got, exact, bound in (("exp_avg", exp_avg, m1, dm), ("exp_avg_sq", exp_avg_sq, v1, dv)):
            lo, hi = rounded_bracket(exact, bound, torch.bfloat16)
            inside = (got.cpu() >= lo) & (got.cpu() <= hi)
            assert inside.all(), f"step {step} {name}: {int((~inside).sum())} entries outside their bf16 bracket"
        assert_within(out.cpu(), n1, dn, f"step {step} N")


def test_project_adam_split_k_is_deterministic_and_resets_its_counters():
    """K = 2100 >= 2 x 1024 rows and 2 tiles for 132 SMs (the CPU plan's figure): two splits per
    tile of 1056 rows (a K tail in each: the masked loop), partials summed by the last split in
    split order."""
    side, m, n, r = "left", 2100, 70, 16
    grad, proj = _operands(side, m, n, r, torch.float32)
    (launch,) = project_adam_plan(grad, proj, *(torch.zeros(r, n, device=DEV) for _ in range(3)), side, 0.0, 0.0,
                                  1e-8, 1.0, 1.0)
    assert launch.constexprs["SPLIT_K"] and launch.grid[0] == 2 * 2
    results = []
    for _ in range(2):
        grad, proj, m_out, _, _ = _run_project(side, m, n, r, torch.float32, "ieee")
        results.append(m_out)
        bound = 2 * m * EPS32 * _abs_product(grad, proj, side)
        assert ((m_out.double() - _r64(grad, proj, side)).abs() <= bound).all()
    assert torch.equal(results[0], results[1])
    assert all(int(buf.abs().sum()) == 0 for buf in pa_module._SEMAPHORES.values())


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("wdtype,precision", [(d, p) for d, ps in ALLOWED.items() for p in ps])
def test_back_project_update_each_precision(side, wdtype, precision):
    m, n, r = 67, 131, 64
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(m, n, generator=gen).to(wdtype).to(DEV)
    proj = (torch.randn((m, r) if side == "left" else (r, n), generator=gen) / r ** 0.5).to(DEV)
    norm = torch.randn((r, n) if side == "left" else (m, r), generator=gen).to(DEV)
    beta, alpha = 0.999, -0.05
    a, b = (proj, norm) if side == "left" else (norm, proj)
    got = weight.clone()
    back_project_update_launch(got, proj, norm, side, beta, alpha, dot_precision=precision)
    exact = beta * weight.double() + alpha * (a.double() @ b.double())
    abs_prod = abs(alpha) * (a.double().abs() @ b.double().abs())
    # dot rounding (2 operands) + fp32 sum over r + the fp32 update + the final rounding to W's type
    u_w = {torch.float32: EPS32, torch.bfloat16: 2.0 ** -9, torch.float16: 2.0 ** -11}[wdtype]
    u_ops = 2 * UNIT[precision] if precision in ("bf16", "fp16") else UNIT[precision]
    bound = 2 * ((u_ops + r * EPS32) * abs_prod + 2 * EPS32 * exact.abs()) + u_w * exact.abs() * 2 + 1e-30
    err = (got.double() - exact).abs()
    assert (err <= bound).all(), f"max err/bound {(err / bound).max():.2f}"


def test_precision_is_read_at_every_call_and_explicit_wins():
    before = torch.get_float32_matmul_precision()
    try:
        for setting, want in (("highest", "ieee"), ("high", "tf32x3"), ("medium", "tf32")):
            torch.set_float32_matmul_precision(setting)
            assert resolve_dot_precision(torch.float32, None) == want
            assert resolve_dot_precision(torch.bfloat16, None) == "bf16"
            assert resolve_dot_precision(torch.float16, None) == "fp16"
            assert resolve_dot_precision(torch.float32, "ieee") == "ieee"
            meta = torch.device("meta")
            (launch,) = back_project_update_plan(torch.empty(64, 64, device=meta), torch.empty(64, 8, device=meta),
                                                 torch.empty(8, 64, device=meta), "left", 1.0, -1.0)
            assert launch.constexprs["DOT"] == want
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("gdtype,bad", [(torch.bfloat16, "tf32"), (torch.float32, "bf16"), (torch.float16, "fp8")])
def test_disallowed_dot_precision_is_refused_before_any_work(gdtype, bad):
    grad, proj = _operands("left", 67, 131, 16, gdtype)
    moments = [torch.zeros(16, 131, device=DEV) for _ in range(3)]
    with pytest.raises(ValueError, match="dot_precision"):
        project_adam_launch(grad, proj, *moments, "left", 0.9, 0.999, 1e-8, 1.0, 1.0, dot_precision=bad)
    assert all(int(t.abs().sum()) == 0 for t in moments)


@pytest.mark.parametrize("shape,side,splits", [((4096, 4096), "right", 2), ((4096, 11008), "left", 1),
                                               ((11008, 4096), "right", 1)])
def test_plans_fill_the_gpu_and_read_g_once(shape, side, splits):
    """On meta tensors (no work): r <= 128 is one r-tile (each G element read once), the grid has
    more than one program per 2 SMs of an H200, split-K only where the tiles alone fill less than
    half of them (4096 x 4096), and the main loop of these shapes needs no mask (EVEN_K)."""
    meta = torch.device("meta")
    m, n = shape
    r = 128
    grad = torch.empty(m, n, dtype=torch.bfloat16, device=meta)
    proj = torch.empty((m, r) if side == "left" else (r, n), dtype=torch.bfloat16, device=meta)
    low = torch.empty((r, n) if side == "left" else (m, r), device=meta)
    (launch,) = project_adam_plan(grad, proj, low, low, low, side, 0.9, 0.999, 1e-8, 1.0, 1.0, arch=90,
                                  num_sms=132, interpret=False)
    c = launch.constexprs
    assert c["BLOCK_A"] >= r and c["DOT"] == "bf16" and c["EVEN_K"] and not c["EMULATE"]
    assert launch.grid[0] >= 66 and c["SPLIT_K"] == (splits > 1)
    length = n if side == "left" else m  # R' is r x length
    assert launch.grid[0] == splits * length // c["BLOCK_L"]


def test_gpu_check_small_runs_end_to_end(tmp_path):
    """benchmarks/gpu_check.py --small: every op against the reference and the fp64 oracle, the
    timing and results-writing path, in the interpreter when there is no GPU (~30 s)."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "gpu_check.py"), "--small",
                           "--out", str(tmp_path)], env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "0 check(s) failed" in proc.stdout
    # the markdown section, and the run saved in pytest-benchmark's format (harness.append_results)
    assert (tmp_path / "gpu_check_small.md").exists()
    assert len([f for _, _, files in os.walk(tmp_path / "gpu_check_small") for f in files if f.endswith(".json")]) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_outlier_count_skips_only_rows_without_outliers(dtype):
    """Pass two skips tile rows whose largest score (from pass one) is not above the cut; the
    count must still be exact: rows with and without outliers, two tensors sharing one mean,
    a column scale on one of them."""
    from owlore_kernels.kernels import outlier_count_launch
    from owlore_kernels.ops.outlier_count import outlier_count_reference

    gen = torch.Generator().manual_seed(2)
    a = (torch.rand(40, 600, generator=gen) * 0.5).to(dtype)  # no outliers in most rows ...
    a[3, 17], a[21, 599], a[39, 0] = 9.0, -7.0, 8.0  # ... a few rows with one
    b = torch.randn(19, 33, generator=gen).to(dtype)
    scale = torch.rand(33, generator=gen) + 0.5
    tensors, scales = [a.to(DEV), b.to(DEV)], [None, scale.to(DEV)]
    mean, count = outlier_count_launch(tensors, 4.0, scales)
    ref_mean, ref_count = outlier_count_reference(tensors, 4.0, scales)
    assert int(count) == int(ref_count) >= 3
    torch.testing.assert_close(mean.cpu(), ref_mean.cpu(), rtol=1e-5, atol=0)  # fp32 sums in other orders
