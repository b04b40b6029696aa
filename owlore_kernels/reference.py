"""The GaLore-AdamW step written plainly, one param at a time, as a test oracle.

Nothing here is fast or memory-aware: it forms R and P N at full size in fp32.
``OwLoreAdamW`` must agree with it on params and on every state tensor.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch

from .projector import compute_projection, projection_side, refresh_seed


def reference_step(
    param: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any], index: int = 0
) -> None:
    """Apply one OwLoreAdamW update to ``param`` in place; ``state`` is the param's state dict.

    ``group`` holds the optimizer options (lr, betas, eps, weight_decay, rank,
    update_proj_gap, scale, proj_type, proj_method, oversample, power_iters,
    seed, correct_bias, variant); ``index`` is the param's position across all groups (it seeds the
    randomized refresh).
    """
    beta1, beta2 = group["betas"]
    rank: Optional[int] = group.get("rank")
    galore = rank is not None
    math_dtype = torch.float64 if param.dtype == torch.float64 else torch.float32
    g = grad.to(math_dtype)
    if galore:
        rank = min(rank, *param.shape)
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
    bias1, bias2 = (1 - beta1**t, 1 - beta2**t) if group.get("correct_bias", True) else (1.0, 1.0)
    lr, wd = float(group["lr"]), group["weight_decay"]
    if group.get("variant", "galore") == "galore":  # galore-torch's rule
        norm = m / (v.sqrt() + group["eps"])
        step_size = lr * math.sqrt(bias2) / bias1
    else:  # torch.optim.AdamW's rule
        norm = (m / bias1) / ((v / bias2).sqrt() + group["eps"])
        step_size = lr
    if galore:
        full = {"left": lambda: P @ norm, "right": lambda: norm @ Q, "full": lambda: P @ norm @ Q}[side]()
        full = group["scale"] * full
    else:
        full = norm
    if group.get("variant", "galore") == "galore":
        w = param.to(math_dtype) - step_size * full
        w = w * (1 - lr * wd)
    else:
        w = param.to(math_dtype) * (1 - lr * wd) - step_size * full
    param.copy_(w)


def reference_defaults(**overrides: Any) -> dict[str, Any]:
    """OwLoreAdamW's defaults as a plain dict, for driving ``reference_step``."""
    group = dict(
        lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, correct_bias=True, rank=None, update_proj_gap=200,
        scale=0.25, proj_type="std", proj_method="svd", oversample=8, power_iters=1, seed=0, variant="galore",
    )
    group.update(overrides)
    return group


__all__ = ["reference_step", "reference_defaults"]
