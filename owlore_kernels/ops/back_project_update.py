"""Back-project + update: W <- beta * W + alpha * (P N), in place.

``side="left"``: P is m x r and N is r x n. ``side="right"``: N is m x r and
Q is r x n, and the product is N Q. The m x n product is never stored: fp32
weights take one ``addmm_`` (the optimizer folds weight decay into beta, and
step size and GaLore's scale into alpha), and bf16/fp16 weights are upcast,
updated and rounded back (round to nearest even) one row chunk at a time.

P (or Q) is fp32 or W's own 16-bit dtype (then upcast: the math is that of the
rounded P); N is fp32.

The op is ``torch.ops.owlore.back_project_update_``; it returns nothing and
writes ``param``. ``torch.ops.owlore.back_project_update_foreach_`` does the
same for a list of weights in one call, each with its own row (beta, alpha) of
``coefficients`` (a float64 CPU tensor of shape (len, 2)), and an optional
``found_inf`` (``torch.amp.GradScaler``'s overflow flag, a one-element floating tensor
on the params' device, read inside the kernels: no host sync on a GPU): nonzero, the
call writes nothing; zero, it is bit for bit the call without it.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from ._registry import call, call_with_scalars, check_backend, foreach_scalars, register
from .._checks import check_back_project_update_args, check_back_project_update_foreach_args, row_chunks

_SCHEMA = "(Tensor(a!) param, Tensor proj, Tensor norm_update, *, str side, {t} beta, {t} alpha) -> ()"
torch.library.define("owlore::back_project_update_", _SCHEMA.format(t="Scalar"))
# beta and alpha as 0-dim CPU tensors: a compiled optimizer step passes them as graph inputs,
# so a new step size (an LR schedule, the bias correction) does not recompile.
torch.library.define("owlore::back_project_update_.tensor", _SCHEMA.format(t="Tensor"))


@torch.library.register_fake("owlore::back_project_update_")
def _back_project_update_fake(param, proj, norm_update, *, side, beta, alpha):
    check_back_project_update_args(param, proj, norm_update, side)


@torch.library.register_fake("owlore::back_project_update_.tensor")
def _back_project_update_tensor_fake(param, proj, norm_update, *, side, beta, alpha):
    check_back_project_update_args(param, proj, norm_update, side, beta, alpha)


@torch.library.register_kernel("owlore::back_project_update_.tensor", None)
def _back_project_update_tensor(param, proj, norm_update, *, side, beta, alpha):
    """Every device: read beta and alpha on the host and run the op's kernel for the tensors' device."""
    torch.ops.owlore.back_project_update_.default(param, proj, norm_update, side=side, beta=beta.item(),
                                                  alpha=alpha.item())


def back_project_update_(
    param: torch.Tensor,
    proj: torch.Tensor,
    norm_update: torch.Tensor,
    *,
    side: str,
    beta: Union[float, torch.Tensor],
    alpha: Union[float, torch.Tensor],
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Apply the GaLore update to ``param`` in place and return it.

    ``beta`` and ``alpha`` are numbers or 0-dim floating CPU tensors (the op's ``.tensor``
    overload: under ``torch.compile`` they are graph inputs, not constants).
    ``backend=None`` lets torch's dispatcher pick the kernel for the tensors' device;
    ``"torch"``, ``"cpp"`` or ``"triton"`` forces one (see ``owlore_kernels.ops``).
    """
    if not torch.compiler.is_compiling():  # when tracing, the op's fake implementation runs them
        check_back_project_update_args(param, proj, norm_update, side, beta, alpha)
    fn, scalars, _ = call_with_scalars("back_project_update", param.device, backend, beta=beta, alpha=alpha)
    fn(param, proj, norm_update, side=side, **scalars)
    return param


def back_project_update_reference(param, proj, norm_update, side, beta, alpha):
    """The pure-PyTorch kernel, positional (the test oracle and the default kernel)."""
    proj = proj.float()  # a 16-bit P or Q (small next to W) is upcast whole
    if param.dtype == torch.float32:
        if side == "left":
            param.addmm_(proj, norm_update, beta=beta, alpha=alpha)
        else:
            param.addmm_(norm_update, proj, beta=beta, alpha=alpha)
        return
    m, n = param.shape
    for rows in row_chunks(m, n):
        w = param[rows].float()
        if side == "left":
            w.addmm_(proj[rows], norm_update, beta=beta, alpha=alpha)
        else:
            w.addmm_(norm_update[rows], proj, beta=beta, alpha=alpha)
        param[rows].copy_(w)  # fp32 -> bf16/fp16 copy rounds to nearest even


@register("back_project_update", "torch")
def _back_project_update_torch(param, proj, norm_update, *, side, beta, alpha):
    back_project_update_reference(param, proj, norm_update, side, beta, alpha)


# --------------------------------------------------------------------------- the foreach op

torch.library.define(
    "owlore::back_project_update_foreach_",
    "(Tensor(a!)[] params, Tensor[] projs, Tensor[] norm_updates, *, str side, Tensor coefficients, "
    "Tensor? found_inf=None) -> ()",
)


@torch.library.register_fake("owlore::back_project_update_foreach_")
def _back_project_update_foreach_fake(params, projs, norm_updates, *, side, coefficients, found_inf=None):
    check_back_project_update_foreach_args(params, projs, norm_updates, side, coefficients, found_inf)


def back_project_update_foreach_(
    params: Sequence[torch.Tensor],
    projs: Sequence[torch.Tensor],
    norm_updates: Sequence[torch.Tensor],
    *,
    side: str,
    coefficients: Union[torch.Tensor, Sequence[Sequence[float]]],
    found_inf: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> None:
    """``back_project_update_`` for every weight i of the lists, in one op call: with
    (beta, alpha) = coefficients[i], ``W <- beta W + alpha P N`` (left) or ``beta W + alpha N Q``
    (right) for W = params[i], P or Q = projs[i], N = norm_updates[i].

    Shapes may differ from weight to weight; dtypes are one per list (params fp32/bf16/fp16, projs
    fp32 or the params' dtype, norm_updates fp32), all tensors on one device. ``coefficients`` is a
    float64 CPU tensor of shape (len, 2), read on the host (no device sync; a graph input under
    ``torch.compile``), or a list of (beta, alpha) pairs, converted once. ``found_inf``
    (``torch.amp.GradScaler``'s overflow flag) is None or a one-element floating tensor on the
    params' device, read inside the kernels (no host sync): nonzero, the call writes nothing; zero,
    it is bit for bit the call without it. Empty lists are a no-op. ``backend`` as for
    ``back_project_update_`` (see ``owlore_kernels.ops``).
    """
    coefficients = foreach_scalars(coefficients, 2)
    if not torch.compiler.is_compiling():  # when tracing, the op's fake implementation runs them
        check_back_project_update_foreach_args(params, projs, norm_updates, side, coefficients, found_inf)
    check_backend(backend)
    if len(params) == 0:
        return
    call("back_project_update_foreach", params[0].device, backend)(params, projs, norm_updates, side=side,
                                                                    coefficients=coefficients, found_inf=found_inf)


def back_project_update_foreach_reference(params, projs, norm_updates, side, coefficients, found_inf=None):
    """The pure-PyTorch kernel, positional: the single-weight reference for each weight.
    ``found_inf`` (a one-element tensor or None) is read with ``.item()``: a host sync on a GPU,
    which the device kernels avoid."""
    if found_inf is not None and found_inf.item() != 0:  # NaN too
        return
    for i, (beta, alpha) in enumerate(coefficients.tolist()):
        back_project_update_reference(params[i], projs[i], norm_updates[i], side, beta, alpha)


@register("back_project_update_foreach", "torch")
def _back_project_update_foreach_torch(params, projs, norm_updates, *, side, coefficients, found_inf=None):
    back_project_update_foreach_reference(params, projs, norm_updates, side, coefficients, found_inf)
