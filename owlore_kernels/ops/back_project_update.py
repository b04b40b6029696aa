"""Back-project + update: W <- beta * W + alpha * (P N), in place.

``side="left"``: P is m x r and N is r x n. ``side="right"``: N is m x r and
Q is r x n, and the product is N Q. The m x n product is never stored: fp32
weights take one ``addmm_`` (the optimizer folds weight decay into beta, and
step size and GaLore's scale into alpha), and bf16/fp16 weights are upcast,
updated and rounded back (round to nearest even) one row chunk at a time.

The op is ``torch.ops.owlore.back_project_update_``; it returns nothing and
writes ``param``.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from . import call_with_scalars, register
from .._checks import check_back_project_update_args, row_chunks

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
