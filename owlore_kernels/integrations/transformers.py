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
in the plain loop.

Resuming needs nothing more than ``trainer.train(resume_from_checkpoint=...)``:
the sampler's state rides in the Trainer's own state (``trainer_state.json``
of every checkpoint, under ``stateful_callbacks["OwLoreSampler"]``), which
the Trainer reads back from whichever checkpoint it resumes before
``on_train_begin``; there the callback restores the sampler (block
probabilities, generator, step count, active blocks). A resumed run without
that entry (a checkpoint saved without this callback) warns, since the
sampler would restart its sequence. The state is also written to
``owlore_sampler.pt`` in each checkpoint folder, for
``callback.load_checkpoint(checkpoint_dir)`` and loops without the Trainer.
"""
from __future__ import annotations

import os
import warnings
from typing import Any

try:
    from transformers import TrainerCallback
except ImportError as exc:  # transformers is an optional dependency
    raise ImportError(
        "owlore_kernels.integrations.transformers needs the transformers package: pip install transformers"
    ) from exc

import torch

from ..sampler import OwLoreSampler

__all__ = ["OwLoreCallback", "SAMPLER_STATE_NAME", "TRAINER_STATE_KEY"]

SAMPLER_STATE_NAME = "owlore_sampler.pt"
# the key in TrainerState.stateful_callbacks; deliberately not a callback class name, so
# that TrainingArguments(restore_callback_states_from_checkpoint=True) does not try to
# rebuild a callback from it
TRAINER_STATE_KEY = "OwLoreSampler"


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
    Keeps the sampler's state in the Trainer's state, so that a Trainer that
    resumes from a checkpoint resumes the sampler too (see the module
    docstring), and saves it next to each checkpoint (``owlore_sampler.pt``).
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
        if state.global_step > 0:  # the Trainer resumed from a checkpoint
            self._resume(state)

    def _resume(self, state) -> None:
        saved = (getattr(state, "stateful_callbacks", None) or {}).get(TRAINER_STATE_KEY)
        if saved is None:
            if self.sampler.num_steps == state.global_step:
                return  # restored by hand (load_checkpoint) from an owlore_sampler.pt
            warnings.warn(
                f"the Trainer resumed at step {state.global_step} from a checkpoint that holds no OwLoreSampler "
                f"state, so the sampler continues from its step {self.sampler.num_steps} and the run will not match "
                "an uninterrupted one; call callback.load_checkpoint(checkpoint_dir) before trainer.train(...) "
                "if the checkpoint folder has an owlore_sampler.pt",
                stacklevel=2,
            )
            return
        self.sampler.load_state_dict(saved)
        self._last_step = None
        if self.sampler.num_steps != state.global_step:
            warnings.warn(
                f"the restored OwLoreSampler has taken {self.sampler.num_steps} steps but the Trainer resumes at "
                f"step {state.global_step}: the sampler was not stepped by this callback from the start",
                stacklevel=2,
            )

    def on_step_begin(self, args, state, control, **kwargs):
        # once per optimizer step even if a Trainer version calls this per micro-batch
        if self._last_step != state.global_step:
            self._last_step = state.global_step
            self.sampler.step()

    def on_step_end(self, args, state, control, **kwargs):
        # the Trainer writes its state (with this entry) into the checkpoint it may save right
        # after this hook; the sampler only changes in on_step_begin, so this copy is current
        if isinstance(getattr(state, "stateful_callbacks", None), dict):
            state.stateful_callbacks[TRAINER_STATE_KEY] = self.sampler.state_dict()

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if state.is_world_process_zero and os.path.isdir(folder):
            torch.save(self.sampler.state_dict(), os.path.join(folder, SAMPLER_STATE_NAME))

    def load_checkpoint(self, checkpoint_dir: str) -> None:
        """Restore the sampler state saved in ``checkpoint_dir`` (``owlore_sampler.pt``)."""
        path = os.path.join(checkpoint_dir, SAMPLER_STATE_NAME)
        self.sampler.load_state_dict(torch.load(path, weights_only=True))
        self._last_step = None
