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

The op is ``torch.ops.owlore.project_adam_``; it returns nothing and writes
``exp_avg``, ``exp_avg_sq`` and ``out``.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from . import call_with_scalars, register
from .._checks import check_bias_corrections, check_project_adam_args, row_chunks

_SCHEMA = ("(Tensor grad, Tensor proj, Tensor(a!) exp_avg, Tensor(b!) exp_avg_sq, Tensor(c!) out, *, str side, "
           "Scalar beta1, Scalar beta2, Scalar eps, {bc} bias_correction1, {bc} bias_correction2) -> ()")
torch.library.define("owlore::project_adam_", _SCHEMA.format(bc="Scalar"))
# The bias corrections as 0-dim CPU tensors: a compiled optimizer step passes them as graph
# inputs, so a new step count does not recompile (a Python number would be a constant).
torch.library.define("owlore::project_adam_.tensor", _SCHEMA.format(bc="Tensor"))


@torch.library.register_fake("owlore::project_adam_")
def _project_adam_fake(grad, proj, exp_avg, exp_avg_sq, out, *, side, beta1, beta2, eps, bias_correction1,
                       bias_correction2):
    check_project_adam_args(grad, proj, exp_avg, exp_avg_sq, out, side, bias_correction1, bias_correction2)


@torch.library.register_fake("owlore::project_adam_.tensor")
def _project_adam_tensor_fake(grad, proj, exp_avg, exp_avg_sq, out, *, side, beta1, beta2, eps, bias_correction1,
                              bias_correction2):
    check_project_adam_args(grad, proj, exp_avg, exp_avg_sq, out, side, bias_correction1, bias_correction2)


@torch.library.register_kernel("owlore::project_adam_.tensor", None)
def _project_adam_tensor(grad, proj, exp_avg, exp_avg_sq, out, *, side, beta1, beta2, eps, bias_correction1,
                         bias_correction2):
    """Every device: read the bias corrections on the host and run the op's kernel for the tensors' device."""
    bc1, bc2 = bias_correction1.item(), bias_correction2.item()
    check_bias_corrections(bc1, bc2)  # the rest was checked by the caller or the fake
    torch.ops.owlore.project_adam_.default(grad, proj, exp_avg, exp_avg_sq, out, side=side, beta1=beta1,
                                           beta2=beta2, eps=eps, bias_correction1=bc1, bias_correction2=bc2)


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
    bias_correction1: Union[float, torch.Tensor],
    bias_correction2: Union[float, torch.Tensor],
    out: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Update ``exp_avg`` and ``exp_avg_sq`` in place and return N (fp32, the subspace shape).

    ``out``, if given, receives N (fp32, same shape as the moments) and is returned.
    The bias corrections are numbers or 0-dim floating CPU tensors (the op's ``.tensor``
    overload: under ``torch.compile`` they are graph inputs, not constants).
    ``backend=None`` lets torch's dispatcher pick the kernel for the tensors' device;
    ``"torch"``, ``"cpp"`` or ``"triton"`` forces one (see ``owlore_kernels.ops``).
    """
    if not torch.compiler.is_compiling():  # when tracing, the op's fake implementation runs them
        check_project_adam_args(grad, proj, exp_avg, exp_avg_sq, out, side, bias_correction1, bias_correction2)
    if out is None:
        out = torch.empty_like(exp_avg)
    fn, scalars, converted = call_with_scalars("project_adam", grad.device, backend,
                                               bias_correction1=bias_correction1, bias_correction2=bias_correction2)
    if converted:  # the values were tensors until now
        check_bias_corrections(**scalars)
    fn(grad, proj, exp_avg, exp_avg_sq, out, side=side, beta1=beta1, beta2=beta2, eps=eps, **scalars)
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


def project_adam_reference(grad, proj, exp_avg, exp_avg_sq, out, side, beta1, beta2, eps, bias1, bias2):
    """The pure-PyTorch kernel, positional (the test oracle and the default kernel)."""
    low = project_reference(grad, proj, side)
    adam_normalized_(low, exp_avg, exp_avg_sq, out, beta1, beta2, eps, bias1, bias2)


@register("project_adam", "torch")
def _project_adam_torch(grad, proj, exp_avg, exp_avg_sq, out, *, side, beta1, beta2, eps, bias_correction1,
                        bias_correction2):
    project_adam_reference(grad, proj, exp_avg, exp_avg_sq, out, side, beta1, beta2, eps, bias_correction1,
                           bias_correction2)
