"""OwLore's layer sampling: probabilities, sampling, freezing.

OwLore (Li et al., 2024, "OwLore: Outlier-weighed Layerwise Sampled Low-Rank
Projection for Memory-Efficient LLM Fine-tuning") trains, at any time, only
``gamma`` of a model's ``n`` decoder blocks plus a few always-trainable
modules (embeddings, head, final norm, as LISA does), and redraws the
blocks every ``interval`` optimizer steps. Block ``l`` is drawn with
probability proportional to its outlier ratio ``r_l`` (OWL's layerwise outlier
distribution, ``owlore_kernels.outliers``): blocks with more outliers are
trained more often. Inside a sampled block the 2-D weights train with GaLore
(``owlore_kernels.OwLoreAdamW`` over ``owlore_kernels.owlore_param_groups``).

Where the blocks, embeddings and norms are comes from
``owlore_kernels.introspection``, which the outlier scores use too; this
module imports ``outliers`` for the scores, never the other way round. The
param groups live in ``owlore_kernels.param_groups``: they configure the
optimizer, which this module only needs to hold every param.

Typical use::

    groups = owlore_param_groups(model, rank=128, update_proj_gap=200, scale=0.25, proj_type="std")
    opt = OwLoreAdamW(groups, lr=3e-4)
    sampler = OwLoreSampler(model, opt, gamma=5, interval=50, prob_mode="owl", seed=0)
    for batch in loader:
        sampler.step()   # before the forward; resamples on calls 0, interval, 2*interval, ...
        model(**batch).loss.backward(); opt.step(); opt.zero_grad()
"""
from __future__ import annotations

import math
import os
import warnings
from typing import Any, Iterable, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from .introspection import (
    default_always_train,
    find_decoder_blocks,
    module_prefix_matches,
    name_matches,
    unique_named_params,
)
from .outliers import DEFAULT_THRESHOLD, _check_threshold, block_outlier_ratios

__all__ = ["OwLoreSampler", "PROB_MODES"]

PROB_MODES = ("owl", "uniform", "owl_reverse", "increase", "decrease")
# the modes that turn block scores into probabilities; the others ignore scores
_SCORE_MODES = ("owl", "owl_reverse")


class OwLoreSampler:
    r"""Outlier-weighted layer sampling (OwLore): train ``gamma`` of ``n`` decoder blocks at a time.

    Every ``interval`` calls of :meth:`step` (the first call included) it draws
    ``gamma`` distinct blocks with probabilities ``p`` (the law of
    ``numpy.random.Generator.choice(n, gamma, replace=False, p=p)``: successive
    draws, ``p`` renormalized over the blocks left after each), unfreezes
    exactly the drawn blocks' params, freezes every other block
    (``requires_grad=False``, ``.grad=None``) and frees the optimizer state of
    params that went inactive (``optimizer.release``). Modules in
    ``always_train`` train all the time; every other param outside the blocks
    is frozen.

    Probabilities (``prob_mode``), from block outlier ratios ``r_l`` (or the
    block index ``l = 0..n-1``):

    * ``"owl"`` (OwLore): ``p_l = r_l / sum(r)``; all-zero ratios fall back to
      uniform with a warning;
    * ``"owl_reverse"``: ``p_l ∝ max(p_owl) - p_owl_l`` (uniform when all equal);
    * ``"uniform"``: ``p_l = 1/n`` (LISA's middle-block sampling over all blocks);
    * ``"increase"`` / ``"decrease"``: ``p_l ∝ l + 1`` / ``p_l ∝ n - l``;
    * an array of ``n`` non-negative numbers: used after normalization.

    Sampling is without replacement, so a block with ``p_l = 0`` is never
    drawn; fewer than ``gamma`` blocks with ``p_l > 0`` raise ``ValueError``
    (lower ``gamma``, or pick another ``prob_mode`` or ``threshold``).

    Frozen params stay frozen: the sampler records which params are trainable
    (``requires_grad=True``) when it is built and only ever toggles those. A
    block is "trained" by unfreezing its trainable params; params frozen
    before (by PEFT -- base weights, embeddings, head of a LoRA model -- or by
    the caller) are never unfrozen, never get a ``.grad`` and never change. So
    with PEFT the sampler picks the blocks whose adapters train, and PEFT's
    ``save_pretrained`` saves all that trained. Build the sampler after the
    freezing that is meant to last (``get_peft_model``) and before anything
    that should be undone by it.

    Args:
        model: the model (HF causal LM, a PEFT model, or any torch model with
            an ``nn.ModuleList`` of blocks).
        optimizer: built over every param *before* this sampler (see
            :func:`owlore_param_groups`); every trainable block param must be
            in it, so blocks sampled later really train. ``None`` only freezes.
            Optimizers without ``release`` have their ``state[p]`` dropped.
        gamma: blocks trained at a time (OwLore: 5 of 32 for LLaMA-2-7B).
        interval: optimizer steps between resamples (OwLore: K = 50).
        prob_mode: see above (default ``"owl"``).
        seed: seeds ``numpy.random.Generator(PCG64(seed))``; equal seeds give
            equal block sequences.
        scores: the ``n`` block scores for ``"owl"``/``"owl_reverse"`` (the
            other modes use none: passing them there raises): a sequence of
            numbers, or a path to a text file with one number per line.
            ``None`` computes them with :func:`block_outlier_ratios`
            (weight-only, or activation-aware with ``calibration``).
        threshold: outlier threshold for computing scores (default
            ``owlore_kernels.outliers.DEFAULT_THRESHOLD``, OWL's ``M`` = 5).
        calibration: batches for activation-aware scores (see
            :func:`block_outlier_ratios`). ``threshold`` and ``calibration``
            only serve to compute scores: with ``scores`` given, or a mode
            without scores, they raise rather than be ignored.
        layers_attr: dotted path of the block list, overriding discovery.
        always_train: module names or glob patterns (matched against module
            and param names outside the blocks) that always train; ``None``
            (default): input/output embeddings, the norms outside the blocks
            and PEFT's ``modules_to_save`` copies, as far as they are
            trainable; ``[]``: nothing outside the blocks trains.

    Construction checks everything before touching the model or optimizer
    (``ValueError`` naming the argument); it freezes the trainable params
    outside the blocks that are not always-trainable, and leaves the blocks as
    they are until the first :meth:`step`.

    Attributes: ``probabilities`` (1-D float64 numpy array summing to 1),
    ``active_layers`` (sorted block indices, empty before the first step),
    ``scores``, ``num_blocks``, ``layers_attr``, ``always_train`` (resolved
    module names that hold a trainable param), ``num_steps`` (calls of
    :meth:`step` so far).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Optional[torch.optim.Optimizer],
        gamma: int = 5,
        interval: int = 50,
        prob_mode: Union[str, Sequence[float], np.ndarray] = "owl",
        seed: int = 0,
        *,
        scores: Union[None, str, os.PathLike, Sequence[float], np.ndarray, torch.Tensor] = None,
        threshold: Optional[float] = None,
        calibration: Optional[Iterable[Any]] = None,
        layers_attr: Optional[str] = None,
        always_train: Optional[Sequence[str]] = None,
    ) -> None:
        # Everything is checked before the model or optimizer is touched: six steps, each a
        # function of this module that modifies nothing.
        path, blocks = discover_blocks(model, layers_attr)
        n = len(blocks)
        threshold = check_arguments(n, gamma, interval, seed, prob_mode, scores, threshold, calibration)
        plan = decide_trainable(model, path, blocks, always_train)
        check_optimizer_holds(optimizer, plan)
        scores = block_scores(model, path, n, prob_mode, scores, threshold, calibration)
        probabilities = sampling_probabilities(prob_mode, scores, n, gamma)
        idle = [i for i, params in enumerate(plan.block_params) if not params]
        if idle:
            warnings.warn(
                f"blocks {idle} of {n} hold no trainable parameter (frozen before the sampler was built, e.g. no "
                "PEFT adapter there); an interval that draws them trains nothing in them",
                stacklevel=2,
            )

        self.model = model
        self.optimizer = optimizer
        self.gamma = int(gamma)
        self.interval = int(interval)
        self.prob_mode = prob_mode if isinstance(prob_mode, str) else "explicit"
        self.seed = int(seed)
        self.scores = None if scores is None else np.asarray(scores, dtype=np.float64)
        self.layers_attr = path
        self.num_blocks = n
        self.always_train = plan.always_names
        self.probabilities = probabilities
        # the trainable params of each block: the only ones the sampler ever toggles
        self._block_params = plan.block_params
        self._rng = np.random.Generator(np.random.PCG64(self.seed))
        self.num_steps = 0
        self.active_layers: list[int] = []
        # freeze what is trainable outside the blocks and not always-trainable, once
        self._freeze(plan.frozen_by_sampler)

    # ------------------------------------------------------------- sampling
    def step(self) -> Optional[list[int]]:
        """Call once per optimizer step, before the forward; resamples on calls 0, interval, 2 interval, ...

        Returns the new ``active_layers`` when it resampled, else None.
        """
        resampled = None
        if self.num_steps % self.interval == 0:
            resampled = self.resample()
        self.num_steps += 1
        return resampled

    def resample(self) -> list[int]:
        """Draw ``gamma`` blocks now (consumes the generator) and apply them; returns ``active_layers``."""
        drawn = self._rng.choice(self.num_blocks, self.gamma, replace=False, p=self.probabilities)
        self._apply(sorted(int(i) for i in drawn))
        return self.active_layers

    def _apply(self, active: list[int]) -> None:
        active_set = set(active)
        for i, params in enumerate(self._block_params):
            if i in active_set:
                for p in params:
                    p.requires_grad_(True)
            else:
                # a block that stays active keeps its optimizer state (moments, projection)
                self._freeze(params)
        self.active_layers = active

    def _freeze(self, params: list[torch.Tensor]) -> None:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        if self.optimizer is None or not params:
            return
        release = getattr(self.optimizer, "release", None)
        if callable(release):
            release(params)
        else:  # plain torch.optim optimizers: drop their per-param state
            for p in params:
                self.optimizer.state.pop(p, None)

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Plain python types only (``torch.load(weights_only=True)`` reads it): the generator state,
        step counter, active blocks and the probabilities (scores of a trained model would differ)."""
        bit = self._rng.bit_generator.state
        return {
            "num_blocks": self.num_blocks,
            "gamma": self.gamma,
            "interval": self.interval,
            "num_steps": self.num_steps,
            "active_layers": list(self.active_layers),
            "probabilities": [float(x) for x in self.probabilities],
            # PCG64's 128-bit integers as decimal strings, to stay clear of pickle's long ints
            "rng_state": {
                "bit_generator": str(bit["bit_generator"]),
                "state": str(int(bit["state"]["state"])),
                "inc": str(int(bit["state"]["inc"])),
                "has_uint32": int(bit["has_uint32"]),
                "uinteger": int(bit["uinteger"]),
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`, then freeze/unfreeze the model to its active blocks.

        The state must come from a sampler built like this one: ``gamma`` and
        ``interval`` that differ from this sampler's raise ``ValueError``
        (either the checkpoint or the constructor is not what was meant, and
        resuming would silently change the schedule). The probabilities, step
        counter, generator and active blocks are the checkpoint's: they
        continue the run that saved it (scores recomputed on trained weights
        would differ). Everything is checked first; on error nothing is modified.
        """
        try:
            n = int(state_dict["num_blocks"])
            gamma = int(state_dict["gamma"])
            interval = int(state_dict["interval"])
            num_steps = int(state_dict["num_steps"])
            active = sorted(int(i) for i in state_dict["active_layers"])
            probs = np.asarray(state_dict["probabilities"], dtype=np.float64)
            rs = state_dict["rng_state"]
            bit_state = {
                "bit_generator": rs["bit_generator"],
                "state": {"state": int(rs["state"]), "inc": int(rs["inc"])},
                "has_uint32": int(rs["has_uint32"]),
                "uinteger": int(rs["uinteger"]),
            }
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"state_dict is not an OwLoreSampler state_dict: {type(exc).__name__}: {exc}") from None
        if n != self.num_blocks:
            raise ValueError(f"state_dict has num_blocks={n} but this model has {self.num_blocks} blocks")
        if not 1 <= gamma <= n or interval < 1 or num_steps < 0:
            raise ValueError(f"state_dict has invalid gamma={gamma}, interval={interval} or num_steps={num_steps}")
        if (gamma, interval) != (self.gamma, self.interval):
            raise ValueError(
                f"state_dict was saved with gamma={gamma}, interval={interval} but this sampler has "
                f"gamma={self.gamma}, interval={self.interval}; build the sampler with the checkpoint's values "
                "to resume that run"
            )
        if len(set(active)) != len(active) or any(not 0 <= i < n for i in active):
            raise ValueError(f"state_dict has invalid active_layers={active}")
        probs = _normalize(_check_scores(probs, n, "state_dict['probabilities']"), "state_dict['probabilities']",
                           warn_uniform=False)
        if bit_state["bit_generator"] != "PCG64":
            raise ValueError(f"state_dict's generator is {bit_state['bit_generator']!r}, expected 'PCG64'")
        rng = np.random.Generator(np.random.PCG64())
        rng.bit_generator.state = bit_state
        self.num_steps = num_steps
        self.probabilities = probs
        self._rng = rng
        if active:
            self._apply(active)
        else:
            self.active_layers = []


class TrainablePlan(NamedTuple):
    """What may train, decided once when the sampler is built (``decide_trainable``)."""

    block_params: list[list[torch.Tensor]]  # each block's trainable params: the only ones ever toggled
    always_names: list[str]  # resolved always_train module names (or patterns) holding a trainable param
    always_params: list[torch.Tensor]  # trainable params outside the blocks that always train
    frozen_by_sampler: list[torch.Tensor]  # trainable params outside the blocks that the sampler freezes


def discover_blocks(model: nn.Module, layers_attr: Optional[str]) -> tuple[str, nn.ModuleList]:
    """Step 1: the decoder blocks, ``(dotted path, the ModuleList)`` (``find_decoder_blocks``)."""
    return find_decoder_blocks(model, layers_attr=layers_attr)


def check_arguments(n: int, gamma: Any, interval: Any, seed: Any, prob_mode: Any, scores: Any,
                    threshold: Optional[float], calibration: Any) -> Optional[float]:
    """Step 2: ``ValueError`` for a bad schedule (gamma, interval, seed) or prob_mode, and for
    arguments the mode would ignore; returns the checked threshold."""
    if isinstance(gamma, bool) or not isinstance(gamma, (int, np.integer)) or not 1 <= gamma <= n:
        raise ValueError(f"gamma must be an int in [1, {n}] (the model has {n} blocks), got {gamma!r}")
    if isinstance(interval, bool) or not isinstance(interval, (int, np.integer)) or interval < 1:
        raise ValueError(f"interval must be an int >= 1, got {interval!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if threshold is not None:
        threshold = _check_threshold(threshold)
    explicit = not isinstance(prob_mode, str)
    if not explicit and prob_mode not in PROB_MODES:
        raise ValueError(f"prob_mode must be one of {PROB_MODES} or an array of {n} probabilities, got {prob_mode!r}")
    mode_name = "an array" if explicit else repr(prob_mode)
    uses_scores = _uses_scores(prob_mode)
    if scores is not None and not uses_scores:
        raise ValueError(
            f"scores=... are used only by prob_mode 'owl' or 'owl_reverse', but prob_mode={mode_name} would ignore "
            "them: drop scores, or pass prob_mode='owl'"
        )
    for name, value in (("threshold", threshold), ("calibration", calibration)):
        if value is not None and (scores is not None or not uses_scores):
            why = "scores= are given" if scores is not None else f"prob_mode={mode_name} uses no scores"
            raise ValueError(f"{name}=... only serves to compute block scores, but {why}: drop {name}")
    return threshold


def decide_trainable(model: nn.Module, path: str, blocks: nn.ModuleList,
                     always_train: Optional[Sequence[str]]) -> TrainablePlan:
    """Step 3: what may train -- the params trainable now (PEFT and the caller froze the rest),
    split into each block's, the always-trainable ones and the rest outside the blocks.
    ``ValueError`` when no block param is trainable or ``always_train`` matches nothing trainable."""
    n = len(blocks)
    trainable = {id(p) for _, p in unique_named_params(model) if p.requires_grad}
    block_params = [[p for p in b.parameters() if id(p) in trainable] for b in blocks]
    if not any(block_params):
        raise ValueError(
            f"no parameter inside the {n} decoder blocks at {path!r} is trainable (requires_grad=True): the "
            "sampler only unfreezes params that are trainable when it is built, so it would train nothing. "
            "Build it before freezing the blocks (PEFT: give the adapters target_modules inside the blocks)"
        )
    all_block_ids = {id(p) for b in blocks for p in b.parameters()}
    outside = [(name, p) for name, p in unique_named_params(model) if id(p) not in all_block_ids]
    if always_train is None:
        # module names found from the structure; a tied LM head is one param with the embeddings
        default = default_always_train(model, blocks)
        owned = {name: {id(p) for p in model.get_submodule(name).parameters()} & trainable for name in default}
        always_names = [name for name in default if owned[name]]
        always_ids = set().union(*owned.values()) if owned else set()
    else:
        if isinstance(always_train, str):
            always_train = [always_train]
        always_names = list(always_train)
        if not all(isinstance(t, str) and t for t in always_names):
            raise ValueError(f"always_train must be a list of module names or patterns, got {always_train!r}")
        matched: dict[str, set[int]] = {t: set() for t in always_names}
        for name, p in outside:
            for t in always_names:
                if name_matches(name, [t]) or module_prefix_matches(name, t):
                    matched[t].add(id(p))
        missing = [t for t in always_names if not matched[t]]
        if missing:
            raise ValueError(f"always_train={always_names!r}: {missing} match no parameter outside the blocks")
        frozen_only = [t for t in always_names if not matched[t] & trainable]
        if frozen_only:
            raise ValueError(
                f"always_train={always_names!r}: {frozen_only} match only parameters that were frozen "
                "(requires_grad=False, e.g. by PEFT) when the sampler was built; the sampler never unfreezes "
                "those. Unfreeze them first (PEFT: modules_to_save) or drop them from always_train"
            )
        always_ids = set().union(*matched.values()) & trainable
    always_params = [p for _, p in outside if id(p) in always_ids]
    # frozen before the sampler: stays as it is
    frozen_by_sampler = [p for _, p in outside if id(p) in trainable and id(p) not in always_ids]
    return TrainablePlan(block_params, always_names, always_params, frozen_by_sampler)


def check_optimizer_holds(optimizer: Optional[torch.optim.Optimizer], plan: TrainablePlan) -> None:
    """Step 4: ``ValueError`` unless ``optimizer`` (if any) holds every param that may train."""
    if optimizer is None:
        return
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    may_train = [p for params in plan.block_params for p in params] + plan.always_params
    absent = [p for p in may_train if id(p) not in in_optimizer]
    if absent:
        raise ValueError(
            f"the optimizer does not hold {len(absent)} of the trainable block/always-trainable params; "
            "build it over every param before the sampler (owlore_param_groups(model, ...)): params it does "
            "not hold would never train once sampled (LMFlow issue #726)"
        )


def block_scores(model: nn.Module, path: str, n: int, prob_mode: Any, scores: Any, threshold: Optional[float],
                 calibration: Any) -> Optional[np.ndarray]:
    """Step 5: the ``n`` block scores of a mode that uses them (``scores`` checked, or computed
    with ``block_outlier_ratios``), else None."""
    if scores is not None:
        return _load_scores(scores, n)
    if not _uses_scores(prob_mode):
        return None
    computed = block_outlier_ratios(
        model, threshold=DEFAULT_THRESHOLD if threshold is None else threshold, calibration=calibration,
        layers_attr=path,
    )
    return _check_scores(computed, n, "scores")


def sampling_probabilities(prob_mode: Any, scores: Optional[np.ndarray], n: int, gamma: int) -> np.ndarray:
    """Step 6: the probabilities of ``prob_mode`` (see ``OwLoreSampler``); ``ValueError`` if fewer
    than ``gamma`` blocks have one > 0 (the draws are without replacement)."""
    explicit = not isinstance(prob_mode, str)
    if explicit:
        probabilities = _normalize(_check_scores(prob_mode, n, "prob_mode"), "prob_mode", warn_uniform=False)
    else:
        probabilities = _probabilities(prob_mode, scores, n)
    positive = int(np.count_nonzero(probabilities > 0))
    if positive < gamma:
        raise ValueError(
            f"gamma={gamma} blocks are drawn without replacement, but prob_mode="
            f"{prob_mode if not explicit else 'array'!r} gives only {positive} of {n} blocks a probability > 0 "
            f"(p={np.round(probabilities, 4).tolist()}); lower gamma to <= {positive}, or use other "
            "scores/threshold"
        )
    return probabilities


def _uses_scores(prob_mode: Any) -> bool:
    return isinstance(prob_mode, str) and prob_mode in _SCORE_MODES


def _load_scores(scores: Any, n: int) -> np.ndarray:
    if isinstance(scores, (str, os.PathLike)):
        path = os.fspath(scores)
        values = []
        with open(path) as f:
            for lineno, line in enumerate(f, 1):
                text = line.strip()
                if not text or text.startswith("#"):
                    continue
                try:
                    values.append(float(text))
                except ValueError:
                    raise ValueError(f"scores file {path!r} line {lineno}: {text!r} is not a number") from None
        return _check_scores(values, n, f"scores (from {path!r})")
    return _check_scores(scores, n, "scores")


def _check_scores(values: Any, n: int, what: str) -> np.ndarray:
    """A 1-D float64 array of ``n`` finite, non-negative numbers, else ValueError naming ``what``."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be {n} non-negative numbers, got {values!r}") from None
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"{what} must hold one number per block ({n}), got shape {arr.shape}: {arr.tolist()}")
    bad = [(i, float(v)) for i, v in enumerate(arr) if not (math.isfinite(v) and v >= 0.0)]
    if bad:
        raise ValueError(f"{what} must be finite and >= 0, got {bad[:5]} (index, value)")
    return arr


def _normalize(arr: np.ndarray, what: str, warn_uniform: bool) -> np.ndarray:
    total = float(arr.sum())
    n = arr.shape[0]
    if total <= 0.0:
        if not warn_uniform:
            raise ValueError(f"{what} must have a positive sum, got all zeros")
        warnings.warn(
            f"all {n} block scores are zero (no outliers at this threshold); sampling blocks uniformly instead. "
            "A lower threshold gives non-zero scores.",
            stacklevel=4,
        )
        return np.full(n, 1.0 / n)
    return arr / total


def _probabilities(prob_mode: str, scores: Optional[np.ndarray], n: int) -> np.ndarray:
    if prob_mode == "uniform":
        return np.full(n, 1.0 / n)
    if prob_mode == "increase":
        return _normalize(np.arange(1, n + 1, dtype=np.float64), prob_mode, False)
    if prob_mode == "decrease":
        return _normalize(np.arange(n, 0, -1, dtype=np.float64), prob_mode, False)
    assert scores is not None
    owl = _normalize(scores, "scores", warn_uniform=True)
    if prob_mode == "owl":
        return owl
    reverse = owl.max() - owl  # owl_reverse
    if not reverse.sum() > 0.0:  # all equal
        return np.full(n, 1.0 / n)
    return reverse / reverse.sum()
