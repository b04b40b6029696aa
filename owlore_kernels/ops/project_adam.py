"""Project + Adam: R = P^T G (or G Q^T), Adam moments updated in place, N written.

The math, per element of the r-dimensional subspace, with the bias corrections
``bc1``, ``bc2`` passed in (``1 - beta^t`` for torch-style Adam at update ``t``;
1.0 for galore-torch's form, which folds them into the step size instead)::

    R    = P^T G                         side="left",  P is m x r, R is r x n
    R    = G Q^T                         side="right", Q is r x n, R is m x r
    m    = beta1 * m + (1 - beta1) * R
    v    = beta2 * v + (1 - beta2) * R^2
    N    = (m / bc1) / (sqrt(v / bc2) + eps)

``m``, ``v``, ``P`` and ``N`` are fp32; ``G`` may be fp32, bf16 or fp16 and is
upcast as it is read. Fast backends keep R in registers (Adam runs in the
matmul's epilogue); the reference materialises R, which is small (r x n).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import register, resolve
from ._checks import check_float, check_projection_shapes, check_same_device, check_side, row_chunks


def project_adam_(
    grad: torch.Tensor,
    proj: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    side: str,
    beta1: float,
    beta2: float,
    eps: float,
    bias_correction1: float,
    bias_correction2: float,
    out: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Update ``exp_avg`` and ``exp_avg_sq`` in place and return N (fp32, the subspace shape).

    ``out``, if given, receives N (fp32, same shape as the moments) and is returned.
    """
    check_side(side)
    check_float("grad", grad)
    for name, t in (("proj", proj), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        check_float(name, t, (torch.float32,))
    check_projection_shapes(side, grad, proj, exp_avg, "project_adam")
    if exp_avg_sq.shape != exp_avg.shape:
        raise ValueError(f"exp_avg_sq shape {tuple(exp_avg_sq.shape)} != exp_avg shape {tuple(exp_avg.shape)}")
    for name, bc in (("bias_correction1", bias_correction1), ("bias_correction2", bias_correction2)):
        if not 0.0 < float(bc) <= 1.0:
            raise ValueError(f"{name} must be in (0, 1] (1 - beta**t, or 1 for none), got {bc}")
    if out is None:
        out = torch.empty_like(exp_avg)
    else:
        check_float("out", out, (torch.float32,))
        if out.shape != exp_avg.shape:
            raise ValueError(f"out shape {tuple(out.shape)} != exp_avg shape {tuple(exp_avg.shape)}")
    check_same_device(("grad", grad), ("proj", proj), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("out", out))
    _, impl = resolve("project_adam", grad.device, backend)
    impl(grad, proj, exp_avg, exp_avg_sq, out, side, float(beta1), float(beta2), float(eps),
         float(bias_correction1), float(bias_correction2))
    return out


def project_reference(grad: torch.Tensor, proj: torch.Tensor, side: str) -> torch.Tensor:
    """R in fp32. A bf16/fp16 ``grad`` is upcast a row chunk at a time, never whole."""
    if grad.dtype == torch.float32:
        return proj.t().mm(grad) if side == "left" else grad.mm(proj.t())
    m, n = grad.shape
    if side == "left":
        low = torch.zeros(proj.shape[1], n, dtype=torch.float32, device=grad.device)
        for rows in row_chunks(m, n):
            low.addmm_(proj[rows].t(), grad[rows].float())
    else:
        low = torch.empty(m, proj.shape[0], dtype=torch.float32, device=grad.device)
        for rows in row_chunks(m, n):
            torch.mm(grad[rows].float(), proj.t(), out=low[rows])
    return low


def adam_normalized_(low, exp_avg, exp_avg_sq, out, beta1, beta2, eps, bias1, bias2):
    """The Adam part of the op on an fp32 subspace tensor ``low`` (R). Writes ``out`` (N)."""
    exp_avg.mul_(beta1).add_(low, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(low, low, value=1.0 - beta2)
    denom = exp_avg_sq.div(bias2).sqrt_().add_(eps)
    torch.div(exp_avg, bias1, out=out)
    out.div_(denom)
    return out


@register("project_adam", "torch")
def project_adam_reference(grad, proj, exp_avg, exp_avg_sq, out, side, beta1, beta2, eps, bias1, bias2):
    low = project_reference(grad, proj, side)
    adam_normalized_(low, exp_avg, exp_avg_sq, out, beta1, beta2, eps, bias1, bias2)
