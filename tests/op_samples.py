"""What the per-op test modules share: the backends to run, sample inputs, error bounds.

Every op is tested the same way on every backend that can run here: ``torch`` (the
reference), ``cpp`` (the C++ extension, CPU) and ``triton`` (CUDA, or CPU tensors under
the interpreter, which conftest.py switches on where there is no GPU). Results are
compared with an fp64 evaluation of the op's formula, within a bound derived from how
the fp32 computation rounds (the functions below, each with its reasoning), so that
the tests pass whatever summation order a BLAS or a kernel uses, on any CPU.
"""
from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from owlore_kernels import ops

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIDES = ["left", "right"]
U32 = 2.0**-24  # fp32 unit roundoff (round to nearest)
# unit roundoff of the 16-bit storage types: 8 and 11 significant bits
UNIT_ROUNDOFF = {torch.float32: U32, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


# --------------------------------------------------------------------------- backends


def backend_device_params(op: str) -> list:
    """pytest params ``(backend, device)``: every backend of ``op`` on every device it runs on here.

    A backend that did not load is still listed, skipped with the reason, so a missing
    extension shows up in the test report instead of silently shrinking it.
    """
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    params = []
    for backend in ("torch", "cpp", "triton"):
        for device in devices:
            if not ops._runs_on(backend, device):
                continue
            marks = []
            if backend not in ops._REGISTRY[op]:
                marks.append(pytest.mark.skip(reason=f"{backend}: {ops._UNAVAILABLE.get(backend, 'not registered')}"))
            params.append(pytest.param(backend, torch.device(device), marks=marks, id=f"{backend}-{device}"))
    return params


def interpreted(backend: str, device: torch.device) -> bool:
    """Triton's CPU interpreter: ~1 ms per program, so only small samples run there."""
    return backend == "triton" and device.type == "cpu"


@contextlib.contextmanager
def dispatching_to(op: str, backend: str, device: torch.device):
    """Make torch's dispatcher run ``backend``'s kernel of ``op`` for ``device`` tensors.

    The natural kernel (C++ on CPU, Triton on CUDA) needs nothing. Otherwise the backend's
    implementation is registered for the device's dispatch key for the duration of the
    block, over the natural one, which the dispatcher restores on exit. This is how
    ``opcheck`` and ``torch.compile`` tests reach the reference and the interpreted
    Triton kernels through the op itself.
    """
    natural = ops._dispatched_backend(op, device.type)
    if backend == natural:
        yield
        return
    key = {"cpu": "CPU", "cuda": "CUDA"}[device.type]
    # torch.library remembers the (op, key) pairs that Python registered and, in torch releases
    # before allow_override defaulted to True, refuses a second Python kernel for one of them: the
    # Triton kernels are registered from Python for CUDA (the C++ ones for CPU are not), so the
    # override needs the pair forgotten for the block and remembered again after it.
    impl_key = f"owlore/{ops.OP_NAMES[op]}/{key}"
    registered = impl_key in torch.library._impls
    torch.library._impls.discard(impl_key)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"(?s).*Overriding a previously registered kernel")
            with torch.library._scoped_library("owlore", "IMPL") as lib:
                lib.impl(ops.OP_NAMES[op], ops._REGISTRY[op][backend], key)
                yield
    finally:
        if registered:
            torch.library._impls.add(impl_key)


# --------------------------------------------------------------------------- sample tensors


def projection(side: str, m: int, n: int, r: int, device="cpu") -> torch.Tensor:
    """P (m x r) for left, Q (r x n) for right, with unit-norm columns of P / rows of Q as
    GaLore's orthonormal bases have, so R = P^T G has O(1) entries for O(1) G. Random rather
    than orthonormal: the ops do not rely on orthonormality, and a QR per case costs time."""
    if side == "left":
        return (torch.randn(m, r) / m**0.5).to(device)
    return (torch.randn(r, n) / n**0.5).to(device)


def low_shape(side: str, m: int, n: int, r: int) -> tuple[int, int]:
    """Shape of R, the moments and N: r x n (left) or m x r (right)."""
    return (r, n) if side == "left" else (m, r)


class LargestNewTensor(TorchDispatchMode):
    """Records the numel of the largest tensor any op creates (outputs of out-of-place ops)."""

    VIEWS = ("aten::view", "aten::slice", "aten::t", "aten::transpose", "aten::select", "aten::as_strided",
             "aten::detach", "aten::_reshape_alias", "aten::alias", "aten::expand", "aten::unsqueeze")

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        writes = any(a.alias_info is not None and a.alias_info.is_write for a in func._schema.arguments)
        if not writes and not func._schema.name.startswith(self.VIEWS):
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.largest = max(self.largest, t.numel())
        return out


# --------------------------------------------------------------------------- error bounds


def gamma(k: int, u: float = U32) -> float:
    """Higham's gamma_k = k u / (1 - k u): a dot product of length k computed in floating
    point, in *any* order (serial, pairwise, blocked, split-K, with or without FMA), is
    within gamma_k * sum_i |x_i y_i| of the exact value (Higham, Accuracy and Stability of
    Numerical Algorithms, 2nd ed., eq. 3.5). That is why the bounds below hold on every
    CPU and BLAS: they do not depend on the order."""
    return k * u / (1 - k * u)


def projection_bound(grad64: torch.Tensor, proj64: torch.Tensor, side: str, dot_rounding: float) -> torch.Tensor:
    """Elementwise bound on |R_fp32 - R_exact| for R = P^T G (left) or G Q^T (right).

    R's entries are dot products of length K (m for left, n for right) of exact inputs
    (fp32 P; G fp32, or bf16/fp16 upcast exactly), so |dR| <= gamma_K * (|P|^T |G|).
    A backend whose dot first rounds P to G's 16-bit type (the Triton tensor-core path for
    bf16/fp16 G) adds ``dot_rounding`` (that type's unit roundoff) times the same sum.
    """
    absolute = proj64.abs().t().mm(grad64.abs()) if side == "left" else grad64.abs().mm(proj64.abs().t())
    k = grad64.shape[0] if side == "left" else grad64.shape[1]
    return (gamma(k + 1) + dot_rounding) * absolute


def adam_oracle(low64, exp_avg64, exp_avg_sq64, beta1, beta2, eps, bc1, bc2):
    """The op's Adam part in fp64: (m, v, N) from R and the old moments."""
    m = beta1 * exp_avg64 + (1 - beta1) * low64
    v = beta2 * exp_avg_sq64 + (1 - beta2) * low64 * low64
    n = (m / bc1) / ((v / bc2).sqrt() + eps)
    return m, v, n


def adam_bounds(low64, r_bound, exp_avg64, exp_avg_sq64, beta1, beta2, eps, bc1, bc2):
    """Elementwise bounds on the fp32 (m, v, N) of a backend, given |R_fp32 - R| <= r_bound.

    Propagation, first order but with the square root handled exactly:
    * m = b1 m0 + (1-b1) R: |dm| <= (1-b1) dR, plus 4u (|b1 m0| + |(1-b1) R|) for the two
      roundings and the fp32 rounding of b1, 1-b1 (u each; 4u leaves one u to spare);
    * v = b2 v0 + (1-b2) R^2: |dv| <= (1-b2)(2|R| dR + dR^2), plus 5u (|b2 v0| + (1-b2) R^2);
    * s = sqrt(v/bc2): |ds| <= min(sqrt(dv'), dv' / sqrt(v')) with v' = v/bc2, dv' = dv/bc2
      (sqrt(a) - sqrt(b) = (a - b)/(sqrt a + sqrt b), and <= sqrt|a - b|), plus 2u s;
    * N = m'/d with m' = m/bc1, d = s + eps: N~ - N = (dm' d - m' dd)/(d d~), so
      |dN| <= (|dm'| + |N| |dd|)/max(d - |dd|, eps), plus 4u |N| for the divisions.
    Where sqrt(v) >> eps, N ~ m/sqrt(v) has relative error ~ dR/|R| (1 + 1/2): the
    "Adam amplifies relative error by ~1.5x" rule; where v ~ 0 the sqrt term takes over.
    """
    u = U32
    m, v, n = adam_oracle(low64, exp_avg64, exp_avg_sq64, beta1, beta2, eps, bc1, bc2)
    dm = (1 - beta1) * r_bound + 4 * u * (beta1 * exp_avg64.abs() + (1 - beta1) * low64.abs())
    dv = (1 - beta2) * (2 * low64.abs() * r_bound + r_bound**2) + 5 * u * (beta2 * exp_avg_sq64 + (1 - beta2) * low64**2)
    v_hat, dv_hat = v / bc2, dv / bc2 + u * v / bc2
    s = v_hat.sqrt()
    ds = torch.minimum(dv_hat.sqrt(), dv_hat / s.clamp_min(1e-300)) + 2 * u * s
    dm_hat = dm / bc1 + u * (m / bc1).abs()
    d = s + eps
    dn = (dm_hat + n.abs() * (ds + u * d)) / torch.clamp(d - ds, min=eps) + 4 * u * n.abs()
    return (m, dm), (v, dv), (n, dn)


def assert_within(actual: torch.Tensor, expected64: torch.Tensor, bound: torch.Tensor, what: str) -> None:
    """|actual - expected| <= bound elementwise (all fp64), with the worst entry in the message."""
    err = (actual.double() - expected64).abs()
    excess = err - bound
    if bool((excess > 0).any()) or not bool(torch.isfinite(actual).all()):
        i = int(torch.argmax(excess))
        raise AssertionError(
            f"{what}: {int((excess > 0).sum())} of {err.numel()} entries outside the error bound; worst at flat "
            f"index {i}: got {actual.flatten()[i].item():.9g}, exact {expected64.flatten()[i].item():.9g}, "
            f"error {err.flatten()[i].item():.3g} > bound {bound.flatten()[i].item():.3g}"
        )


def rounded_bracket(exact64: torch.Tensor, bound: torch.Tensor, dtype: torch.dtype):
    """The lowest and highest ``dtype`` values a correct result can take: a backend computes
    x in fp32 with |x - exact| <= bound, then rounds it to ``dtype`` (nearest even). Rounding
    is monotone, so round(exact - bound) <= round(x) <= round(exact + bound); fp64 -> fp32 ->
    dtype is a composition of monotone roundings, hence monotone too."""
    lo = (exact64 - bound).to(torch.float32).to(dtype)
    hi = (exact64 + bound).to(torch.float32).to(dtype)
    return lo, hi


def exact_product_grid(shape, device="cpu", dtype=torch.float32, high=8) -> torch.Tensor:
    """Small integers (and zeros): every sum of their products is an integer below 2^24,
    exact in fp32 in any order, so results can be compared for equality."""
    return torch.randint(-high, high + 1, shape).to(dtype).to(device)



def over_projection_cases(backends, cases):
    """Parametrize a projection-op test over (backend, device), dtype, side and (m, n, r)."""
    marks = [pytest.mark.parametrize("backend,device", backends), pytest.mark.parametrize("dtype", DTYPES),
             pytest.mark.parametrize("side", SIDES), pytest.mark.parametrize("m,n,r", cases)]

    def wrap(test):
        for mark in reversed(marks):  # innermost first, as stacked decorators apply
            test = mark(test)
        return test

    return wrap
