"""The update rule of OwLoreAdamW, in one place: per-step coefficients, GaLore state and the refresh schedule.

Used by the one-process step (``owlore_kernels.optim``) and the sharded one
(``owlore_kernels.distributed``); it imports neither. Per GaLore weight W with
gradient G, at update t = 1, 2, ... (``variant="galore"``, galore-torch 1.0's rule)::

    if (t - 1) % update_proj_gap == 0:  P <- top-r singular vectors of G
    R = P^T G  (or G Q^T);  m = b1 m + (1 - b1) R;  v = b2 v + (1 - b2) R^2
    N = m / (sqrt(v) + eps)
    W <- (W - s scale P N)(1 - lr wd),  s = lr sqrt(1 - b2^t) / (1 - b1^t)

``variant="torch"`` (torch.optim.AdamW's rule): N = (m / bc1) / (sqrt(v / bc2) + eps) and
W <- W (1 - lr wd) - lr scale P N. The fused ops take the rule as numbers:
``project_adam_``'s bias corrections and ``back_project_update_``'s W <- beta W + alpha P N.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import torch

from .projector import subspace_shape

__all__ = ["VARIANTS", "PlainCoefficients", "GaloreCoefficients", "bias_corrections", "plain_coefficients",
           "galore_coefficients", "updates_done", "refresh_due", "new_galore_state", "nonfinite_refresh_error"]

# "galore": galore-torch 1.0's GaLoreAdamW (and transformers' old AdamW): eps is added to
# sqrt(v) before the bias correction, which goes into the step size, and weight decay
# multiplies W after the update. "torch": torch.optim.AdamW: eps added to sqrt(v_hat),
# decay first.
VARIANTS = ("galore", "torch")


class PlainCoefficients(NamedTuple):
    """The per-step numbers of a plain (non-GaLore) weight's AdamW update.

    ``variant="galore"``: w <- w + step_size m / (sqrt(v) + eps), then w <- w + decay w.
    ``variant="torch"``: w <- w decay, then w <- w + step_size m / (sqrt(v) / denom_scale + eps).
    """

    step_size: float  # galore: -lr sqrt(bc2) / bc1;  torch: -lr / bc1
    decay: float  # galore: -lr wd (added times w);  torch: 1 - lr wd (multiplies w)
    denom_scale: float  # torch: sqrt(bc2);  galore: 1 (unused)


class GaloreCoefficients(NamedTuple):
    """The per-step numbers of one GaLore update: ``project_adam_``'s bias corrections, then
    ``back_project_update_``'s W <- beta W + alpha P N."""

    bias_correction1: float
    bias_correction2: float
    beta: float
    alpha: float


def bias_corrections(group: dict[str, Any], step: int) -> tuple[float, float]:
    """(1 - beta1^t, 1 - beta2^t) at update ``step``, or (1, 1) with correct_bias=False."""
    if not group["correct_bias"]:
        return 1.0, 1.0
    beta1, beta2 = group["betas"]
    return 1.0 - beta1**step, 1.0 - beta2**step


def plain_coefficients(group: dict[str, Any], step: int) -> PlainCoefficients:
    """The numbers of a plain weight's update ``step`` (see ``PlainCoefficients``)."""
    lr, wd = float(group["lr"]), group["weight_decay"]
    bias1, bias2 = bias_corrections(group, step)
    if group["variant"] == "galore":
        return PlainCoefficients(step_size=-lr * math.sqrt(bias2) / bias1, decay=-lr * wd, denom_scale=1.0)
    return PlainCoefficients(step_size=-lr / bias1, decay=1.0 - lr * wd, denom_scale=math.sqrt(bias2))


def galore_coefficients(group: dict[str, Any], step: int) -> GaloreCoefficients:
    """The numbers of a GaLore weight's update ``step`` (see the module docstring)."""
    lr, wd = float(group["lr"]), group["weight_decay"]
    bias1, bias2 = bias_corrections(group, step)
    if group["variant"] == "galore":
        # N = m / (sqrt(v) + eps): the bias corrections go into the step size s instead
        decay = 1.0 - lr * wd if wd > 0.0 else 1.0
        return GaloreCoefficients(1.0, 1.0, beta=decay, alpha=-lr * math.sqrt(bias2) / bias1 * group["scale"] * decay)
    return GaloreCoefficients(bias1, bias2, beta=1.0 - lr * wd, alpha=-lr * group["scale"])


def updates_done(state: dict[str, Any]) -> int:
    """Updates a param has had since its state was created (0 for empty state)."""
    return state["step"] if state else 0


def refresh_due(state: dict[str, Any], group: dict[str, Any]) -> bool:
    """The coming update refreshes the subspace: the first one, then every update_proj_gap-th."""
    return updates_done(state) % group["update_proj_gap"] == 0


def new_galore_state(shape: torch.Size, rank: int, side: str,
                     zeros: Callable[[tuple[int, ...]], torch.Tensor]) -> dict[str, Any]:
    """Fresh state of a GaLore weight of ``shape``: step 0 and zero moments of the subspace's shape,
    made by ``zeros(shape)`` (plain fp32 tensors, or DTensor shards)."""
    low = subspace_shape(shape, rank, side)
    return {"step": 0, "exp_avg": zeros(low), "exp_avg_sq": zeros(low)}


def nonfinite_refresh_error(index: int, shape: torch.Size, update: int) -> RuntimeError:
    """The error for a gradient with NaN or inf entries at a subspace refresh."""
    return RuntimeError(
        f"OwLoreAdamW: the gradient of param {index} (shape {tuple(shape)}) has NaN or inf entries "
        f"at a subspace refresh (update {update}); its projection cannot be computed"
    )
