"""OwLore with ``transformers.Trainer``: a callback that drives ``OwLoreSampler``.

Wiring (the Trainer must use *our* optimizer, built over every param before
the sampler freezes anything, so that the sampler can free the state of
frozen blocks and later-sampled blocks still train)::

    from owlore_kernels import OwLoreAdamW, OwLoreSampler, owlore_param_groups
    from owlore_kernels.integrations.transformers import OwLoreCallback

    opt = OwLoreAdamW(owlore_param_groups(model, rank=128, update_proj_gap=200, scale=0.25), lr=3e-4)
    sampler = OwLoreSampler(model, opt, gamma=5, interval=50, prob_mode="owl", seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      optimizers=(opt, None),               # None: the Trainer builds its lr scheduler on opt
                      callbacks=[OwLoreCallback(sampler)])
    trainer.train()

``on_step_begin`` runs once per optimizer step (before the first micro-batch
of a gradient-accumulation cycle), so ``interval`` counts optimizer steps as
in the plain loop. The callback writes the sampler state to
``owlore_sampler.pt`` in each checkpoint folder; to resume, call
``callback.load_checkpoint(checkpoint_dir)`` before
``trainer.train(resume_from_checkpoint=checkpoint_dir)``.
"""
from __future__ import annotations

import os
from typing import Any

try:
    from transformers import TrainerCallback
except ImportError as exc:  # transformers is an optional dependency
    raise ImportError(
        "owlore_kernels.integrations.transformers needs the transformers package: pip install transformers"
    ) from exc

import torch

from ..sampler import OwLoreSampler

__all__ = ["OwLoreCallback", "SAMPLER_STATE_NAME"]

SAMPLER_STATE_NAME = "owlore_sampler.pt"


def _unwrap(optimizer: Any) -> Any:
    # accelerate wraps the optimizer (AcceleratedOptimizer.optimizer); so may others
    seen = set()
    while hasattr(optimizer, "optimizer") and id(optimizer) not in seen:
        seen.add(id(optimizer))
        optimizer = optimizer.optimizer
    return optimizer


class OwLoreCallback(TrainerCallback):
    """Calls ``sampler.step()`` at the beginning of every optimizer step of a ``transformers.Trainer``.

    Checks at ``on_train_begin`` that the Trainer steps the optimizer the
    sampler releases state from (pass ``Trainer(optimizers=(opt, None))``),
    and raises ``ValueError`` otherwise: a Trainer-built optimizer created
    after the sampler froze blocks would never train them (LMFlow#726).
    Saves the sampler's state next to each checkpoint (``owlore_sampler.pt``).
    """

    def __init__(self, sampler: OwLoreSampler) -> None:
        if not isinstance(sampler, OwLoreSampler):
            raise TypeError(f"sampler must be an OwLoreSampler, got {type(sampler).__name__}")
        self.sampler = sampler
        self._last_step = None

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        ours = self.sampler.optimizer
        if optimizer is not None and ours is not None and _unwrap(optimizer) is not ours:
            raise ValueError(
                "the Trainer's optimizer is not the one the OwLoreSampler was built with; pass it to the Trainer: "
                "Trainer(..., optimizers=(opt, None))"
            )

    def on_step_begin(self, args, state, control, **kwargs):
        # once per optimizer step even if a Trainer version calls this per micro-batch
        if self._last_step != state.global_step:
            self._last_step = state.global_step
            self.sampler.step()

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if state.is_world_process_zero and os.path.isdir(folder):
            torch.save(self.sampler.state_dict(), os.path.join(folder, SAMPLER_STATE_NAME))

    def load_checkpoint(self, checkpoint_dir: str) -> None:
        """Restore the sampler state saved in ``checkpoint_dir`` (``owlore_sampler.pt``)."""
        path = os.path.join(checkpoint_dir, SAMPLER_STATE_NAME)
        self.sampler.load_state_dict(torch.load(path, weights_only=True))
        self._last_step = None
