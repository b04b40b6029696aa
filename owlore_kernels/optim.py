"""OwLoreAdamW: AdamW whose 2-D weights can train in a GaLore low-rank subspace."""
from __future__ import annotations

import difflib
import math
import warnings
from itertools import chain
from typing import Any, Callable, Iterable, NamedTuple, Optional, Union

import torch
from torch.optim import Optimizer

from .distributed import InBackwardSteps, check_param_layout, galore_update_sharded, is_dtensor, local_tensor
from .ops import BACKENDS, resolve
from ._checks import row_chunks
from .ops.back_project_update import back_project_update_
from .ops.project_adam import project_adam_, project_reference
from .projector import PROJ_METHODS, PROJ_TYPES, compute_projection, projection_side, refresh_seed, subspace_shape

__all__ = ["OwLoreAdamW", "VARIANTS"]

# "galore": galore-torch 1.0's GaLoreAdamW (and transformers' old AdamW): eps is added to
# sqrt(v) before the bias correction, which goes into the step size, and weight decay
# multiplies W after the update. "torch": torch.optim.AdamW: eps added to sqrt(v_hat),
# decay first.
VARIANTS = ("galore", "torch")
# Keys a param group may carry besides the options: torch's LR schedulers add
# "initial_lr", users often add "name". Unknown keys are allowed, but one that is a
# near miss of an option (a typo such as "rnak") raises: it would silently make a plain group.
_KNOWN_EXTRA_KEYS = ("params", "initial_lr", "name")


class OwLoreAdamW(Optimizer):
    r"""AdamW with GaLore gradient low-rank projection, for OwLore fine-tuning.

    A drop-in for galore-torch 1.0's ``GaLoreAdamW``: the same param groups
    (``{"params": [...], "rank": 128, "update_proj_gap": 200, "scale": 0.25,
    "proj_type": "std"}``), the same constructor arguments and, by default, the
    same update, so swapping the class changes nothing beyond rounding. A group
    with ``rank`` trains its 2-D weights in a rank-r subspace; every other group
    is plain AdamW. Algorithm, per GaLore weight W (m x n) with gradient G, at
    update t = 1, 2, ... (``variant="galore"``, the default)::

        if (t - 1) % update_proj_gap == 0:  P <- top-r singular vectors of G
        R  = P^T G            (or G Q^T; the side follows proj_type and the shape)
        m  = b1 m + (1 - b1) R ;  v = b2 v + (1 - b2) R^2         (fp32, r-dim)
        N  = m / (sqrt(v) + eps)
        s  = lr sqrt(1 - b2^t) / (1 - b1^t)     (s = lr if correct_bias=False)
        W <- (W - s scale P N) (1 - lr wd)

    A plain weight takes the same with R = G, P = I, scale = 1. As in
    galore-torch, a weight whose rank is >= min(m, n) is still projected (on a
    full basis, so it saves no memory) and still scaled. ``variant="torch"``
    uses torch.optim.AdamW's rule instead: ``N = (m / (1 - b1^t)) / (sqrt(v /
    (1 - b2^t)) + eps)`` and ``W <- W (1 - lr wd) - lr scale P N``; the two
    differ where eps is comparable to sqrt(v), e.g. for gradients of ~1e-5 at
    eps=1e-6, by 10-60% of the first updates.

    Moments are fp32 for fp32/bf16/fp16 params (fp64 for fp64 plain params); P
    is fp32. R and P N are never stored at full size: the fused ops
    (``owlore_kernels.ops``) run Adam in the projection GEMM's epilogue and apply
    the back-projection to W in place; plain weights are updated a row chunk
    at a time, so no step makes a full-size temporary. The state holds only
    tensors and ints, so ``torch.load(weights_only=True)`` reads checkpoints.

    Args:
        params: params or param groups (galore-torch's format works unchanged).
        lr: learning rate (default 1e-3); a float or a 0-dim tensor.
        betas: Adam's (beta1, beta2) (default (0.9, 0.999)).
        eps: Adam's epsilon (default 1e-6, galore-torch's); where it enters
            depends on ``variant``.
        weight_decay: decoupled weight decay (default 0).
        correct_bias: Adam's bias correction (default True; galore-torch's flag).
        no_deprecation_warning: accepted for galore-torch compatibility; this
            class is not deprecated and never warns about it.
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
        variant: ``"galore"`` (default) or ``"torch"``, the update rule above.
        backend: ``None`` (auto: Triton on CUDA, C++ on CPU, else torch) or
            ``"triton"`` / ``"cpp"`` / ``"torch"`` to force one; a forced
            backend that is missing raises at the first step.

    Extra methods: ``release(params)`` frees all state of those params;
    ``state_bytes()`` counts the bytes held in state (this rank's shards under
    FSDP2); ``register_step_hooks(model_or_params)`` steps each param inside
    backward as soon as its gradient is ready and frees that gradient
    (``owlore_kernels.distributed.InBackwardSteps``: gradient accumulation via
    ``no_step()``, ``remove()``; global-norm clipping is not possible there).

    FSDP2 (``fully_shard``) DTensor params are stepped shard by shard without
    gathering a gradient (``owlore_kernels.distributed``); their refresh must be
    ``proj_method="randomized"``.

    ``torch.compile``: ``step`` compiles, alone (``torch.compile(opt.step)``) or
    inside a compiled training step. Its schedule (checks, state, step counts,
    subspace refreshes, step sizes, and sharded GaLore updates, which issue
    collectives) runs eagerly as the one graph break; the updates of the other
    params are one graph whose per-step numbers (bias corrections, learning
    rate, step sizes) are 0-dim CPU tensor inputs. So it compiles once: a new
    step count, learning rate (float or tensor), refreshed basis, or set of
    params with gradients of the same shapes does not recompile. GaLore weights
    get the eager numbers bit for bit (the same fused kernels); plain weights
    get inductor's elementwise code, equal to eager up to rounding.
    ``fullgraph=True`` is not possible (the graph break).
    """

    def __init__(
        self,
        params: Iterable[Union[torch.Tensor, dict[str, Any]]],
        lr: Union[float, torch.Tensor] = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        no_deprecation_warning: bool = False,
        *,
        rank: Optional[int] = None,
        update_proj_gap: int = 200,
        scale: float = 0.25,
        proj_type: str = "std",
        proj_method: str = "svd",
        oversample: int = 8,
        power_iters: int = 1,
        seed: int = 0,
        variant: str = "galore",
        backend: Optional[str] = None,
    ):
        if not isinstance(no_deprecation_warning, bool):
            raise ValueError(f"Invalid no_deprecation_warning={no_deprecation_warning!r}: must be a bool")
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias, rank=rank,
            update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type, proj_method=proj_method,
            oversample=oversample, power_iters=power_iters, seed=seed, variant=variant, backend=backend,
        )
        _check_options(defaults, "")
        super().__init__(params, defaults)
        # torch.optim's load_state_dict casts floating state to the param's dtype (fp32
        # moments of a bf16 param would become bf16); this first post hook restores the
        # saved dtypes before any user hook sees the state.
        self._loading: Optional[dict[str, Any]] = None
        self.register_load_state_dict_post_hook(OwLoreAdamW._restore_saved_dtypes, prepend=True)

    # ----------------------------------------------------------------- groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Check the group (options, keys and, for GaLore groups, 2-D params) before adding it."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        group = {**param_group, "params": params}
        where = f" in param group {len(self.param_groups)}"
        known = set(self.defaults) | set(_KNOWN_EXTRA_KEYS)
        for key in group:
            close = difflib.get_close_matches(str(key), sorted(self.defaults), n=1, cutoff=0.75)
            if key not in known and close:
                raise ValueError(f"Unknown key {key!r}{where}: did you mean {close[0]!r}? (options: {sorted(self.defaults)})")
        merged = {**self.defaults, **group}
        _check_options(merged, where)
        if merged["rank"] is not None:
            for p in params:
                _check_galore_param(p, merged["rank"], where)
            small = sorted({tuple(p.shape) for p in params if merged["rank"] >= min(p.shape)})
            if small:
                warnings.warn(
                    f"rank={merged['rank']}{where} is >= min(m, n) for weight shape(s) {small}: they are projected on "
                    f"a full basis and scaled by scale={merged['scale']}, as galore-torch does, and save no memory",
                    stacklevel=3,
                )
        super().add_param_group(group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_loading", None)
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
        """Bytes held by tensors in the optimizer state (on this rank: a DTensor counts its local shard)."""
        return sum(
            local_tensor(v).numel() * v.element_size()
            for st in self.state.values()
            for v in st.values()
            if isinstance(v, torch.Tensor)
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict()``; state tensors keep their saved dtype (fp32 moments of
        a bf16 param stay fp32) and only move to the param's device."""
        self._loading = state_dict
        try:
            super().load_state_dict(state_dict)
        finally:
            self._loading = None

    @staticmethod
    def _restore_saved_dtypes(self: "OwLoreAdamW") -> None:
        saved = self._loading
        if saved is None:
            return
        saved_ids = chain.from_iterable(g["params"] for g in saved["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for key, p in zip(saved_ids, params):
            for name, value in saved["state"].get(key, {}).items():
                if isinstance(value, torch.Tensor) and value.dtype != self.state[p][name].dtype:
                    self.state[p][name] = value.to(device=p.device, copy=True)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    # ------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """Perform one optimization step; params whose ``grad`` is None are skipped.

        Two parts: ``_schedule`` (checks, state, step counts, subspace refreshes, step sizes,
        sharded updates) runs eagerly, also under ``torch.compile``, where it is the step's one
        graph break; ``_apply`` (the Adam updates and the fused ops) is traced, with the per-step
        numbers as 0-dim tensor inputs, so a compiled step does not recompile as they change.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for update in self._schedule(torch.compiler.is_compiling()):
            _apply(update)
        return loss

    # torch.compiler.disable, applied at the first call (as torch.optim does for its own
    # eager-only methods): importing torch._dynamo, which imports torch.distributed.tensor,
    # takes about a second that `import owlore_kernels` should not cost a user who never compiles
    @torch._disable_dynamo
    def _schedule(self, as_tensors: bool) -> list["_Update"]:
        """Check every param, then advance the state of each param with a gradient and return its
        update for ``_apply``; sharded GaLore params (collectives) are updated here instead.
        ``as_tensors``: the per-step coefficients as a float64 CPU tensor (for a traced ``_apply``)."""
        # index: a param's position across all groups (it seeds the param's refreshes); sharded: a DTensor
        # in a GaLore group, updated whole here (its collectives raise on every rank alike)
        params = [(p, group, group_index, group["rank"] is not None and is_dtensor(p))
                  for group_index, group in enumerate(self.param_groups) for p in group["params"]]
        for index, (p, group, group_index, sharded) in enumerate(params):  # every check before any state moves
            self._check_param(p, group, group_index, index)
            if p.grad is not None and group["rank"] is not None and not sharded:
                self._check_refresh_gradient(p, group, index)
        for index, (p, group, _, sharded) in enumerate(params):
            if p.grad is not None and sharded:
                galore_update_sharded(self, p, group, index)
        updates = []
        before: list[tuple[torch.Tensor, Optional[dict[str, Any]]]] = []
        try:
            for index, (p, group, _, sharded) in enumerate(params):
                if p.grad is not None and not sharded:
                    before.append((p, dict(self.state[p]) if p in self.state else None))
                    updates.append(self._prepare(p, group, index, as_tensors))
        except BaseException:  # e.g. a refresh's decomposition failing: put back the params prepared so far
            for p, state in before:
                if state is None:
                    self.state.pop(p, None)
                else:
                    self.state[p] = state
            raise
        return updates

    def _check_param(self, p: torch.Tensor, group: dict[str, Any], group_index: int, index: int) -> None:
        """Raise if ``p`` (or its gradient) is something this optimizer cannot update; modifies nothing."""
        check_param_layout(p, group, group_index, index)  # sharded (FSDP2) and flattened (DeepSpeed) layouts
        if p.grad is None:
            return
        if p.grad.is_sparse:
            raise RuntimeError("OwLoreAdamW does not support sparse gradients")
        if group["rank"] is not None and not is_dtensor(p):
            _check_galore_param(p, group["rank"], f" in param group {group_index}")
        if group["rank"] is not None and group["backend"] is not None:
            for op in ("project_adam", "back_project_update"):  # a forced backend must be there and run here
                resolve(op, p.device, group["backend"])

    def _step_param(self, p: torch.Tensor, group: dict[str, Any], index: int) -> None:
        """Update one checked param with a gradient now (an in-backward hook), eagerly."""
        if group["rank"] is not None and is_dtensor(p):
            galore_update_sharded(self, p, group, index)
            return
        if group["rank"] is not None:
            self._check_refresh_gradient(p, group, index)
        _apply(self._prepare(p, group, index, as_tensors=False))

    def register_step_hooks(self, params: Union[torch.nn.Module, Iterable[torch.Tensor]]) -> InBackwardSteps:
        """Step each of ``params`` (or a module's params) inside backward, as soon as its gradient is
        ready, and free that gradient; see ``owlore_kernels.distributed.InBackwardSteps``."""
        return InBackwardSteps(self, params)

    def _prepare(self, p: torch.Tensor, group: dict[str, Any], index: int, as_tensors: bool) -> "_Update":
        """Advance ``p``'s state by one update (creating it, refreshing the subspace when due) and
        return what ``_apply`` needs. A DTensor (FSDP2) plain param is updated on its local shards."""
        state = self.state[p]
        beta1, beta2 = group["betas"]
        galore = group["rank"] is not None
        if not galore:
            # fp64 params keep fp64 moments and math; everything else computes in fp32
            math_dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, dtype=math_dtype, memory_format=torch.contiguous_format)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=math_dtype, memory_format=torch.contiguous_format)
            state["step"] += 1
            coefficients = _adamw_coefficients(group, state["step"])
            kind, side, proj, proj_right = ("adamw_" + group["variant"]), "", None, None
        else:
            rank = min(group["rank"], *p.shape)  # galore-torch: a too-large rank is a full basis
            side = projection_side(p.shape, group["proj_type"])
            if not state:
                state["step"] = 0
                shape = subspace_shape(p.shape, rank, side)
                state["exp_avg"] = torch.zeros(shape, dtype=torch.float32, device=p.device)
                state["exp_avg_sq"] = torch.zeros(shape, dtype=torch.float32, device=p.device)
            if self._refresh_due(p, group):
                self._refresh(p, group, index, rank, side)
            state["step"] += 1
            adam, update = _galore_coefficients(group, state["step"])
            coefficients = (adam["bias_correction1"], adam["bias_correction2"], update["beta"], update["alpha"])
            kind = "galore_full" if side == "full" else "galore"
            proj = state["proj_right"] if side == "right" else state["proj_left"]
            proj_right = state["proj_right"] if side == "full" else None
        if as_tensors:
            coefficients = torch.tensor(coefficients, dtype=torch.float64)
        # a traced _apply sees plain tensors (detach: no Parameter, whose identity dynamo would guard)
        return _Update(
            kind=kind, param=local_tensor(p).detach(), grad=local_tensor(p.grad),
            exp_avg=local_tensor(state["exp_avg"]), exp_avg_sq=local_tensor(state["exp_avg_sq"]),
            proj=proj, proj_right=proj_right, side=side, beta1=beta1, beta2=beta2, eps=group["eps"],
            decay=group["weight_decay"] > 0.0, backend=group["backend"], coefficients=coefficients,
        )

    def _check_refresh_gradient(self, p: torch.Tensor, group: dict[str, Any], index: int) -> None:
        """Raise if ``p``'s subspace is due a refresh and its gradient has NaN or inf entries; one
        pass over the gradient per refresh, not per step. Modifies nothing (no state is created)."""
        if self._refresh_due(p, group) and not bool(torch.isfinite(p.grad).all()):
            raise RuntimeError(
                f"OwLoreAdamW: the gradient of param {index} (shape {tuple(p.shape)}) has NaN or inf entries "
                f"at a subspace refresh (update {self._updates_done(p) + 1}); its projection cannot be computed"
            )

    def _updates_done(self, p: torch.Tensor) -> int:
        """Updates ``p`` has had since its state was created (0 without state); creates no state."""
        return self.state[p]["step"] if p in self.state and self.state[p] else 0

    def _refresh_due(self, p: torch.Tensor, group: dict[str, Any]) -> bool:
        """The coming update refreshes ``p``'s subspace: the first one, then every update_proj_gap-th."""
        return self._updates_done(p) % group["update_proj_gap"] == 0

    def _refresh(self, p: torch.Tensor, group: dict[str, Any], index: int, rank: int, side: str) -> None:
        """New bases P and/or Q from ``p``'s current gradient (checked by ``_check_refresh_gradient``)."""
        state, grad = self.state[p], p.grad
        left, right = compute_projection(
            grad, rank, side, group["proj_method"], oversample=group["oversample"],
            power_iters=group["power_iters"], seed=refresh_seed(group["seed"], index, state["step"]),
        )
        for key, basis in (("proj_left", left), ("proj_right", right)):
            if basis is not None:
                state[key] = basis


class _Update(NamedTuple):
    """One param's update, as ``OwLoreAdamW._prepare`` hands it to ``_apply``.

    ``coefficients`` hold the per-step numbers, Python floats (eager) or one float64 CPU tensor
    (under ``torch.compile``, so that they are graph inputs): for ``adamw_galore``
    (-lr sqrt(bc2) / bc1, -lr wd); for ``adamw_torch`` (-lr / bc1, 1 - lr wd, sqrt(bc2)); for
    ``galore`` and ``galore_full`` project_adam_'s bias corrections and back_project_update_'s
    beta and alpha. Everything else is constant from step to step.
    """

    kind: str  # "adamw_galore" | "adamw_torch" | "galore" | "galore_full"
    param: torch.Tensor
    grad: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    proj: Optional[torch.Tensor]  # P (left, full) or Q (right)
    proj_right: Optional[torch.Tensor]  # Q of a two-sided (full) projection
    side: str
    beta1: float
    beta2: float
    eps: float
    decay: bool
    backend: Optional[str]
    coefficients: Union[tuple[float, ...], torch.Tensor]


def _apply(u: _Update) -> None:
    """Apply one prepared update; only tensor math and the fused ops, so torch.compile traces it."""
    c = u.coefficients
    if u.kind.startswith("adamw"):
        _adamw_apply(u, c)
        return
    bias1, bias2, beta, alpha = c[0], c[1], c[2], c[3]
    if u.kind == "galore_full":
        # Two-sided: R = (P^T G) Q^T is the right-side op on the r x n matrix P^T G, and
        # W <- beta W + alpha P (N Q) the left-side back-projection of N Q (r x n).
        low = project_reference(u.grad, u.proj, "left")
        norm = project_adam_(low, u.proj_right, u.exp_avg, u.exp_avg_sq, side="right", beta1=u.beta1,
                             beta2=u.beta2, eps=u.eps, bias_correction1=bias1, bias_correction2=bias2,
                             backend=u.backend)
        back_project_update_(u.param, u.proj, norm.mm(u.proj_right), side="left", beta=beta, alpha=alpha,
                             backend=u.backend)
        return
    norm = project_adam_(u.grad, u.proj, u.exp_avg, u.exp_avg_sq, side=u.side, beta1=u.beta1, beta2=u.beta2,
                         eps=u.eps, bias_correction1=bias1, bias_correction2=bias2, backend=u.backend)
    back_project_update_(u.param, u.proj, norm, side=u.side, beta=beta, alpha=alpha, backend=u.backend)


def _adamw_apply(u: _Update, c: Union[tuple[float, ...], torch.Tensor]) -> None:
    """AdamW on a plain param. Eagerly, one row chunk (~1M elements) at a time: the fp32 copies
    of a bf16 chunk, sqrt(v) and the update are chunk-sized, never full-size (a 7B model's
    131M-entry embedding would otherwise take ~1.5 GB of temporaries). Traced (``c`` is a
    tensor), on the whole tensors: inductor fuses the update into one pass with no temporaries,
    while chunks, in-place updates of views of its inputs, would each rebuild the whole tensor."""
    if isinstance(c, torch.Tensor):
        _adamw_math(u, c, u.param, u.grad, u.exp_avg, u.exp_avg_sq)
        return
    param = u.param
    rows = param.shape[0] if param.dim() > 0 else 1
    cols = param.numel() // max(rows, 1)
    flat = (lambda t: t.reshape(rows, cols)) if param.dim() != 2 else (lambda t: t)
    copy_back = param.dim() != 2 and not param.is_contiguous()  # reshape copies such a param
    weight_all, grad_all = flat(param), flat(u.grad)
    m_all, v_all = flat(u.exp_avg), flat(u.exp_avg_sq)
    for chunk in row_chunks(rows, cols):
        _adamw_math(u, c, weight_all[chunk], grad_all[chunk], m_all[chunk], v_all[chunk])
    if copy_back:
        param.copy_(weight_all.view_as(param))


def _adamw_math(u: _Update, c: Union[tuple[float, ...], torch.Tensor], weight_store: torch.Tensor,
                grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor) -> None:
    """One AdamW update of ``weight_store`` (any dtype) with fp32/fp64 moments ``m``, ``v``, in place."""
    math_dtype = m.dtype
    grad = grad.to(math_dtype)
    m.mul_(u.beta1).add_(grad, alpha=1.0 - u.beta1)
    v.mul_(u.beta2).addcmul_(grad, grad, value=1.0 - u.beta2)
    weight = weight_store.to(math_dtype)
    if u.kind == "adamw_galore":  # W <- (W - lr sqrt(bc2)/bc1 m / (sqrt(v) + eps)) (1 - lr wd)
        _addcdiv_(weight, m, v.sqrt().add_(u.eps), c[0])
        if u.decay:
            _add_scaled_(weight, weight, c[1])
    else:  # W <- W (1 - lr wd) - lr/bc1 m / (sqrt(v / bc2) + eps)
        weight.mul_(c[1])
        _addcdiv_(weight, m, v.sqrt().div_(c[2]).add_(u.eps), c[0])
    if weight_store.dtype != math_dtype:
        weight_store.copy_(weight)  # rounds to nearest even


def _addcdiv_(out: torch.Tensor, num: torch.Tensor, den: torch.Tensor, value: Union[float, torch.Tensor]) -> None:
    """out += value * num / den, where ``value`` is a number (eager) or a 0-dim tensor (traced)."""
    if isinstance(value, torch.Tensor):
        out.addcdiv_(num * value, den)
    else:
        out.addcdiv_(num, den, value=value)


def _add_scaled_(out: torch.Tensor, other: torch.Tensor, value: Union[float, torch.Tensor]) -> None:
    """out += value * other, where ``value`` is a number (eager) or a 0-dim tensor (traced)."""
    if isinstance(value, torch.Tensor):
        out.add_(other * value)
    else:
        out.add_(other, alpha=value)


def _adamw_coefficients(group: dict[str, Any], step: int) -> tuple[float, ...]:
    """The per-step numbers of a plain param's update (see ``_Update``)."""
    lr, wd = float(group["lr"]), group["weight_decay"]
    bias1, bias2 = _bias_corrections(group, step)
    if group["variant"] == "galore":
        return (-lr * math.sqrt(bias2) / bias1, -lr * wd)
    return (-lr / bias1, 1.0 - lr * wd, math.sqrt(bias2))


def _galore_coefficients(group: dict[str, Any], step: int) -> tuple[dict[str, float], dict[str, float]]:
    """Keyword arguments of project_adam_ (``adam``) and back_project_update_ (``update``) at update ``step``;
    shared with the sharded update (``owlore_kernels.distributed``)."""
    beta1, beta2 = group["betas"]
    lr, wd = float(group["lr"]), group["weight_decay"]
    bias1, bias2 = _bias_corrections(group, step)
    if group["variant"] == "galore":
        # N = m / (sqrt(v) + eps); W <- (W - s scale P N)(1 - lr wd), s = lr sqrt(bc2) / bc1
        adam = dict(beta1=beta1, beta2=beta2, eps=group["eps"], bias_correction1=1.0, bias_correction2=1.0)
        decay = 1.0 - lr * wd if wd > 0.0 else 1.0
        update = dict(beta=decay, alpha=-lr * math.sqrt(bias2) / bias1 * group["scale"] * decay)
    else:
        adam = dict(beta1=beta1, beta2=beta2, eps=group["eps"], bias_correction1=bias1, bias_correction2=bias2)
        update = dict(beta=1.0 - lr * wd, alpha=-lr * group["scale"])
    return adam, update


def _bias_corrections(group: dict[str, Any], step: int) -> tuple[float, float]:
    """(1 - beta1^t, 1 - beta2^t), or (1, 1) with correct_bias=False."""
    if not group["correct_bias"]:
        return 1.0, 1.0
    beta1, beta2 = group["betas"]
    return 1.0 - beta1**step, 1.0 - beta2**step


def _check_galore_param(p: torch.Tensor, rank: int, where: str) -> None:
    if p.dim() != 2:
        raise ValueError(
            f"param group has rank={rank}{where} but holds a tensor of shape {tuple(p.shape)}; GaLore groups must "
            f"hold only 2-D weights (put others in a group without rank)"
        )
    if p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(
            f"param group has rank={rank}{where} but holds a {p.dtype} weight of shape {tuple(p.shape)}; GaLore "
            f"weights must be float32, bfloat16 or float16 (put fp64 weights in a group without rank)"
        )


def _check_options(o: dict[str, Any], where: str) -> None:
    """Raise ValueError naming the option and its value; called before anything is modified."""

    def bad(name: str, want: str) -> ValueError:
        return ValueError(f"Invalid {name}={o[name]!r}{where}: {want}")

    def is_number(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    lr = o["lr"]
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1 or not lr.is_floating_point():
            raise bad("lr", "a tensor lr must be a floating 0-dim tensor")
        lr = lr.item()
    if not is_number(lr) or lr < 0:
        raise bad("lr", "must be a finite number >= 0")
    if not is_number(o["eps"]) or o["eps"] < 0:
        raise bad("eps", "must be a finite number >= 0")
    betas = o["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(is_number(b) and 0 <= b < 1 for b in betas)):
        raise bad("betas", "must be two numbers in [0, 1)")
    if not is_number(o["weight_decay"]) or o["weight_decay"] < 0:
        raise bad("weight_decay", "must be a finite number >= 0")
    if not isinstance(o["correct_bias"], bool):
        raise bad("correct_bias", "must be a bool")
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
    if o["variant"] not in VARIANTS:
        raise bad("variant", f"must be one of {VARIANTS}")
    if o["backend"] is not None and o["backend"] not in BACKENDS:
        raise bad("backend", f"must be one of {BACKENDS} or None")
