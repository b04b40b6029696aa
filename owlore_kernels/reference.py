"""The GaLore-AdamW step written plainly, one param at a time, as a test oracle.

Nothing here is fast or memory-aware: it forms R and P N at full size in fp32.
``OwLoreAdamW`` must agree with it on params and on every state tensor.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from .projector import compute_projection, projection_side, refresh_seed


def reference_step(
    param: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any], index: int = 0
) -> None:
    """Apply one OwLoreAdamW update to ``param`` in place; ``state`` is the param's state dict.

    ``group`` holds the optimizer options (lr, betas, eps, weight_decay, rank,
    update_proj_gap, scale, proj_type, proj_method, oversample, power_iters,
    seed); ``index`` is the param's position across all groups (it seeds the
    randomized refresh).
    """
    beta1, beta2 = group["betas"]
    rank: Optional[int] = group.get("rank")
    galore = rank is not None and rank < min(param.shape)
    g = grad.float()
    if galore:
        side = projection_side(param.shape, group["proj_type"])
        if state.get("step", 0) % group["update_proj_gap"] == 0:
            left, right = compute_projection(
                grad, rank, side, group["proj_method"], oversample=group["oversample"],
                power_iters=group["power_iters"], seed=refresh_seed(group["seed"], index, state.get("step", 0)),
            )
            if left is not None:
                state["proj_left"] = left
            if right is not None:
                state["proj_right"] = right
        P, Q = state.get("proj_left"), state.get("proj_right")
        low = {"left": lambda: P.t() @ g, "right": lambda: g @ Q.t(), "full": lambda: P.t() @ g @ Q.t()}[side]()
    else:
        low = g
    if "exp_avg" not in state:
        state["exp_avg"] = torch.zeros_like(low)
        state["exp_avg_sq"] = torch.zeros_like(low)
    state["step"] = state.get("step", 0) + 1
    t = state["step"]
    m, v = state["exp_avg"], state["exp_avg_sq"]
    m.mul_(beta1).add_((1 - beta1) * low)
    v.mul_(beta2).add_((1 - beta2) * low * low)
    norm = (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + group["eps"])
    if galore:
        full = {"left": lambda: P @ norm, "right": lambda: norm @ Q, "full": lambda: P @ norm @ Q}[side]()
        full = group["scale"] * full
    else:
        full = norm
    w = param.float() * (1 - group["lr"] * group["weight_decay"]) - group["lr"] * full
    param.copy_(w)


def reference_defaults(**overrides: Any) -> dict[str, Any]:
    """OwLoreAdamW's defaults as a plain dict, for driving ``reference_step``."""
    group = dict(
        lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, rank=None, update_proj_gap=200, scale=0.25,
        proj_type="std", proj_method="svd", oversample=8, power_iters=1, seed=0,
    )
    group.update(overrides)
    return group


__all__ = ["reference_step", "reference_defaults"]
