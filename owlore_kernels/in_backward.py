"""In-backward steps: each param is updated as soon as its gradient is ready, then its gradient freed."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator, Union

import torch
import torch.distributed as dist
from torch import nn

from ._dtensor import is_dtensor

__all__ = ["InBackwardSteps"]


class InBackwardSteps:
    """Hooks that step each param as soon as its gradient is ready, then free the gradient.

    Made by ``OwLoreAdamW.register_step_hooks``. Each hooked param is updated
    inside ``loss.backward()``, from ``register_post_accumulate_grad_hook``
    (under FSDP2, after the reduce-scatter, on the sharded gradient), by the
    optimizer's public ``step_param``, and its ``.grad`` is set to None, so at
    most one param's gradient (per FSDP2 unit: the unit's sharded gradients,
    which share one buffer) is alive at a time. ``optimizer.step()`` and
    ``zero_grad()`` then find no gradient and do nothing; LR schedulers keep
    working on the param groups.

    Frozen params are hooked too (their ``requires_grad`` is set for the
    registration and put back at once): a frozen param gets no gradient, so
    its hook never runs, and when it is unfrozen later (``OwLoreSampler``
    resampling, say) it steps in-backward like the rest. Registration is all
    or nothing: if any param cannot be hooked, none is. ``remove()`` removes
    every hook.

    Gradient accumulation: run the backward of every micro-batch but the last
    inside ``with hooks.no_step():``; gradients accumulate in ``.grad`` as
    usual and the last backward steps.

    Clipping by the global gradient norm cannot be done in-backward (no param
    can wait for every gradient): use ``step()`` after backward when you need
    it, or clip each gradient in a post-accumulate-grad hook of your own
    registered before these (hooks run in registration order). With DDP, or
    plain params in a multi-process job, the constructor raises: a hook sees
    the local gradient before DDP averages it.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params: Union[nn.Module, Iterable[torch.Tensor]]):
        if isinstance(params, nn.parallel.DistributedDataParallel):
            raise ValueError(
                "register_step_hooks: the model is wrapped in DistributedDataParallel, whose gradients are still "
                "un-averaged when a param's hook runs (DDP all-reduces buckets afterwards), so each rank would step "
                "on its own gradient. Use optimizer.step() after backward with DDP, or shard with FSDP2 "
                "(fully_shard), whose hooks run after the reduce-scatter."
            )
        wanted = list(params.parameters()) if isinstance(params, nn.Module) else (
            [params] if isinstance(params, torch.Tensor) else list(params))
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [tuple(p.shape) for p in wanted if id(p) not in held]
        if missing:
            raise ValueError(
                f"register_step_hooks: {len(missing)} param(s) (shapes {missing[:5]}) are not in the optimizer; "
                "hooks can only step params the optimizer holds"
            )
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            plain = [tuple(p.shape) for p in wanted if not is_dtensor(p)]
            if plain:
                raise ValueError(
                    f"register_step_hooks: {len(plain)} param(s) (shapes {plain[:5]}) are plain tensors in a "
                    f"{dist.get_world_size()}-process job: with DDP a param's hook sees its local, un-averaged "
                    "gradient (DDP all-reduces later). In-backward steps need FSDP2 (fully_shard) params, or one "
                    "process; with DDP use optimizer.step() after backward."
                )
        optimizer.check_params(wanted)  # raises before any hook exists
        self.optimizer = optimizer
        self.stepping = True
        self._handles: list = []
        try:
            for p in wanted:
                self._handles.append(_register_even_if_frozen(p, self._step_now))
        except BaseException:
            self.remove()
            raise

    def _step_now(self, param: torch.Tensor) -> None:
        if not self.stepping or param.grad is None:
            return
        self.optimizer.step_param(param)
        param.grad = None

    @contextlib.contextmanager
    def no_step(self) -> Iterator[None]:
        """Backward passes inside only accumulate gradients (the micro-batches before the last)."""
        previous, self.stepping = self.stepping, False
        try:
            yield
        finally:
            self.stepping = previous

    def active(self) -> bool:
        """Whether any hook is still registered (``remove()`` not called)."""
        return bool(self._handles)

    def remove(self) -> None:
        """Remove every hook: step() after backward works as usual again."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _register_even_if_frozen(p: torch.Tensor, hook: Callable[[torch.Tensor], None]):
    """``p.register_post_accumulate_grad_hook(hook)``, also for a param that does not require grad now
    (torch refuses those): the hook stays with the tensor across later ``requires_grad_`` toggles."""
    if p.requires_grad:
        return p.register_post_accumulate_grad_hook(hook)
    p.requires_grad_(True)
    try:
        return p.register_post_accumulate_grad_hook(hook)
    finally:
        p.requires_grad_(False)
