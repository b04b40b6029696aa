"""Project + Adam: R = P^T G (or G Q^T), Adam moments updated in place, N written.

The math, per element of the r-dimensional subspace, with the bias corrections
``bc1``, ``bc2`` passed in (``1 - beta^t`` for torch-style Adam at update ``t``;
1.0 for galore-torch's form, which folds them into the step size instead)::

    R    = P^T G                         side="left",  P is m x r, R is r x n
    R    = G Q^T                         side="right", Q is r x n, R is m x r
    m    = beta1 * m + (1 - beta1) * R
    v    = beta2 * v + (1 - beta2) * R^2
    N    = (m / bc1) / (sqrt(v / bc2) + eps)

``G`` may be fp32, bf16 or fp16 and is upcast as it is read; ``P`` is fp32 or
G's own 16-bit dtype (the math is then that of the rounded P); ``m`` and ``v``
are fp32 or bf16 (math in fp32 on the upcast values, N from the fp32 moments,
which are then stored back rounded to nearest even); ``N`` is fp32. Fast backends
keep R in registers (Adam runs in the matmul's epilogue); the reference
materialises R, which is small (r x n).

The op is ``torch.ops.owlore.project_adam_``; it returns nothing and writes
``exp_avg``, ``exp_avg_sq`` and ``out``. ``torch.ops.owlore.project_adam_foreach_``
does the same for a list of weights in one call, each with its own row of
``bias_corrections`` (a float64 CPU tensor of shape (len, 2)), and takes
``torch.amp.GradScaler``'s scale and overflow flag (optional one-element floating
tensors on the grads' device, read inside the kernels: no host sync on a GPU)::

    grad_scale given:  R = fp32(P^T G) / grad_scale   (before the moments)
    found_inf != 0:    nothing is written (moments and outs keep every bit)
    found_inf == 0:    bit for bit the call without it

R is projected from the stored (scaled) G and then divided, r x n (or m x r)
divisions instead of m x n; projection is linear, so this is P^T (G / grad_scale),
exactly so for a power-of-two scale (GradScaler's), barring underflow.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch._subclasses.fake_tensor import is_fake

from ._registry import call, call_with_scalars, check_backend, foreach_scalars, register
from .._checks import (check_bias_corrections, check_foreach_bias_correction_values, check_project_adam_args,
                       check_project_adam_foreach_args, row_chunks)

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
    """R in fp32. A bf16/fp16 ``grad`` is upcast a row chunk at a time, never whole; a 16-bit
    ``proj`` (m x r or r x n, small next to G) at once."""
    proj = proj.float()
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
    """The Adam part of the op on an fp32 subspace tensor ``low`` (R). Writes ``out`` (N).
    bf16 moments are upcast, updated in fp32, used for N, then stored back (nearest even)."""
    m, v = exp_avg.float(), exp_avg_sq.float()  # the moments themselves when fp32
    m.mul_(beta1).add_(low, alpha=1.0 - beta1)
    v.mul_(beta2).addcmul_(low, low, value=1.0 - beta2)
    denom = v.div(bias2).sqrt_().add_(eps)
    torch.div(m, bias1, out=out)
    out.div_(denom)
    if exp_avg.dtype != torch.float32:
        exp_avg.copy_(m)
        exp_avg_sq.copy_(v)
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


# --------------------------------------------------------------------------- the foreach op

torch.library.define(
    "owlore::project_adam_foreach_",
    "(Tensor[] grads, Tensor[] projs, Tensor(a!)[] exp_avgs, Tensor(b!)[] exp_avg_sqs, Tensor(c!)[] outs, *, "
    "str side, float beta1, float beta2, float eps, Tensor bias_corrections, Tensor? grad_scale=None, "
    "Tensor? found_inf=None) -> ()",
)


@torch.library.register_fake("owlore::project_adam_foreach_")
def _project_adam_foreach_fake(grads, projs, exp_avgs, exp_avg_sqs, outs, *, side, beta1, beta2, eps,
                               bias_corrections, grad_scale=None, found_inf=None):
    check_project_adam_foreach_args(grads, projs, exp_avgs, exp_avg_sqs, outs, side, bias_corrections, grad_scale,
                                    found_inf)


def project_adam_foreach_(
    grads: Sequence[torch.Tensor],
    projs: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    outs: Sequence[torch.Tensor],
    *,
    side: str,
    beta1: float,
    beta2: float,
    eps: float,
    bias_corrections: Union[torch.Tensor, Sequence[Sequence[float]]],
    grad_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> None:
    """``project_adam_`` for every weight i of the lists, in one op call::

        project_adam_(grads[i], projs[i], exp_avgs[i], exp_avg_sqs[i], out=outs[i], side=side, beta1=beta1,
                      beta2=beta2, eps=eps, bias_correction1=bias_corrections[i, 0],
                      bias_correction2=bias_corrections[i, 1])

    Shapes may differ from weight to weight; dtypes are one per list (grads fp32/bf16/fp16, projs
    fp32 or the grads' dtype, moments fp32 or bf16, outs fp32), all tensors on one device.
    ``bias_corrections`` is a float64 CPU tensor of shape (len, 2), read on the host (no device
    sync; a graph input under ``torch.compile``, so a new step count does not recompile), or a
    list of (bc1, bc2) pairs, converted once. ``grad_scale`` and ``found_inf``
    (``torch.amp.GradScaler``'s scale and overflow flag) are None or one-element floating tensors
    on the grads' device, read inside the kernels (no host sync)::

        R = fp32(P^T G) / grad_scale     (the moments then see the unscaled gradient's projection)
        found_inf != 0: nothing is written;  found_inf == 0: bit for bit the call without it

    Empty lists are a no-op. ``backend`` as for ``project_adam_`` (see ``owlore_kernels.ops``).
    """
    bias_corrections = foreach_scalars(bias_corrections, 2)
    if not torch.compiler.is_compiling():  # when tracing, the op's fake implementation runs them
        check_project_adam_foreach_args(grads, projs, exp_avgs, exp_avg_sqs, outs, side, bias_corrections,
                                        grad_scale, found_inf)
        if not is_fake(bias_corrections):  # a memory trace's fake tensors have no values to check
            check_foreach_bias_correction_values("project_adam_foreach_", bias_corrections.tolist())
    check_backend(backend)
    if len(grads) == 0:
        return
    call("project_adam_foreach", grads[0].device, backend)(
        grads, projs, exp_avgs, exp_avg_sqs, outs, side=side, beta1=beta1, beta2=beta2, eps=eps,
        bias_corrections=bias_corrections, grad_scale=grad_scale, found_inf=found_inf)


def project_adam_foreach_reference(grads, projs, exp_avgs, exp_avg_sqs, outs, side, beta1, beta2, eps,
                                   bias_corrections, grad_scale=None, found_inf=None):
    """The pure-PyTorch kernel, positional: the single-weight reference for each weight, R divided
    by ``grad_scale`` before the moments. ``grad_scale`` and ``found_inf`` (one-element tensors or
    None) are read with ``.item()``: a host sync on a GPU, which the device kernels avoid."""
    rows = bias_corrections.tolist()
    check_foreach_bias_correction_values("project_adam_foreach_", rows)  # all before the first write
    if found_inf is not None and found_inf.item() != 0:  # NaN too
        return
    scale = None if grad_scale is None else grad_scale.item()
    for i, (bias1, bias2) in enumerate(rows):
        low = project_reference(grads[i], projs[i], side)
        if scale is not None:
            low.div_(scale)  # fp32 R; the number is rounded to fp32, then one IEEE division per element
        adam_normalized_(low, exp_avgs[i], exp_avg_sqs[i], outs[i], beta1, beta2, eps, bias1, bias2)


@register("project_adam_foreach", "torch")
def _project_adam_foreach_torch(grads, projs, exp_avgs, exp_avg_sqs, outs, *, side, beta1, beta2, eps,
                                bias_corrections, grad_scale=None, found_inf=None):
    project_adam_foreach_reference(grads, projs, exp_avgs, exp_avg_sqs, outs, side, beta1, beta2, eps,
                                   bias_corrections, grad_scale, found_inf)
