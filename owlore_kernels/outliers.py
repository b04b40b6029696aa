"""Outlier scores of decoder blocks: weight-only and activation-aware (OWL).

OWL (Yin et al., 2023, "Outlier Weighed Layerwise Sparsity") scores a decoder
block by its *layerwise outlier distribution*: the fraction of the block's
linear-weight entries whose score exceeds ``threshold`` times the block's mean
score,

    ratio(block) = #{ (k, i, j) : a^k_ij > threshold * mean(a) } / #entries,

with all linear weights ``W^k`` of the block pooled under one mean, and

* weight-only:        ``a^k_ij = |W^k_ij|``
* activation-aware:   ``a^k_ij = |W^k_ij| * ||X^k_j||_2`` (OWL's metric, from
  Wanda), where ``X^k_j`` is the j-th input feature of linear ``k`` over all
  calibration tokens.

OwLore (Li et al., 2024) turns these ratios into sampling probabilities
(``owlore_kernels.sampler``). All counting goes through the fused op
``owlore_kernels.ops.outlier_count`` (C++ on CPU, Triton on CUDA, torch
reference otherwise). Which weights form a block comes from
``owlore_kernels.introspection`` (the sampler uses the same module; neither
imports the other). A PEFT model is scored on its base weights: adapters (LoRA
A/B) are not the model's weights and are left out.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Optional, Sequence, Union

import torch
from torch import nn

from ._dtensor import is_dtensor
from .introspection import block_linears, find_decoder_blocks, oriented_weight
from .ops.outlier_count import outlier_count

__all__ = ["DEFAULT_THRESHOLD", "outlier_ratio", "block_outlier_ratios"]

#: Default outlier threshold (OWL's ``M``): an entry is an outlier when its
#: score exceeds ``threshold`` times the mean score.
#:
#: Why 5: the per-block count must be large enough not to be count noise,
#: must not be dominated by one block, and must differ between blocks.
#: Measured on the real SmolLM2-135M-Instruct (30 blocks of 3.54M linear
#: weights; ``benchmarks/real_model_scores.py`` writes the numbers to
#: ``benchmarks/results/smollm2_scores.md``):
#:
#: * threshold = 5: weight-only ratios 0.057%..0.63% (>= 2,000 outlier entries in
#:   every block, coefficient of variation 0.66 across blocks, the largest
#:   block probability 0.14 against uniform 0.033); activation-aware
#:   0.58%..2.5% (CV 0.44, largest p 0.069). Discriminative for both metrics.
#: * threshold = 13 (OwLore's LLaMA-2-7B setting, activation-aware metric): still
#:   fine for the activation-aware metric (0.055%..0.69%, CV 1.05, largest p
#:   0.22), but weight-only ratios drop to 2..517 outlier entries per block,
#:   so they are count noise and block 0 alone takes a third of the probability.
#: * threshold = 3: weight-only ratios are nearly flat (CV 0.12), so "owl" is close
#:   to uniform.
#:
#: Baseline: for Gaussian weights mean|w| = 0.80 sigma, so the weight-only
#: cut at threshold 5 sits at 4.0 sigma, exceeded by 6.3e-5 of the entries; the
#: SmolLM2 blocks are 9x..100x above that, i.e. the ratio measures real
#: heavy tails. At threshold 13 the cut is 10.4 sigma: a random-init model has no
#: outliers and the sampler falls back to uniform with a warning. Pass
#: ``threshold=13`` with calibration data to reproduce the OwLore paper's run.
DEFAULT_THRESHOLD = 5.0

TensorOrList = Union[torch.Tensor, Sequence[torch.Tensor]]


def _check_threshold(threshold: float) -> float:
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        raise ValueError(f"threshold must be a finite number > 0, got {threshold!r}") from None
    if not (value > 0.0 and math.isfinite(value)):
        raise ValueError(f"threshold must be a finite number > 0, got {threshold!r}")
    return value


def _count(tensors: list[torch.Tensor], threshold: float, col_scales, backend: Optional[str]) -> tuple[float, int]:
    """``outlier_count`` on detached tensors (the op never writes into its inputs)."""
    sharded = [tuple(t.shape) for t in tensors if is_dtensor(t)]
    if sharded:
        # the mean and the count need every entry of the block; a rank sees only its shard
        raise ValueError(
            f"outlier scores need whole weights, but {len(sharded)} weight(s) (shapes {sharded}) are sharded "
            f"DTensors (FSDP2): compute the scores before fully_shard and pass them as OwLoreSampler(scores=...)"
        )
    return outlier_count([t.detach() for t in tensors], threshold=threshold, col_scales=col_scales, backend=backend)


def outlier_ratio(
    w: TensorOrList,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    col_scales: Optional[Sequence[Optional[torch.Tensor]]] = None,
    backend: Optional[str] = None,
) -> float:
    """Fraction of entries with ``|w| > threshold * mean(|w|)``.

    ``w`` is a tensor or a list of tensors scored together against one shared
    mean (OWL pools a block's linear weights this way). With ``col_scales``
    (one 1-D tensor or None per tensor, over its last dimension) the score is
    ``|w_ij| * s_j`` instead of ``|w_ij|``. Returns a float in [0, 1]; the
    weights are not modified.
    """
    threshold = _check_threshold(threshold)
    tensors = [w] if isinstance(w, torch.Tensor) else list(w)
    if not tensors:
        raise ValueError("w must be a tensor or a non-empty list of tensors, got an empty list")
    if col_scales is not None:
        col_scales = list(col_scales)
    _, count = _count(tensors, threshold, col_scales, backend)
    numel = sum(t.numel() for t in tensors)
    return count / numel


def _run_batch(model: nn.Module, batch: Any) -> None:
    if isinstance(batch, dict) or hasattr(batch, "keys"):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


def _input_norms(model: nn.Module, linears: list[nn.Module], calibration: Iterable[Any]) -> list[torch.Tensor]:
    """``||X_j||_2`` per input feature of each linear, over every calibration token.

    Forward pre-hooks on the linears accumulate sum_t x_tj^2 in fp32; the hooks
    are removed and the model's train/eval mode is restored afterwards, also
    when a batch raises. The model runs in eval mode (dropout off) under
    ``torch.no_grad()``.
    """
    sums: list[Optional[torch.Tensor]] = [None] * len(linears)
    handles = []

    def make_hook(k: int):
        def hook(module, args, kwargs=None):
            x = args[0] if args else next(iter(kwargs.values()))
            x = x.detach().reshape(-1, x.shape[-1]).float()
            sq = (x * x).sum(dim=0)
            sums[k] = sq if sums[k] is None else sums[k] + sq

        return hook

    was_training = model.training
    try:
        for k, lin in enumerate(linears):
            handles.append(lin.register_forward_pre_hook(make_hook(k)))
        model.eval()
        n_batches = 0
        with torch.no_grad():
            for batch in calibration:
                _run_batch(model, batch)
                n_batches += 1
        if n_batches == 0:
            raise ValueError("calibration must yield at least one batch, got none")
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    norms = []
    for k, lin in enumerate(linears):
        if sums[k] is None:
            # the forward never reached this linear (e.g. an unused branch): its
            # scores are all zero, so it adds entries but no outliers
            in_features = oriented_weight(lin).shape[-1]
            sums[k] = torch.zeros(in_features, device=lin.weight.device)
        norms.append(sums[k].sqrt().to(lin.weight.device))
    return norms


def block_outlier_ratios(
    model: nn.Module,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    calibration: Optional[Iterable[Any]] = None,
    layers_attr: Optional[str] = None,
    backend: Optional[str] = None,
) -> list[float]:
    """Outlier ratio of every decoder block of ``model``, in block order.

    Without ``calibration``: weight-only, all 2-D linear weights of a block
    scored together (``a_ij = |W_ij|``). With ``calibration`` (an iterable of
    batches: dicts are passed as ``model(**batch)``, tuples as
    ``model(*batch)``, anything else as ``model(batch)``): activation-aware as
    OWL, ``a_ij = |W_ij| * ||X_j||_2`` with ``||X_j||`` gathered by forward hooks
    on the linears' inputs (removed afterwards, also on error).

    ``threshold`` (default :data:`DEFAULT_THRESHOLD` = 5, OWL's; see its comment
    for why) is OWL's multiplier ``M``; ``layers_attr`` overrides block
    discovery (see :func:`owlore_kernels.introspection.find_decoder_blocks`).
    PEFT adapters are not scored (see :func:`~owlore_kernels.introspection.block_linears`).
    The weights are never modified. Returns a list of floats in [0, 1].
    """
    threshold = _check_threshold(threshold)
    _, blocks = find_decoder_blocks(model, layers_attr=layers_attr)
    per_block = []
    for i, block in enumerate(blocks):
        linears = [m for _, m in block_linears(block)]
        if not linears:
            raise ValueError(f"block {i} ({type(block).__name__}) has no 2-D linear weights to score")
        per_block.append(linears)
    norms_per_block: list[Optional[list[torch.Tensor]]] = [None] * len(per_block)
    if calibration is not None:
        flat = [m for linears in per_block for m in linears]
        norms = _input_norms(model, flat, calibration)
        start = 0
        for i, linears in enumerate(per_block):
            norms_per_block[i] = norms[start:start + len(linears)]
            start += len(linears)
    ratios = []
    for linears, norms in zip(per_block, norms_per_block):
        weights = [oriented_weight(m) for m in linears]
        _, count = _count(weights, threshold, norms, backend)
        ratios.append(count / sum(w.numel() for w in weights))
    return ratios
