"""OwLoreAdamW: AdamW whose 2-D weights can train in a GaLore low-rank subspace."""
from __future__ import annotations

import difflib
import math
import weakref
from itertools import chain
from typing import Any, Callable, Iterable, NamedTuple, Optional, Union

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.optim import Optimizer

from ._checks import check_amp_scalar
from ._dtensor import is_dtensor, local_tensor
from .distributed import check_param_layout, galore_update_sharded
from .in_backward import InBackwardSteps
from .ops import BACKENDS, resolve
from .ops._registry import call
from .ops.back_project_update import back_project_update_
from .ops.project_adam import project_adam_, project_reference
from .projector import PROJ_METHODS, PROJ_TYPES, compute_projection, projection_side, refresh_seed
from .resume import check_loadable, check_state_fits, from_galore_torch, is_galore_torch_state
from ._warnings import warn_at_caller
from .update_rule import (VARIANTS, GaloreCoefficients, PlainCoefficients, galore_coefficients, new_galore_state,
                          nonfinite_refresh_error, plain_coefficients, refresh_due, updates_done)

__all__ = ["OwLoreAdamW", "VARIANTS", "STATE_DTYPES"]

# Adam moments: fp32 (default), or bf16 to halve the optimizer state (math stays fp32; each stored
# moment is rounded to bf16, 8 bits of mantissa: a relative error of at most 2^-9 per step)
STATE_DTYPES = (torch.float32, torch.bfloat16)
# Keys a param group may carry besides the options: torch's LR schedulers add
# "initial_lr", users often add "name". Unknown keys are allowed, but one that is a
# near miss of an option (a typo such as "rnak") raises: it would silently make a plain group.
_KNOWN_EXTRA_KEYS = ("params", "initial_lr", "name")
# Keys that are no typo of an option but name one the way other libraries or papers do; a group
# carrying one would silently lose that setting (or become plain AdamW), so they warn.
_OPTION_ALIASES = {"r": "rank", "galore_rank": "rank", "proj_rank": "rank", "proj_gap": "update_proj_gap",
                   "gap": "update_proj_gap", "T": "update_proj_gap", "galore_scale": "scale", "alpha": "scale",
                   "projection_type": "proj_type", "learning_rate": "lr", "wd": "weight_decay",
                   "beta1": "betas", "beta2": "betas"}


def _option_meant(key: str, options: dict[str, Any]) -> Optional[str]:
    """The option an unknown key seems to mean: a known alias, or an option whose words it shares
    (``galore_update_proj_gap`` -> ``update_proj_gap``, ``proj_method_name`` -> ``proj_method``)."""
    if key in _OPTION_ALIASES:
        return _OPTION_ALIASES[key]
    words = set(key.lower().split("_"))
    for option in options:
        option_words = set(option.split("_"))
        if option_words <= words or (len(option_words) > 1 and len(option_words & words) >= 2):
            return option
    return None


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

    Moments are fp32 (``state_dtype=torch.bfloat16``: bf16, half the state; fp64
    for fp64 plain params), the math fp32; P is fp32 (on CUDA, bf16/fp16 weights
    also keep a copy of P in their dtype, ``proj_dot``, for the GEMMs). One step
    is a handful of op calls, not two per weight: the weights are grouped by
    param group, device, dtype and side, and each group takes one call of each
    multi-tensor op (``owlore_kernels.ops``: ``project_adam_foreach_`` runs Adam
    in the projection GEMM's epilogue, ``back_project_update_foreach_`` applies
    P N to W in place, ``adamw_foreach_`` updates the plain weights), so R and
    P N are never stored at full size. The state holds only tensors and ints,
    so ``torch.load(weights_only=True)`` reads checkpoints.

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
        state_dtype: dtype of the Adam moments, ``torch.float32`` (default) or
            ``torch.bfloat16`` (galore-torch keeps them in the weight's dtype).

    NaN or inf gradients are not checked between refreshes (torch's own
    optimizers do not check either): they reach the weights. At a refresh
    they raise, since no basis can be computed from them.

    ``torch.amp.GradScaler`` (fp16 training): ``scaler.step(opt)`` hands the
    optimizer its scale and its found-inf flag as device tensors
    (``grad_scale``, ``found_inf``) instead of unscaling the gradients and
    reading the flag on the host. The fused ops divide the gradients by the
    scale inside their kernels and write nothing when the flag is set, so an
    overflowed step changes no weight or moment and the host never waits for
    it. The host learns of the skip at the start of the next step (or
    ``state_dict()``) and takes the skipped update off the step counts then;
    on CUDA that reads a copy made when the step was issued, long since done.
    A step that refreshes a subspace (or has a ``proj_type="full"`` weight)
    reads the flag at once, since a basis cannot be computed from inf: an
    overflow there skips the whole step and the refresh comes at the next.
    Until the next step, ``opt.state[p]["step"]`` may count a skipped update.
    Not supported with FSDP2 (DTensor) params.

    Extra methods: ``release(params)`` frees all state of those params;
    ``step_param(p)`` steps one param now (checks included);
    ``check_params(params)`` raises for params it could not step;
    ``state_bytes()`` counts the bytes held in state (this rank's shards under
    FSDP2); ``register_step_hooks(model_or_params)`` steps each param inside
    backward as soon as its gradient is ready and frees that gradient
    (``owlore_kernels.in_backward.InBackwardSteps``: gradient accumulation via
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

    # torch.amp.GradScaler sets ``grad_scale`` and ``found_inf`` on the optimizer and calls step()
    # instead of unscaling the gradients and syncing on found_inf itself
    _step_supports_amp_scaling = True

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
        state_dtype: torch.dtype = torch.float32,
    ):
        if not isinstance(no_deprecation_warning, bool):
            raise ValueError(f"Invalid no_deprecation_warning={no_deprecation_warning!r}: must be a bool")
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias, rank=rank,
            update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type, proj_method=proj_method,
            oversample=oversample, power_iters=power_iters, seed=seed, variant=variant, backend=backend,
            state_dtype=state_dtype,
        )
        _check_options(defaults, "")
        super().__init__(params, defaults)
        # torch.optim's load_state_dict casts floating state to the param's dtype (fp32
        # moments of a bf16 param would become bf16); this first post hook restores the
        # saved dtypes before any user hook sees the state.
        self._loading: Optional[dict[str, Any]] = None
        self._pending: Optional[_PendingSkip] = None  # a GradScaler step not yet known to have run
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
            if key in known:
                continue
            close = difflib.get_close_matches(str(key), sorted(self.defaults), n=1, cutoff=0.75)
            if close:
                raise ValueError(f"Unknown key {key!r}{where}: did you mean {close[0]!r}? (options: {sorted(self.defaults)})")
            meant = _option_meant(str(key), self.defaults)
            if meant is not None:
                warn_at_caller(f"Unknown key {key!r}{where} is ignored; did you mean the option {meant!r}? (this "
                               f"group uses {meant}={({**self.defaults, **group})[meant]!r})")
        merged = {**self.defaults, **group}
        _check_options(merged, where)
        if merged["rank"] is not None:
            for p in params:
                _check_galore_param(p, merged["rank"], where)
            small = sorted({tuple(p.shape) for p in params if merged["rank"] >= min(p.shape)})
            if small:
                warn_at_caller(
                    f"rank={merged['rank']}{where} is >= min(m, n) for weight shape(s) {small}: they are projected on "
                    f"a full basis and scaled by scale={merged['scale']}, as galore-torch does, and save no memory"
                )
        super().add_param_group(group)
        self._where = None  # positions of params (``_locate``) are rebuilt on next use

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_loading", None)
        self.__dict__.setdefault("_pending", None)
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

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's ``state_dict``, with the step counts of a GradScaler step made exact first."""
        self._settle_skip()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict()``; state tensors keep their saved dtype (fp32 moments of
        a bf16 param stay fp32) and only move to the param's device.

        The checkpoint is checked against the params it is loaded into before anything is
        loaded (``owlore_kernels.resume.check_loadable``): group and param counts, each group's
        rank and proj_type, and each param's moment and basis shapes; a mismatch raises
        ``ValueError`` naming the param, the expected and the found shape, and nothing changes.
        A galore-torch 1.0 ``GaLoreAdamW`` state dict is taken over (moments, basis and step
        count; ``owlore_kernels.resume.from_galore_torch``), so a galore-torch run continues here.
        """
        if is_galore_torch_state(state_dict):
            state_dict = from_galore_torch(state_dict, self.param_groups)
        check_loadable(self.param_groups, state_dict)
        self._settle_skip()  # a pending GradScaler skip concerns the state being replaced
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

        Reads top to bottom: ``_schedule`` checks every param (again only where what its check read
        has changed, ``_check_params_once``), groups those with a gradient into batches (one per
        param group, device, dtype, moment dtype and projection side), refreshes the subspaces
        that are due and counts the update; then each batch runs its fused ops. ``_schedule`` runs
        eagerly, also under ``torch.compile``, where it is the step's one graph break; the batches
        run traced, with the per-step numbers as tensor inputs, so a compiled step does not
        recompile as they change.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        amp = _AmpInputs(getattr(self, "grad_scale", None), getattr(self, "found_inf", None))
        if (amp.grad_scale is not None or amp.found_inf is not None) and any(
                hooks.active() for hooks in self.__dict__.get("_step_hooks", ())):
            raise RuntimeError("OwLoreAdamW: a torch.amp.GradScaler step with in-backward step hooks registered "
                               "(register_step_hooks): the hooks stepped on scaled gradients that no one unscaled "
                               "or checked for inf. Remove the hooks (hooks.remove()) and step after backward")
        for batch in self._schedule(amp=amp if amp.found_inf is not None or amp.grad_scale is not None else None):
            batch.run()
        return loss

    def step_param(self, p: torch.Tensor) -> None:
        """Update one param now, if it has a gradient (what an in-backward hook calls): the same
        checks, refresh and update as ``step()`` gives it."""
        with torch.no_grad():
            for batch in self._schedule(only=p):
                batch.run()

    def check_params(self, params: Iterable[torch.Tensor]) -> None:
        """Raise if any of ``params`` is not held by this optimizer or (with its gradient, if any) cannot
        be updated by it; modifies nothing."""
        for p in params:
            self._check_param(*self._locate(p))

    def register_step_hooks(self, params: Union[torch.nn.Module, Iterable[torch.Tensor]]) -> InBackwardSteps:
        """Step each of ``params`` (or a module's params) inside backward, as soon as its gradient is
        ready, and free that gradient; see ``owlore_kernels.in_backward.InBackwardSteps``. Not with a
        ``torch.amp.GradScaler``: its ``scaler.step(opt)`` raises while hooks are registered."""
        hooks = InBackwardSteps(self, params)
        if "_step_hooks" not in self.__dict__:
            self._step_hooks = weakref.WeakSet()
        self._step_hooks.add(hooks)
        return hooks

    # torch.compiler.disable, applied at the first call (as torch.optim does for its own
    # eager-only methods): importing torch._dynamo, which imports torch.distributed.tensor,
    # takes about a second that `import owlore_kernels` should not cost a user who never compiles
    @torch._disable_dynamo
    def _schedule(self, only: Optional[torch.Tensor] = None,
                  amp: Optional["_AmpInputs"] = None) -> list[Union["GaloreBatch", "PlainBatch"]]:
        """Everything of one step but the updates of one-process weights, eagerly.

        1. Check every param (or ``only``) before any state moves.
        2. Update sharded GaLore weights here, whole (their collectives are eager).
        3. For the rest: create state, refresh the subspaces that are due, count the update, and
           group them into batches (see ``_CheckedParam.batch_key``). If a refresh fails midway, the params
           already advanced get their state back.
        Each batch carries its per-step numbers as one float64 CPU tensor: the fused ops read it on
        the host, and a traced run takes it as a graph input, so new numbers do not recompile.

        ``amp``: a GradScaler's scale and found-inf flag (see the class docstring). The step is
        issued without reading the flag, and recorded as pending (``_settle_skip``), unless a
        refresh or a two-sided weight needs it read now; then a set flag skips the whole step.
        """
        self._settle_skip()
        checked, states = self._check_params_once(only)
        # (param, its state, whether its coming update refreshes the subspace) of each param to step
        stepping = [(c, state, c.galore and refresh_due(state or {}, c.group))
                    for c, state in zip(checked, states) if c.param.grad is not None]
        if amp is not None and stepping:  # with no gradient at all the scaler passes found_inf=0, an int
            amp = self._check_amp(amp, stepping)
            if amp is None:
                return []  # an overflowed GradScaler step: nothing changes
        for c, state, due in stepping:
            if due and not c.sharded:
                # one pass over G per refresh, not per step; a fake tensor (a memory trace) has no values
                grad = c.param.grad
                if not is_fake(grad) and not bool(torch.isfinite(grad).all()):
                    raise nonfinite_refresh_error(c.index, c.param.shape, updates_done(state or {}) + 1)
        local = stepping
        if any(c.galore and c.sharded for c, _, _ in stepping):
            for c, _, _ in stepping:
                if c.galore and c.sharded:
                    galore_update_sharded(self.state[c.param], c.param, c.group, c.index)
            local = [entry for entry in stepping if not (entry[0].galore and entry[0].sharded)]
        batches: dict[tuple, Union[GaloreBatch, PlainBatch]] = {}
        counted: list[dict[str, Any]] = []  # states whose step count alone advanced
        replaced: list[tuple[torch.Tensor, Optional[dict[str, Any]]]] = []  # (param, a copy of its state before)
        try:
            for c, state, due in local:
                if state and not due:
                    counted.append(state)
                    state["step"] += 1  # the usual step: nothing else of the state changes
                else:
                    replaced.append((c.param, dict(state) if state else None))
                    state = self._advance(c)
                batch = batches.get(c.batch_key)
                if batch is None:
                    batch = batches[c.batch_key] = _new_batch(c)
                batch.add(c, state)
        except BaseException:
            self._undo(counted, replaced)
            raise
        if amp is not None and amp.found_inf is not None and local:
            self._pending = _PendingSkip(amp.found_inf, [c.param for c, _, _ in local])
        return [batch.finish(amp) for batch in batches.values()]

    def _check_amp(self, amp: "_AmpInputs", stepping: list[tuple["_CheckedParam", Optional[dict[str, Any]], bool]]
                   ) -> Optional["_AmpInputs"]:
        """Check a GradScaler's tensors against the params about to step (modifies nothing). Returns
        what the fused ops get, or None for a step to skip: the found-inf flag is read here (a host
        sync) only when a refresh is due or a weight is two-sided (``proj_type="full"``), which
        cannot be issued before the flag is known; a clear flag is then not passed on."""
        for c, _, _ in stepping:
            if c.sharded:
                raise RuntimeError(f"OwLoreAdamW: torch.amp.GradScaler is not supported with sharded (DTensor) params "
                                   f"(param {c.index}, shape {tuple(c.param.shape)})")
        for device in {c.param.device for c, _, _ in stepping}:  # the fused ops' own check, once per device
            for name, t in zip(amp._fields, amp):
                check_amp_scalar("OwLoreAdamW.step (torch.amp.GradScaler)", name, t, device)
        if amp.found_inf is None:
            return amp
        read_now = any(due or c.side == "full" for c, _, due in stepping)
        if not read_now:
            return amp
        if bool(amp.found_inf.item() != 0):
            return None
        return amp._replace(found_inf=None)

    def _settle_skip(self) -> None:
        """Take a skipped GradScaler step off the step counts it advanced (``_PendingSkip``)."""
        pending, self._pending = self._pending, None
        if pending is not None and pending.skipped():
            for p in pending.params:
                state = self.state.get(p)
                if state:
                    state["step"] -= 1

    def _advance(self, c: "_CheckedParam") -> dict[str, Any]:
        """Create the state of ``c.param`` if it has none, refresh its subspace when due, and count
        the update; returns the state."""
        p, group = c.param, c.group
        state = self.state[p]
        # fp64 params keep fp64 moments; the others state_dtype's (fp32 or bf16), math in fp32 always
        moment_dtype = torch.float64 if p.dtype == torch.float64 else group["state_dtype"]
        if not c.galore:
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, dtype=moment_dtype, memory_format=torch.contiguous_format)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=moment_dtype, memory_format=torch.contiguous_format)
        else:
            if not state:
                state.update(new_galore_state(p.shape, c.rank, c.side, lambda shape: torch.zeros(
                    shape, dtype=moment_dtype, device=p.device)))
            if refresh_due(state, group):
                # a GradScaler's scaled gradient s G has the singular vectors of G (for fp16, more of
                # them survive underflow), so the basis comes from it as it is
                left, right = compute_projection(
                    p.grad, c.rank, c.side, group["proj_method"], oversample=group["oversample"],
                    power_iters=group["power_iters"], seed=refresh_seed(group["seed"], c.index, state["step"]),
                )
                for key, basis in (("proj_left", left), ("proj_right", right)):
                    if basis is not None:
                        state[key] = basis
                state.pop("proj_dot", None)  # made again from the new basis (``GaloreBatch.add``)
        state["step"] += 1
        return state

    def _undo(self, counted: list[dict[str, Any]], replaced: list[tuple[torch.Tensor, Optional[dict[str, Any]]]]
              ) -> None:
        """Put back the state the params of a failed schedule had (a refresh's decomposition failed,
        say): ``counted`` are states whose step count alone was advanced, ``replaced`` the params
        that made or refreshed their state, with a shallow copy of the state before (None: none).
        Entries are replaced, never modified in place, so a shallow copy suffices."""
        for state in counted:
            state["step"] -= 1
        for p, before in reversed(replaced):
            if before is None:
                self.state.pop(p, None)
            else:
                self.state[p] = before

    def _locate(self, p: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any], int, int]:
        """(p, group, group index, index) of a held param; raises ValueError for one not held.
        In-backward steps call this once per param and step: a cache of positions, checked at every
        use and rebuilt on a miss, keeps it O(1) instead of a scan of all params."""
        where = self.__dict__.get("_where") or {}
        hit = where.get(id(p))
        if hit is not None:
            group_index, position, index = hit
            groups = self.param_groups
            if group_index < len(groups) and position < len(groups[group_index]["params"]) \
                    and groups[group_index]["params"][position] is p:
                return p, groups[group_index], group_index, index
        where = {}
        index = 0
        for group_index, group in enumerate(self.param_groups):
            for position, q in enumerate(group["params"]):
                where[id(q)] = (group_index, position, index)
                index += 1
        self._where = where
        if id(p) not in where:
            raise ValueError(f"a param of shape {tuple(p.shape)} is not held by this optimizer")
        group_index, _, index = where[id(p)]
        return p, self.param_groups[group_index], group_index, index

    def _check_params_once(self, only: Optional[torch.Tensor] = None
                           ) -> tuple[list["_CheckedParam"], list[Optional[dict[str, Any]]]]:
        """``_check_param`` for each param (or ``only``) whose check could come out differently than
        last time; returns each param's ``_CheckedParam`` and its state (None if it has none), in the
        order of the param groups (a param's position there is its index, which seeds its refreshes).

        A passed check is remembered with what it read: the group's options, the param's and its
        gradient's class, layout, dtype, shape and device (and a DTensor's placements and mesh), and
        the identity of its state dict and state tensors. While all of these are the same, the check is not run again: a step pays for
        a comparison, not for the checks (~25 us per param in Python). New state, a refresh, a
        loaded checkpoint, a gradient of another dtype or a param moved to another device each make
        the next step check that param again."""
        memo: dict[int, _CheckedParam] = self.__dict__.setdefault("_checked", {})
        if only is not None:
            _, group, group_index, index = self._locate(only)
            where = [(group_index, group, [only], index)]
        else:
            where, index = [], 0
            for group_index, group in enumerate(self.param_groups):
                where.append((group_index, group, group["params"], index))
                index += len(group["params"])
        checked, states = [], []
        state_of = self.state
        for group_index, group, params, index in where:
            options = (id(group), group_index, group["rank"], group["proj_type"], group["proj_method"],
                       group["backend"], group["state_dtype"])
            for index, p in enumerate(params, index):
                grad = p.grad
                state = state_of.get(p)
                if grad is None:
                    read = (options, index, type(p), p.dtype, p.shape, p.device, None)
                else:
                    read = (options, index, type(p), p.dtype, p.shape, p.device, type(grad), grad.layout,
                            grad.dtype, grad.shape, grad.device)
                if is_dtensor(p) or is_dtensor(grad):  # the sharded layout the checks compared
                    read += tuple((t.placements, t.device_mesh) if is_dtensor(t) else None for t in (p, grad))
                if state:
                    read += (id(state), type(state.get("step")))
                before = memo.get(id(p))
                if before is None or before.param is not p or before.read != read or not before.same_state(state):
                    self._check_param(p, group, group_index, index)
                    before = memo[id(p)] = _CheckedParam(p, group, index, read, state)
                checked.append(before)
                states.append(state)
        return checked, states

    def _check_param(self, p: torch.Tensor, group: dict[str, Any], group_index: int, index: int) -> None:
        """Raise if ``p`` (or its gradient) is something this optimizer cannot update; modifies nothing."""
        check_param_layout(p, group, group_index, index)  # sharded (FSDP2) and flattened (DeepSpeed) layouts
        if p.grad is None:
            return
        if p.grad.is_sparse:
            raise RuntimeError("OwLoreAdamW does not support sparse gradients")
        where = f"param {index} (param group {group_index}, shape {tuple(p.shape)}, {p.dtype} on {p.device})"
        if p.grad.shape != p.shape or p.grad.dtype != p.dtype or p.grad.device != p.device:
            raise ValueError(f"{where} has a gradient of shape {tuple(p.grad.shape)}, {p.grad.dtype} on "
                             f"{p.grad.device}; it must match the param")
        if p.dtype not in _PARAM_DTYPES:
            raise ValueError(f"{where}: OwLoreAdamW updates params of dtype {_PARAM_DTYPES}")
        if self.state.get(p):  # state loaded or made for another shape fails here, before any param moves
            check_state_fits(self.state[p], p, group, where)
        if _is_galore(group) and not is_dtensor(p):
            _check_galore_param(p, group["rank"], f" in param group {group_index}")
        if group["backend"] is not None:  # a forced backend must be there and run here
            ops = ("project_adam", "back_project_update", "project_adam_foreach", "back_project_update_foreach") \
                if _is_galore(group) else ("adamw_foreach",)
            for op in ops:
                resolve(op, p.device, group["backend"])


# what the fused ops update (GaLore groups: not fp64, checked at construction and each step)
_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _is_galore(group: dict[str, Any]) -> bool:
    return group["rank"] is not None


def _rank_and_side(p: torch.Tensor, group: dict[str, Any]) -> tuple[int, str]:
    """The rank a weight is projected at (galore-torch: a too-large rank is a full basis) and its side."""
    return min(group["rank"], *p.shape), projection_side(p.shape, group["proj_type"])


def _new_batch(c: "_CheckedParam") -> Union["GaloreBatch", "PlainBatch"]:
    group = c.group
    beta1, beta2 = group["betas"]
    common = dict(beta1=beta1, beta2=beta2, eps=group["eps"], backend=group["backend"])
    if c.galore:
        return GaloreBatch(side=c.side, **common)
    return PlainBatch(variant=group["variant"], **common)


class _Batch:
    """Weights updated together by one call of each fused op: their tensors (plain tensors, a DTensor's
    local shard) as lists, and one row of per-step numbers each, which ``finish`` makes one float64
    CPU tensor whose row i belongs to weight i.

    The batches call the ops' kernels (``ops._registry.call``), not their Python wrappers, whose
    argument checks would run per weight at every step: ``_schedule`` has checked each param, its
    gradient and its state (``check_state_fits``: shapes, dtypes, device; see ``_check_params_once``
    for when a check is run again), and the batch makes the
    rest (outputs, per-step numbers) itself. The kernels keep their own checks."""

    def __init__(self, *, beta1: float, beta2: float, eps: float, backend: Optional[str]):
        self.beta1, self.beta2, self.eps, self.backend = beta1, beta2, eps, backend
        self.params: list[torch.Tensor] = []
        self.grads: list[torch.Tensor] = []
        self.exp_avgs: list[torch.Tensor] = []
        self.exp_avg_sqs: list[torch.Tensor] = []
        self.coefficients: Union[list[NamedTuple], torch.Tensor] = []
        self.grad_scale: Optional[torch.Tensor] = None  # a GradScaler's scale and found-inf flag
        self.found_inf: Optional[torch.Tensor] = None
        self._by_step: dict[int, NamedTuple] = {}  # one group per batch: the numbers depend on the step only

    def numbers(self, group: dict[str, Any], step: int, rule: Callable[[dict[str, Any], int], NamedTuple]
                ) -> NamedTuple:
        """``rule(group, step)``, computed once per step count in this batch (most weights share it)."""
        row = self._by_step.get(step)
        if row is None:
            row = self._by_step[step] = rule(group, step)
        return row

    def add(self, c: "_CheckedParam", state: dict[str, Any]) -> None:
        # detach: a traced run sees plain tensors, not Parameters, whose identity dynamo would guard
        p = c.param
        if c.sharded:  # a DTensor param (and its gradient and state): the local shards
            self.params.append(local_tensor(p).detach())
            self.grads.append(local_tensor(p.grad))
            self.exp_avgs.append(local_tensor(state["exp_avg"]))
            self.exp_avg_sqs.append(local_tensor(state["exp_avg_sq"]))
        else:
            self.params.append(p.detach())
            self.grads.append(p.grad)
            self.exp_avgs.append(state["exp_avg"])
            self.exp_avg_sqs.append(state["exp_avg_sq"])

    def finish(self, amp: Optional["_AmpInputs"] = None) -> "_Batch":
        self.coefficients = torch.tensor(self.coefficients, dtype=torch.float64)
        if amp is not None:
            self.grad_scale, self.found_inf = amp
        return self


class GaloreBatch(_Batch):
    """GaLore weights of one group, device, dtype and side: R = P^T G (or G Q^T), Adam in the subspace,
    W <- beta W + alpha P N, with ``GaloreCoefficients`` per weight (the columns of ``coefficients``)."""

    def __init__(self, *, side: str, **common):
        super().__init__(**common)
        self.side = side
        self.projs: list[torch.Tensor] = []  # P (left, full) or Q (right), as the GEMMs read it
        self.proj_rights: list[Optional[torch.Tensor]] = []  # Q of a two-sided (full) projection

    def add(self, c: "_CheckedParam", state: dict[str, Any]) -> None:
        super().add(c, state)
        self.projs.append(_dot_basis(c.param, state, "proj_right" if self.side == "right" else "proj_left"))
        self.proj_rights.append(state["proj_right"] if self.side == "full" else None)
        self.coefficients.append(self.numbers(c.group, state["step"], galore_coefficients))

    def run(self) -> None:
        numbers = self.coefficients  # columns: GaloreCoefficients' fields
        if self.side == "full":
            self._run_two_sided(numbers)
            return
        norms = _fp32_shaped_like(self.exp_avgs)  # N, subspace-sized
        device = self.params[0].device
        call("project_adam_foreach", device, self.backend)(
            self.grads, self.projs, self.exp_avgs, self.exp_avg_sqs, norms, side=self.side, beta1=self.beta1,
            beta2=self.beta2, eps=self.eps, bias_corrections=numbers[:, 0:2].contiguous(),
            grad_scale=self.grad_scale, found_inf=self.found_inf)
        call("back_project_update_foreach", device, self.backend)(
            self.params, self.projs, norms, side=self.side, coefficients=numbers[:, 2:4].contiguous(),
            found_inf=self.found_inf)

    def _run_two_sided(self, numbers: torch.Tensor) -> None:
        """R = (P^T G) Q^T is the right-side op on the r x n matrix P^T G, and W <- beta W + alpha P (N Q)
        the left-side back-projection of N Q (r x n); rare, so one weight at a time. Under a GradScaler
        such a step is issued only once its found-inf flag is known to be clear (``_check_amp``)."""
        assert self.found_inf is None, "a two-sided GaLore step is issued only with a known found-inf flag"
        for i, (weight, grad, proj, proj_right) in enumerate(zip(self.params, self.grads, self.projs,
                                                                 self.proj_rights)):
            c = GaloreCoefficients(*numbers[i])  # 0-dim tensors: the ops' .tensor overloads
            low = project_reference(grad, proj.float(), "left")
            if self.grad_scale is not None:
                low = low / self.grad_scale
            norm = project_adam_(low, proj_right, self.exp_avgs[i], self.exp_avg_sqs[i], side="right",
                                 beta1=self.beta1, beta2=self.beta2, eps=self.eps, bias_correction1=c.bias_correction1,
                                 bias_correction2=c.bias_correction2, backend=self.backend)
            back_project_update_(weight, proj, norm.mm(proj_right), side="left", beta=c.beta, alpha=c.alpha,
                                 backend=self.backend)


class PlainBatch(_Batch):
    """Plain AdamW weights of one group, device and dtype, with ``PlainCoefficients`` per weight."""

    def __init__(self, *, variant: str, **common):
        super().__init__(**common)
        self.variant = variant

    def add(self, c: "_CheckedParam", state: dict[str, Any]) -> None:
        super().add(c, state)
        self.coefficients.append(self.numbers(c.group, state["step"], plain_coefficients))

    def run(self) -> None:
        call("adamw_foreach", self.params[0].device, self.backend)(
            self.params, self.grads, self.exp_avgs, self.exp_avg_sqs, variant=self.variant, beta1=self.beta1,
            beta2=self.beta2, eps=self.eps, coefficients=self.coefficients, grad_scale=self.grad_scale,
            found_inf=self.found_inf)


class _CheckedParam:
    """A param that passed ``OwLoreAdamW._check_param``: what that check read (``read``), weak
    references to the state tensors it checked (weak: a replaced moment or basis is freed, not kept
    alive here; a dead or different reference means the state changed), and what a step needs to
    know of the param that only changes with what was read.

    ``batch_key``: params that share it are updated by one batch: the same group (so the same
    options), device, dtype and moment dtype, and for GaLore weights the same side."""

    __slots__ = ("param", "group", "index", "read", "state_refs", "galore", "sharded", "rank", "side", "batch_key")
    STATE_KEYS = ("exp_avg", "exp_avg_sq", "proj_left", "proj_right")

    def __init__(self, param: torch.Tensor, group: dict[str, Any], index: int, read: tuple,
                 state: Optional[dict[str, Any]]):
        self.param, self.group, self.index, self.read = param, group, index, read
        self.state_refs = tuple(None if not isinstance(t, torch.Tensor) else weakref.ref(t)
                                for t in map((state or {}).get, self.STATE_KEYS))
        self.galore, self.sharded = _is_galore(group), is_dtensor(param)
        self.rank, self.side = _rank_and_side(param, group) if self.galore else (None, "")
        # the moments' dtype: a loaded checkpoint may hold other moments than new state gets
        moments = state["exp_avg"].dtype if state else torch.float64 if param.dtype == torch.float64 else \
            group["state_dtype"]
        self.batch_key = (id(group), param.device, param.dtype, self.side, moments)

    def same_state(self, state: Optional[dict[str, Any]]) -> bool:
        """Whether ``state`` holds the very tensors checked (objects, not values, are compared)."""
        state = state or {}
        for ref, key in zip(self.state_refs, self.STATE_KEYS):
            now = state.get(key)
            if (now is not None) if ref is None else (now is None or ref() is not now):
                return False
        return True


def _fp32_shaped_like(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Uninitialized fp32 tensors of the shapes (and device) of ``tensors``: one allocation per
    distinct shape, cut by ``unbind`` (the weights of a batch share a few shapes; one
    ``empty_like`` per weight cost ~1.3 us of host time each). They live exactly as long together."""
    positions: dict[torch.Size, list[int]] = {}
    for i, t in enumerate(tensors):
        positions.setdefault(t.shape, []).append(i)
    out: list[torch.Tensor] = [None] * len(tensors)  # type: ignore[list-item]
    device = tensors[0].device
    for shape, where in positions.items():
        for i, view in zip(where, torch.empty((len(where), *shape), dtype=torch.float32, device=device).unbind(0)):
            out[i] = view
    return out


class _AmpInputs(NamedTuple):
    """What ``torch.amp.GradScaler.step`` sets on the optimizer: the scale the gradients carry (None
    once ``scaler.unscale_`` has run) and a flag, nonzero when some gradient has inf or NaN."""

    grad_scale: Optional[torch.Tensor]
    found_inf: Optional[torch.Tensor]


class _PendingSkip:
    """A GradScaler step issued before its found-inf flag was read, and the params whose step counts
    it advanced. The flag is copied to the host when the step is issued (on CUDA into pinned memory,
    with an event: nothing waits); ``skipped()`` reads the copy, on CUDA after waiting for that event
    only, which by the next step has long passed."""

    def __init__(self, found_inf: torch.Tensor, params: list[torch.Tensor]):
        self.params = params
        self.ready: Optional[Any] = None
        if found_inf.is_cuda:
            self.flag = torch.empty(found_inf.shape, dtype=found_inf.dtype, pin_memory=True)
            self.flag.copy_(found_inf, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record()
        else:
            self.flag = found_inf.detach().clone()  # the scaler may write the same tensor again

    def skipped(self) -> bool:
        if self.ready is not None:
            self.ready.synchronize()
        return bool(self.flag.item() != 0)


def _keeps_dot_copy(p: torch.Tensor, device_type: Optional[str] = None) -> bool:
    """Whether a step on ``device_type`` (default: ``p``'s) keeps ``proj_dot`` for ``p`` (see ``_dot_basis``).
    The memory estimator's trace, which stands in for a CUDA step on CPU tensors, fixes ``device_type``."""
    on_cuda = p.is_cuda if device_type is None else device_type == "cuda"  # is_cuda: ~0.1 us, device.type ~0.4
    return on_cuda and p.dtype in (torch.bfloat16, torch.float16)


def _dot_basis(p: torch.Tensor, state: dict[str, Any], key: str) -> torch.Tensor:
    """The basis as the projection GEMMs read it. On CUDA with bf16/fp16 weights: a copy in the weight's
    dtype, kept in the state as ``proj_dot`` and made again at each refresh, so that both GEMM operands
    reach the tensor cores in their storage dtype (the GEMM rounds P to that dtype anyway: the same
    numbers, without a conversion per tile). Elsewhere the fp32 basis itself."""
    basis = state[key]
    if not _keeps_dot_copy(p):
        return local_tensor(basis)
    copy = state.get("proj_dot")
    if copy is None or copy.dtype != p.dtype or copy.shape != basis.shape:
        copy = state["proj_dot"] = basis.to(p.dtype)
    return local_tensor(copy)


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
    if o["state_dtype"] not in STATE_DTYPES:
        raise bad("state_dtype", f"must be one of {STATE_DTYPES}")
