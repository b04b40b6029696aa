"""OwLoreAdamW: AdamW whose 2-D weights can train in a GaLore low-rank subspace."""
from __future__ import annotations

import math
import warnings
from itertools import chain
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch.optim import Optimizer

from .ops import BACKENDS
from .ops.back_project_update import back_project_update_
from .ops.project_adam import adam_normalized_, project_adam, project_reference
from .projector import PROJ_METHODS, PROJ_TYPES, compute_projection, projection_side, refresh_seed, subspace_shape

__all__ = ["OwLoreAdamW"]

_GALORE_KEYS = ("rank", "update_proj_gap", "scale", "proj_type")


class OwLoreAdamW(Optimizer):
    r"""AdamW with GaLore gradient low-rank projection, for OwLore fine-tuning.

    A param group that carries ``rank`` (galore-torch's format:
    ``{"params": [...], "rank": 128, "update_proj_gap": 200, "scale": 0.25,
    "proj_type": "std"}``) trains its 2-D weights in a rank-r subspace; every
    other group is plain AdamW with decoupled weight decay. Algorithm, per
    GaLore weight W (m x n) with gradient G, at update t = 1, 2, ...::

        if (t - 1) % update_proj_gap == 0:  P <- top-r singular vectors of G
        R  = P^T G            (or G Q^T; the side follows proj_type and the shape)
        m  = b1 m + (1 - b1) R ;  v = b2 v + (1 - b2) R^2         (fp32, r-dim)
        N  = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
        W <- W (1 - lr wd) - lr scale P N

    and for a plain weight the same with R = G, P = I, scale = 1. Moments are
    fp32 whatever the param dtype; P is fp32. R and P N are never stored at
    full size: the fused ops (``owlore_kernels.ops``) run Adam in the
    projection GEMM's epilogue and apply the back-projection to W in place.

    Differences from galore-torch 1.0's ``GaLoreAdamW``: eps is added to
    sqrt(v_hat) as in ``torch.optim.AdamW`` (galore adds it before the bias
    correction), weight decay is applied before the update (as torch), moments
    are fp32 for bf16 params, and the state holds only tensors and ints, so
    ``torch.load(weights_only=True)`` reads checkpoints.

    Args:
        params: params or param groups (galore-torch's format works unchanged).
        lr: learning rate (default 1e-3).
        betas: Adam's (beta1, beta2) (default (0.9, 0.999)).
        eps: added to sqrt(v_hat) (default 1e-6, galore-torch's).
        weight_decay: decoupled weight decay (default 0).
        rank: default rank for groups that do not set one; None (default) means
            groups without ``rank`` are plain AdamW.
        update_proj_gap: refresh P on the first update and every this many
            updates after (default 200, galore-torch's).
        scale: GaLore's scale on the back-projected update (default 0.25).
        proj_type: ``std`` | ``reverse_std`` | ``left`` | ``right`` | ``full``.
        proj_method: ``svd`` (exact, galore-torch's) or ``randomized`` (range
            finder, ~100x faster on CPU; see ``owlore_kernels.projector``).
        oversample, power_iters: the range finder's extra columns (default 8)
            and power iterations (default 1).
        seed: seeds the range finder (per param and refresh), so runs repeat.
        backend: ``None`` (auto: Triton on CUDA, C++ on CPU, else torch) or
            ``"triton"`` / ``"cpp"`` / ``"torch"`` to force one; a forced
            backend that is missing raises at the first step.

    Extra methods: ``release(params)`` frees all state of those params;
    ``state_bytes()`` counts the bytes held in state.
    """

    def __init__(
        self,
        params: Iterable[Union[torch.Tensor, dict[str, Any]]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        rank: Optional[int] = None,
        update_proj_gap: int = 200,
        scale: float = 0.25,
        proj_type: str = "std",
        proj_method: str = "svd",
        oversample: int = 8,
        power_iters: int = 1,
        seed: int = 0,
        backend: Optional[str] = None,
    ):
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank,
            update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type, proj_method=proj_method,
            oversample=oversample, power_iters=power_iters, seed=seed, backend=backend,
        )
        _check_options(defaults, "")
        super().__init__(params, defaults)

    # ----------------------------------------------------------------- groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Check the group (options and, for GaLore groups, 2-D params) before adding it."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        group = {**param_group, "params": params}
        where = f" in param group {len(self.param_groups)}"
        merged = {**self.defaults, **group}
        _check_options(merged, where)
        if merged["rank"] is not None:
            small = []
            for p in params:
                if p.dim() != 2:
                    raise ValueError(
                        f"param group {len(self.param_groups)} has rank={merged['rank']} but holds a tensor of shape "
                        f"{tuple(p.shape)}; GaLore groups must hold only 2-D weights (put others in a group without rank)"
                    )
                if merged["rank"] >= min(p.shape):
                    small.append(tuple(p.shape))
            if small:
                warnings.warn(
                    f"rank={merged['rank']}{where} is >= min(m, n) for {len(small)} weight(s) of shape(s) "
                    f"{sorted(set(small))}; they train with full-rank AdamW instead",
                    stacklevel=3,
                )
        super().add_param_group(group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # checkpoints from before an option existed
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    # ------------------------------------------------------------------ state
    def release(self, params: Union[torch.Tensor, Iterable[torch.Tensor]]) -> None:
        """Free all state (moments, projection, step count) of ``params``.

        A released param that gets a gradient again starts from fresh state.
        Used by ``OwLoreSampler`` when a block is frozen, so memory really drops.
        """
        params = [params] if isinstance(params, torch.Tensor) else params
        for p in params:
            self.state.pop(p, None)

    def state_bytes(self) -> int:
        """Bytes held by tensors in the optimizer state."""
        return sum(
            v.numel() * v.element_size()
            for st in self.state.values()
            for v in st.values()
            if isinstance(v, torch.Tensor)
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict()``, keeping state dtypes as saved.

        ``torch.optim.Optimizer.load_state_dict`` casts floating state to the
        param's dtype, which would turn fp32 moments of a bf16 param into bf16;
        here tensors keep their saved dtype and only move to the param's device.
        """
        saved_state = state_dict["state"]
        super().load_state_dict({**state_dict, "state": {}})
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        id_to_param = dict(zip(saved_ids, params))
        for key, st in saved_state.items():
            p = id_to_param[key]
            self.state[p] = {
                k: v.to(device=p.device, copy=True) if isinstance(v, torch.Tensor) else v for k, v in st.items()
            }
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    # ------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """Perform one optimization step; params whose ``grad`` is None are skipped."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = -1  # position of a param across all groups: seeds its refreshes
        for group in self.param_groups:
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("OwLoreAdamW does not support sparse gradients")
                rank = group["rank"]
                if rank is None or rank >= min(p.shape):
                    self._adamw_update(p, group)
                else:
                    self._galore_update(p, group, index)
        return loss

    def _adamw_update(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        lr, step = group["lr"], state["step"]
        grad = p.grad if p.grad.dtype == torch.float32 else p.grad.float()
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        denom = exp_avg_sq.sqrt().div_(math.sqrt(1.0 - beta2**step)).add_(group["eps"])
        weight = p if p.dtype == torch.float32 else p.float()
        weight.mul_(1.0 - lr * group["weight_decay"])
        weight.addcdiv_(exp_avg, denom, value=-lr / (1.0 - beta1**step))
        if weight is not p:
            p.copy_(weight)  # rounds to nearest even

    def _galore_update(self, p: torch.Tensor, group: dict[str, Any], index: int) -> None:
        state = self.state[p]
        rank = group["rank"]
        side = projection_side(p.shape, group["proj_type"])
        if not state:
            state["step"] = 0
            shape = subspace_shape(p.shape, rank, side)
            state["exp_avg"] = torch.zeros(shape, dtype=torch.float32, device=p.device)
            state["exp_avg_sq"] = torch.zeros(shape, dtype=torch.float32, device=p.device)
        grad = p.grad
        if state["step"] % group["update_proj_gap"] == 0:
            left, right = compute_projection(
                grad, rank, side, group["proj_method"], oversample=group["oversample"],
                power_iters=group["power_iters"], seed=refresh_seed(group["seed"], index, state["step"]),
            )
            for key, basis in (("proj_left", left), ("proj_right", right)):
                if basis is not None:
                    state[key] = basis
        state["step"] += 1
        beta1, beta2 = group["betas"]
        adam = dict(beta1=beta1, beta2=beta2, eps=group["eps"], step=state["step"])
        update = dict(lr=group["lr"], weight_decay=group["weight_decay"], scale=group["scale"], backend=group["backend"])
        if side == "full":
            # Two-sided projection has no fused kernel: R = (P^T G) Q^T with the
            # reference projection, then the fused back-projection of N Q (r x n).
            left, right = state["proj_left"], state["proj_right"]
            low = project_reference(grad, left, "left").mm(right.t())
            norm = adam_normalized_(low, state["exp_avg"], state["exp_avg_sq"], torch.empty_like(low), **adam)
            back_project_update_(p, left, norm.mm(right), side="left", **update)
            return
        proj = state["proj_left"] if side == "left" else state["proj_right"]
        norm = project_adam(grad, proj, state["exp_avg"], state["exp_avg_sq"], side=side, backend=group["backend"], **adam)
        back_project_update_(p, proj, norm, side=side, **update)


def _check_options(o: dict[str, Any], where: str) -> None:
    """Raise ValueError naming the option and its value; called before anything is modified."""

    def bad(name: str, want: str) -> ValueError:
        return ValueError(f"Invalid {name}={o[name]!r}{where}: {want}")

    def is_number(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    if not is_number(o["lr"]) or o["lr"] < 0:
        raise bad("lr", "must be a finite number >= 0")
    if not is_number(o["eps"]) or o["eps"] < 0:
        raise bad("eps", "must be a finite number >= 0")
    betas = o["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(is_number(b) and 0 <= b < 1 for b in betas)):
        raise bad("betas", "must be two numbers in [0, 1)")
    if not is_number(o["weight_decay"]) or o["weight_decay"] < 0:
        raise bad("weight_decay", "must be a finite number >= 0")
    rank = o["rank"]
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise bad("rank", "must be an int >= 1 (or None for plain AdamW)")
    gap = o["update_proj_gap"]
    if not isinstance(gap, int) or isinstance(gap, bool) or gap < 1:
        raise bad("update_proj_gap", "must be an int >= 1")
    if not is_number(o["scale"]):
        raise bad("scale", "must be a finite number")
    if o["proj_type"] not in PROJ_TYPES:
        raise bad("proj_type", f"must be one of {PROJ_TYPES}")
    if o["proj_method"] not in PROJ_METHODS:
        raise bad("proj_method", f"must be one of {PROJ_METHODS}")
    for name in ("oversample", "power_iters", "seed"):
        v = o[name]
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise bad(name, "must be an int >= 0")
    if o["backend"] is not None and o["backend"] not in BACKENDS:
        raise bad("backend", f"must be one of {BACKENDS} or None")
