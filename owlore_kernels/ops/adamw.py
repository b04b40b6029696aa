"""Plain (non-GaLore) AdamW for a list of weights in one call, elementwise.

For each weight i, with ``(c0, c1, c2) = coefficients[i]`` and g = grads[i] upcast to
the math dtype (fp32; fp64 for fp64 params and moments), per element, in this order::

    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    variant="galore" (galore-torch, HF AdamW):  w = w + c0 * m / (sqrt(v) + eps)
                                                if c1 != 0: w = w + c1 * w
        (c0, c1, c2) = (-lr * sqrt(bc2) / bc1, -lr * wd, 1.0)   (c2 unused; rows may have 2 columns)
    variant="torch"  (torch.optim.AdamW):       w = w * c1
                                                w = w + c0 * m / (sqrt(v) / c2 + eps)
        (c0, c1, c2) = (-lr / bc1, 1 - lr * wd, sqrt(bc2))

with bc1 = 1 - beta1**t, bc2 = 1 - beta2**t. W is stored back in its own dtype (round to
nearest even); bf16 moments are upcast, updated in fp32, used for the update, then stored
back rounded. Weights may have any shape and layout.

``torch.amp.GradScaler`` (as ``torch._fused_adamw_`` takes it), two optional one-element
floating tensors on the weights' device, read inside the kernels (no host sync on a GPU)::

    grad_scale given:  g = upcast(grads[i]) / s,  s = grad_scale rounded to the math dtype
                       (one IEEE-rounded division; exact for GradScaler's powers of two)
    found_inf != 0:    nothing is written (params and moments keep every bit)
    found_inf == 0:    bit for bit the call without it

The op is ``torch.ops.owlore.adamw_foreach_``; it returns nothing and writes ``params``,
``exp_avgs`` and ``exp_avg_sqs``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from ._registry import call, check_backend, foreach_scalars, register
from .._checks import check_adamw_foreach_args, row_chunks

torch.library.define(
    "owlore::adamw_foreach_",
    "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, *, str variant, "
    "float beta1, float beta2, float eps, Tensor coefficients, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()",
)


@torch.library.register_fake("owlore::adamw_foreach_")
def _adamw_foreach_fake(params, grads, exp_avgs, exp_avg_sqs, *, variant, beta1, beta2, eps, coefficients,
                        grad_scale=None, found_inf=None):
    check_adamw_foreach_args(params, grads, exp_avgs, exp_avg_sqs, variant, coefficients, grad_scale, found_inf)


def adamw_foreach_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    *,
    variant: str,
    beta1: float,
    beta2: float,
    eps: float,
    coefficients: Union[torch.Tensor, Sequence[Sequence[float]]],
    grad_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> None:
    """One AdamW step of every weight of ``params``, in one op call (formula: the module docstring).

    Shapes may differ from weight to weight; dtypes are one per list (params fp32/bf16/fp16 with
    fp32 or bf16 moments, or fp64 with fp64 moments; grads the params' dtype), all tensors on one
    device. ``coefficients`` is a float64 CPU tensor of shape (len, 2) or (len, 3) ((len, 3) for
    ``variant="torch"``), read on the host (no device sync; a graph input under ``torch.compile``,
    so a new step count or lr does not recompile), or a list of tuples, converted once.
    ``grad_scale`` (divides every gradient: ``g = upcast(grad) / grad_scale``) and ``found_inf``
    (nonzero: the call writes nothing) are None or one-element floating tensors on the weights'
    device, e.g. ``torch.amp.GradScaler``'s scale and overflow flag; the kernels read them on the
    device, so a skipped step costs no host sync. Empty lists are a no-op. ``backend=None`` lets torch's dispatcher pick the kernel for the tensors' device;
    ``"torch"``, ``"cpp"`` or ``"triton"`` forces one (see ``owlore_kernels.ops``).
    """
    coefficients = foreach_scalars(coefficients, 3 if variant == "torch" else 2)
    if not torch.compiler.is_compiling():  # when tracing, the op's fake implementation runs them
        check_adamw_foreach_args(params, grads, exp_avgs, exp_avg_sqs, variant, coefficients, grad_scale, found_inf)
    check_backend(backend)
    if len(params) == 0:
        return
    call("adamw_foreach", params[0].device, backend)(params, grads, exp_avgs, exp_avg_sqs, variant=variant,
                                                     beta1=beta1, beta2=beta2, eps=eps, coefficients=coefficients,
                                                     grad_scale=grad_scale, found_inf=found_inf)


def _adamw_chunk_(weight_store, grad, m_store, v_store, variant, beta1, beta2, eps, c, grad_scale):
    """The update of one chunk (views of the same elements), in the order of the module docstring."""
    math_dtype = torch.float64 if m_store.dtype == torch.float64 else torch.float32
    g = grad.to(math_dtype)
    if grad_scale is not None:
        # a copy even where .to() returned the grad itself; the number is rounded to the math dtype
        # first, then one IEEE division per element (torch's CPU division; checked in the tests)
        g = g.div(grad_scale)
    m = m_store.to(math_dtype)  # the stored tensors themselves when already in the math dtype
    v = v_store.to(math_dtype)
    m.mul_(beta1).add_(g, alpha=1.0 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    w = weight_store.to(math_dtype)
    if variant == "galore":
        w.addcdiv_(m, v.sqrt().add_(eps), value=c[0])
        if c[1] != 0.0:
            w.add_(w, alpha=c[1])
    else:
        w.mul_(c[1])
        w.addcdiv_(m, v.sqrt().div_(c[2]).add_(eps), value=c[0])
    for store, value in ((weight_store, w), (m_store, m), (v_store, v)):
        if store.dtype != math_dtype:
            store.copy_(value)  # rounds to nearest even


def adamw_reference(param, grad, exp_avg, exp_avg_sq, variant, beta1, beta2, eps, c, grad_scale=None):
    """One weight, positional; ``grad_scale`` a number or None. Chunks of rows (along dim 0, views
    whatever the layout) of about CHUNK_ELEMENTS elements bound the fp32 temporaries of a 16-bit
    weight to a few MB."""
    tensors = [t.unsqueeze(0) if t.dim() == 0 else t for t in (param, grad, exp_avg, exp_avg_sq)]
    rows = tensors[0].shape[0]
    if rows == 0:
        return
    for chunk in row_chunks(rows, tensors[0].numel() // rows):
        _adamw_chunk_(*(t[chunk] for t in tensors), variant, beta1, beta2, eps, c, grad_scale)


def adamw_foreach_reference(params, grads, exp_avgs, exp_avg_sqs, variant, beta1, beta2, eps, coefficients,
                            grad_scale=None, found_inf=None):
    """The pure-PyTorch kernel, positional (the default kernel). ``grad_scale`` and ``found_inf``
    (one-element tensors or None) are read with ``.item()``: a host sync on a GPU, which the
    device kernels avoid."""
    if found_inf is not None and found_inf.item() != 0:  # NaN too
        return
    scale = None if grad_scale is None else grad_scale.item()
    for i, c in enumerate(coefficients.tolist()):
        adamw_reference(params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], variant, beta1, beta2, eps, c, scale)


@register("adamw_foreach", "torch")
def _adamw_foreach_torch(params, grads, exp_avgs, exp_avg_sqs, *, variant, beta1, beta2, eps, coefficients,
                         grad_scale=None, found_inf=None):
    adamw_foreach_reference(params, grads, exp_avgs, exp_avg_sqs, variant, beta1, beta2, eps, coefficients,
                            grad_scale, found_inf)
