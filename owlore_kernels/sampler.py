"""OwLore's layer sampling: block discovery, probabilities, sampling, freezing.

OwLore (Li et al., 2024, "OwLore: Outlier-weighed Layerwise Sampled Low-Rank
Projection for Memory-Efficient LLM Fine-tuning") trains, at any time, only
``gamma`` of a model's ``n`` decoder blocks plus a few always-trainable
modules (embeddings, head, final norm, as LISA does), and redraws the
blocks every ``interval`` optimizer steps. Block ``l`` is drawn with
probability proportional to its outlier ratio ``r_l`` (OWL's layerwise outlier
distribution, ``owlore_kernels.outliers``): blocks with more outliers are
trained more often. Inside a sampled block the 2-D weights train with GaLore
(``owlore_kernels.OwLoreAdamW``).

Typical use::

    groups = owlore_param_groups(model, rank=128, update_proj_gap=200, scale=0.25, proj_type="std")
    opt = OwLoreAdamW(groups, lr=3e-4)
    sampler = OwLoreSampler(model, opt, gamma=5, interval=50, prob_mode="owl", seed=0)
    for batch in loader:
        sampler.step()   # before the forward; resamples on calls 0, interval, 2*interval, ...
        model(**batch).loss.backward(); opt.step(); opt.zero_grad()
"""
from __future__ import annotations

import fnmatch
import math
import os
import warnings
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from .outliers import DEFAULT_M, _check_M, block_linears, block_outlier_ratios

__all__ = ["find_decoder_blocks", "owlore_param_groups", "OwLoreSampler", "PROB_MODES"]

PROB_MODES = ("owl", "uniform", "owl_reverse", "increase", "decrease")

# Where known causal LMs keep their decoder blocks, tried in order before the
# generic search: Llama, Mistral, Qwen2, Gemma, Phi (model.layers), GPT-2
# (transformer.h), GPT-NeoX (gpt_neox.layers), OPT (model.decoder.layers),
# Falcon/Bloom (transformer.h), MPT (transformer.blocks), GPT-J (transformer.h).
_KNOWN_BLOCK_PATHS = (
    "model.layers",
    "transformer.h",
    "gpt_neox.layers",
    "model.decoder.layers",
    "transformer.layers",
    "transformer.blocks",
    "model.language_model.layers",
    "layers",
    "blocks",
    "h",
)
# Wrappers whose inner model holds those paths (PEFT: base_model.model.<path>).
_WRAPPER_PREFIXES = ("", "base_model.model.", "module.", "_orig_mod.")


def _get_path(root: nn.Module, path: str) -> Optional[Any]:
    obj: Any = root
    for part in path.split("."):
        if isinstance(obj, (nn.ModuleList, nn.Sequential)) and part.isdigit():
            index = int(part)
            obj = obj[index] if index < len(obj) else None
        else:
            obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _is_block_list(obj: Any) -> bool:
    """An nn.ModuleList of >= 1 blocks of one class, each holding parameters."""
    if not isinstance(obj, nn.ModuleList) or len(obj) == 0:
        return False
    first = type(obj[0])
    return all(type(b) is first and any(True for _ in b.parameters()) for b in obj)


def find_decoder_blocks(model: nn.Module, layers_attr: Optional[str] = None) -> tuple[str, nn.ModuleList]:
    """Return ``(path, blocks)``: the dotted attribute path of the decoder block list and the list.

    With ``layers_attr`` (e.g. ``"model.layers"``) that path is used as is and
    must name an ``nn.ModuleList``. Otherwise the known paths of HF causal LMs
    are tried (Llama, Mistral, Qwen2, Gemma, Phi: ``model.layers``; GPT-2:
    ``transformer.h``; GPT-NeoX: ``gpt_neox.layers``; OPT:
    ``model.decoder.layers``; also under a PEFT ``base_model.model.``), then
    the ``nn.ModuleList`` of identical, parameter-holding blocks with the most
    parameters anywhere in ``model`` (plain torch models). Raises
    ``ValueError`` if none is found, saying how to pass ``layers_attr``.
    """
    if layers_attr is not None:
        if not isinstance(layers_attr, str) or not layers_attr:
            raise ValueError(f"layers_attr must be a dotted attribute path such as 'model.layers', got {layers_attr!r}")
        obj = _get_path(model, layers_attr)
        if obj is None:
            raise ValueError(f"layers_attr={layers_attr!r}: {type(model).__name__} has no such attribute")
        if not isinstance(obj, nn.ModuleList) or len(obj) == 0:
            raise ValueError(
                f"layers_attr={layers_attr!r} names a {type(obj).__name__}"
                f"{' of length 0' if isinstance(obj, nn.ModuleList) else ''}; it must name a non-empty nn.ModuleList "
                "of decoder blocks"
            )
        return layers_attr, obj
    for prefix in _WRAPPER_PREFIXES:
        for path in _KNOWN_BLOCK_PATHS:
            obj = _get_path(model, prefix + path)
            if _is_block_list(obj):
                return prefix + path, obj
    best: Optional[tuple[int, str, nn.ModuleList]] = None
    for name, module in model.named_modules():
        if name and _is_block_list(module):
            size = sum(p.numel() for p in module.parameters())
            if best is None or size > best[0]:
                best = (size, name, module)
    if best is None:
        raise ValueError(
            f"could not find the decoder blocks of {type(model).__name__}: it holds no nn.ModuleList of identical "
            "blocks with parameters. Pass layers_attr='<dotted path to the nn.ModuleList of blocks>', "
            "e.g. layers_attr='model.layers' (Llama) or layers_attr='transformer.h' (GPT-2)"
        )
    return best[1], best[2]


def _unique_named_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    # named_parameters() already drops repeats (tied embeddings appear once, under
    # the first name); the id set also guards against a param reached twice
    seen: set[int] = set()
    out = []
    for name, p in model.named_parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    return out


def _block_param_ids(blocks: nn.ModuleList) -> list[set[int]]:
    return [{id(p) for p in b.parameters()} for b in blocks]


def _name_matches(name: str, targets: Sequence[str]) -> bool:
    """PEFT-style: ``name`` is a target, ends with ``.target``, or matches it as a glob pattern."""
    return any(name == t or name.endswith("." + t) or fnmatch.fnmatchcase(name, t) for t in targets)


def owlore_param_groups(
    model: nn.Module,
    rank: Optional[int] = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    target_modules: Optional[Sequence[str]] = None,
    layers_attr: Optional[str] = None,
    **galore_options: Any,
) -> list[dict[str, Any]]:
    """Param groups for ``OwLoreAdamW`` covering every parameter of ``model``, each once.

    Build them (and the optimizer) *before* the sampler freezes anything: the
    optimizer must hold every block's params from the start, or blocks
    unfrozen later never train (LMFlow issue #726). Frozen params cost
    nothing, since the optimizer skips params whose grad is None.

    Returns ``[galore_group, adamw_group]`` (either dropped when empty):

    * the GaLore group (galore-torch's format: ``{"params", "rank",
      "update_proj_gap", "scale", "proj_type", **galore_options}``) holds the
      2-D weights of the linears inside the decoder blocks -- ``nn.Linear`` and
      GPT-2's ``Conv1D`` -- restricted to ``target_modules`` when given (module
      names or their last parts, e.g. ``["q_proj", "v_proj"]``, or glob
      patterns such as ``"*.mlp.*"``);
    * the plain AdamW group holds everything else (embeddings, head, norms,
      biases, untargeted linears). Tied params (embeddings = lm_head) appear once.

    ``rank=None`` puts everything into the plain AdamW group.
    """
    if target_modules is not None:
        if isinstance(target_modules, str):
            target_modules = [target_modules]
        target_modules = list(target_modules)
        if not all(isinstance(t, str) and t for t in target_modules):
            raise ValueError(f"target_modules must be a list of module names or patterns, got {target_modules!r}")
    path, blocks = find_decoder_blocks(model, layers_attr)
    galore_ids: set[int] = set()
    matched_targets: set[str] = set()
    for i, block in enumerate(blocks):
        for name, lin in block_linears(block):
            full = f"{path}.{i}.{name}"
            if target_modules is None or _name_matches(full, target_modules):
                galore_ids.add(id(lin.weight))
                if target_modules is not None:
                    matched_targets.update(t for t in target_modules if _name_matches(full, [t]))
    if target_modules is not None and rank is not None:
        missing = [t for t in target_modules if t not in matched_targets]
        if missing:
            raise ValueError(
                f"target_modules={target_modules!r}: {missing} match no linear layer inside the blocks at {path!r}"
            )
    galore, plain = [], []
    for _, p in _unique_named_params(model):
        (galore if rank is not None and id(p) in galore_ids else plain).append(p)
    groups = []
    if galore:
        groups.append(
            {"params": galore, "rank": rank, "update_proj_gap": update_proj_gap, "scale": scale,
             "proj_type": proj_type, **galore_options}
        )
    if plain:
        groups.append({"params": plain})
    return groups


def _default_always_train(model: nn.Module, path: str, blocks: nn.ModuleList) -> list[str]:
    """LISA's choice, found from the model: input/output embeddings and the norms outside the blocks.

    Embeddings are every ``nn.Embedding`` outside the blocks (token and, for
    GPT-2/OPT, learned position embeddings) plus ``get_input_embeddings()`` /
    ``get_output_embeddings()`` where the model has them (the LM head); norms
    are modules outside the blocks whose class name contains "Norm" (the final
    norm: ``model.norm``, ``transformer.ln_f``, ``final_layer_norm``, ...).
    """
    block_modules = {id(m) for m in blocks.modules()}
    by_id = {id(m): n for n, m in model.named_modules()}
    names: list[str] = []

    def add(module: Optional[nn.Module]) -> None:
        if module is None or id(module) in block_modules or id(module) not in by_id:
            return
        name = by_id[id(module)]
        if name and name not in names and any(True for _ in module.parameters()):
            names.append(name)

    for getter in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(model, getter, None)
        if callable(fn):
            try:
                add(fn())
            except (NotImplementedError, AttributeError):
                pass
    vocab_sizes = set()
    for name, module in model.named_modules():
        if id(module) in block_modules or not name:
            continue
        if isinstance(module, nn.Embedding) or "norm" in type(module).__name__.lower():
            add(module)
        if isinstance(module, nn.Embedding):
            vocab_sizes.add(module.num_embeddings)
    # plain models without get_output_embeddings: the head is a linear outside
    # the blocks that maps to the vocabulary
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and id(module) not in block_modules and module.out_features in vocab_sizes:
            add(module)
    return names


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
    (lower ``gamma``, raise nothing else: pick another ``prob_mode`` or ``M``).

    Args:
        model: the model (HF causal LM or any torch model with an
            ``nn.ModuleList`` of blocks).
        optimizer: built over every param *before* this sampler (see
            :func:`owlore_param_groups`); every block param must be in it, so
            blocks sampled later really train. ``None`` only freezes.
            Optimizers without ``release`` have their ``state[p]`` dropped.
        gamma: blocks trained at a time (OwLore: 5 of 32 for LLaMA-2-7B).
        interval: optimizer steps between resamples (OwLore: K = 50).
        prob_mode: see above (default ``"owl"``).
        seed: seeds ``numpy.random.Generator(PCG64(seed))``; equal seeds give
            equal block sequences.
        scores: the ``n`` block scores for ``"owl"``/``"owl_reverse"``: a
            sequence of numbers, or a path to a text file with one number per
            line. ``None`` computes them with :func:`block_outlier_ratios`
            (weight-only, or activation-aware with ``calibration``).
        M: outlier threshold multiplier when computing scores (default
            ``owlore_kernels.outliers.DEFAULT_M``).
        calibration: batches for activation-aware scores (see
            :func:`block_outlier_ratios`).
        layers_attr: dotted path of the block list, overriding discovery.
        always_train: module names or glob patterns (matched against module
            and param names outside the blocks) that always train; ``None``
            (default): input/output embeddings and the norms outside the
            blocks; ``[]``: nothing outside the blocks trains.

    Construction checks everything before touching the model or optimizer
    (``ValueError`` naming the argument); it freezes the params outside the
    blocks that are not always-trainable, and leaves the blocks as they are
    until the first :meth:`step`.

    Attributes: ``probabilities`` (1-D float64 numpy array summing to 1),
    ``active_layers`` (sorted block indices, empty before the first step),
    ``scores``, ``num_blocks``, ``layers_attr``, ``always_train`` (resolved
    module names), ``num_steps`` (calls of :meth:`step` so far).
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
        M: float = DEFAULT_M,
        calibration: Optional[Iterable[Any]] = None,
        layers_attr: Optional[str] = None,
        always_train: Optional[Sequence[str]] = None,
    ) -> None:
        # Everything is checked before the model or optimizer is touched.
        path, blocks = find_decoder_blocks(model, layers_attr)
        n = len(blocks)
        if isinstance(gamma, bool) or not isinstance(gamma, (int, np.integer)) or not 1 <= gamma <= n:
            raise ValueError(f"gamma must be an int in [1, {n}] (the model has {n} blocks), got {gamma!r}")
        if isinstance(interval, bool) or not isinstance(interval, (int, np.integer)) or interval < 1:
            raise ValueError(f"interval must be an int >= 1, got {interval!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        M = _check_M(M)
        explicit = not isinstance(prob_mode, str)
        if not explicit and prob_mode not in PROB_MODES:
            raise ValueError(f"prob_mode must be one of {PROB_MODES} or an array of {n} probabilities, got {prob_mode!r}")
        if scores is not None:
            scores = _load_scores(scores, n)
        elif not explicit and prob_mode in ("owl", "owl_reverse"):
            scores = _check_scores(block_outlier_ratios(model, M=M, calibration=calibration, layers_attr=path), n,
                                   "scores")
        if explicit:
            probabilities = _normalize(_check_scores(prob_mode, n, "prob_mode"), "prob_mode", warn_uniform=False)
        else:
            probabilities = _probabilities(prob_mode, scores, n)
        positive = int(np.count_nonzero(probabilities > 0))
        if positive < gamma:
            raise ValueError(
                f"gamma={gamma} blocks are drawn without replacement, but prob_mode="
                f"{prob_mode if not explicit else 'array'!r} gives only {positive} of {n} blocks a probability > 0 "
                f"(p={np.round(probabilities, 4).tolist()}); lower gamma to <= {positive}, or use other scores/M"
            )
        if always_train is None:
            always_names = _default_always_train(model, path, blocks)
            always_patterns = always_names
        else:
            if isinstance(always_train, str):
                always_train = [always_train]
            always_patterns = list(always_train)
            if not all(isinstance(t, str) and t for t in always_patterns):
                raise ValueError(f"always_train must be a list of module names or patterns, got {always_train!r}")
            always_names = always_patterns
        block_ids = _block_param_ids(blocks)
        all_block_ids = set().union(*block_ids)
        always_params, other_params = [], []
        matched: set[str] = set()
        for name, p in _unique_named_params(model):
            if id(p) in all_block_ids:
                continue
            hits = [t for t in always_patterns if _name_matches(name, [t]) or _module_prefix_matches(name, t)]
            matched.update(hits)
            (always_params if hits else other_params).append(p)
        if always_train is not None:
            missing = [t for t in always_patterns if t not in matched]
            if missing:
                raise ValueError(f"always_train={always_patterns!r}: {missing} match no parameter outside the blocks")
        if optimizer is not None:
            in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
            block_params = [p for b in blocks for p in b.parameters()]
            absent = [p for p in block_params + always_params if id(p) not in in_optimizer]
            if absent:
                raise ValueError(
                    f"the optimizer does not hold {len(absent)} of the block/always-trainable params; build it over "
                    "every param before the sampler (owlore_param_groups(model, ...)): params it does not hold "
                    "would never train once sampled (LMFlow issue #726)"
                )

        self.model = model
        self.optimizer = optimizer
        self.gamma = int(gamma)
        self.interval = int(interval)
        self.prob_mode = prob_mode if not explicit else "explicit"
        self.seed = int(seed)
        self.scores = None if scores is None else np.asarray(scores, dtype=np.float64)
        self.layers_attr = path
        self.num_blocks = n
        self.always_train = list(always_names)
        self.probabilities = probabilities
        self._blocks = blocks
        self._block_params = [list(b.parameters()) for b in blocks]
        self._always_params = always_params
        self._other_params = other_params
        self._rng = np.random.Generator(np.random.PCG64(self.seed))
        self.num_steps = 0
        self.active_layers: list[int] = []
        # freeze what is outside the blocks and not always-trainable, once
        for p in always_params:
            p.requires_grad_(True)
        self._freeze(other_params)

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

        Checked first (block count, gamma, probabilities, generator state); on
        error nothing is modified.
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
        if len(set(active)) != len(active) or any(not 0 <= i < n for i in active):
            raise ValueError(f"state_dict has invalid active_layers={active}")
        probs = _normalize(_check_scores(probs, n, "state_dict['probabilities']"), "state_dict['probabilities']",
                           warn_uniform=False)
        if bit_state["bit_generator"] != "PCG64":
            raise ValueError(f"state_dict's generator is {bit_state['bit_generator']!r}, expected 'PCG64'")
        rng = np.random.Generator(np.random.PCG64())
        rng.bit_generator.state = bit_state
        self.gamma, self.interval, self.num_steps = gamma, interval, num_steps
        self.probabilities = probs
        self._rng = rng
        if active:
            self._apply(active)
        else:
            self.active_layers = []


def _module_prefix_matches(param_name: str, pattern: str) -> bool:
    """``pattern`` names (or glob-matches) a module that owns ``param_name``."""
    parts = param_name.split(".")
    return any(
        fnmatch.fnmatchcase(".".join(parts[:k]), pattern) or ".".join(parts[:k]).endswith("." + pattern)
        for k in range(1, len(parts))
    )


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
            f"all {n} block scores are zero (no outliers at this M); sampling blocks uniformly instead. "
            "A lower M gives non-zero scores.",
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
