"""Outlier count: mean(|w|) and the number of entries with |w| > M * mean(|w|).

Several tensors can be scored together against one shared mean (OWL scores a
decoder block's linear weights this way), and each tensor may carry a
per-column scale ``s`` so that the score is ``|w_ij| * s_j`` (OWL's
activation-aware metric, with ``s_j = ||X_j||_2``).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from . import register, resolve
from ._checks import FLOAT_DTYPES, check_float, row_chunks

TensorOrList = Union[torch.Tensor, Sequence[torch.Tensor]]


def outlier_count(
    tensors: TensorOrList,
    threshold: float,
    col_scales: Optional[Sequence[Optional[torch.Tensor]]] = None,
    *,
    backend: Optional[str] = None,
) -> tuple[float, int]:
    """Return ``(mean, count)`` over all entries of ``tensors``.

    ``mean = sum(score) / numel`` with ``score = |w|`` (or ``|w_ij| * s_j`` where
    ``col_scales[k]`` is a 1-D tensor over the last dimension of ``tensors[k]``),
    accumulated in fp32; ``count`` is the number of entries with
    ``score > threshold * mean``. Two passes over the data: mean first, then count
    (one pass would need a histogram of scores). No full-size temporary.
    """
    tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
    if not tensors:
        raise ValueError("tensors must hold at least one tensor, got an empty list")
    threshold = float(threshold)
    if not threshold >= 0.0 or threshold == float("inf"):
        raise ValueError(f"threshold must be a finite number >= 0, got {threshold}")
    if col_scales is None:
        col_scales = [None] * len(tensors)
    col_scales = list(col_scales)
    if len(col_scales) != len(tensors):
        raise ValueError(f"col_scales must have one entry per tensor ({len(tensors)}), got {len(col_scales)}")
    for k, (t, s) in enumerate(zip(tensors, col_scales)):
        check_float(f"tensors[{k}]", t, FLOAT_DTYPES)
        if t.numel() == 0:
            raise ValueError(f"tensors[{k}] is empty")
        if s is not None:
            check_float(f"col_scales[{k}]", s, FLOAT_DTYPES)
            if s.dim() != 1 or s.numel() != t.shape[-1]:
                raise ValueError(
                    f"col_scales[{k}] must be 1-D with {t.shape[-1]} entries (the last dim of tensors[{k}]), "
                    f"got shape {tuple(s.shape)}"
                )
            if s.device != t.device:
                raise ValueError(f"col_scales[{k}] is on {s.device} but tensors[{k}] is on {t.device}")
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    _, impl = resolve("outlier_count", tensors[0].device, backend)
    mean, count = impl(tensors, threshold, col_scales)
    return float(mean), int(count)


def _scores(t: torch.Tensor, s: Optional[torch.Tensor]):
    """Yield fp32 score chunks of ``t`` (rows of its 2-D view), never the whole tensor at once."""
    flat = t.reshape(-1, t.shape[-1]) if t.dim() > 1 else t.reshape(1, -1)
    s32 = None if s is None else s.float()
    for rows in row_chunks(flat.shape[0], flat.shape[1]):
        # abs() (not abs_()): .float() of an fp32 tensor is the tensor itself,
        # and an in-place abs would overwrite the caller's weights
        chunk = flat[rows].float().abs()
        if s32 is not None:
            chunk.mul_(s32)
        yield chunk


@register("outlier_count", "torch")
def outlier_count_reference(tensors, threshold, col_scales):
    total = torch.zeros((), dtype=torch.float32, device=tensors[0].device)
    numel = 0
    for t, s in zip(tensors, col_scales):
        numel += t.numel()
        for chunk in _scores(t, s):
            total += chunk.sum(dtype=torch.float32)
    mean = total / numel
    cut = threshold * mean
    count = torch.zeros((), dtype=torch.int64, device=tensors[0].device)
    for t, s in zip(tensors, col_scales):
        for chunk in _scores(t, s):
            count += (chunk > cut).sum()
    return mean.item(), count.item()
