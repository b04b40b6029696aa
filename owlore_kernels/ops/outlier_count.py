"""Outlier count: mean(score) and the number of entries with score > threshold * mean.

Several tensors can be scored together against one shared mean (OWL scores a
decoder block's linear weights this way), and each tensor may carry a
per-column scale ``s`` so that the score is ``|w_ij| * s_j`` (OWL's
activation-aware metric, with ``s_j = ||X_j||_2``); otherwise it is ``|w_ij|``.

The op is ``torch.ops.owlore.outlier_count``; it returns 0-dim tensors on the
inputs' device (fp32 mean, int64 count), so it needs no host sync and composes
with ``torch.compile``. ``outlier_count`` converts them to Python numbers.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from ._registry import call, register
from .._checks import FLOAT_DTYPES, check_float, row_chunks

TensorOrList = Union[torch.Tensor, Sequence[torch.Tensor]]

torch.library.define(
    "owlore::outlier_count",
    "(Tensor[] tensors, *, float threshold, Tensor?[] col_scales) -> (Tensor mean, Tensor count)",
)


def check_outlier_count_args(tensors, threshold, col_scales) -> None:
    torch._check_value(len(tensors) > 0, lambda: "tensors must hold at least one tensor, got an empty list")
    torch._check_value(
        threshold >= 0.0 and math.isfinite(threshold),
        lambda: f"threshold must be a finite number >= 0, got {threshold}",
    )
    torch._check_value(
        len(col_scales) == len(tensors),
        lambda: f"col_scales must have one entry per tensor ({len(tensors)}), got {len(col_scales)}",
    )
    for k, (t, s) in enumerate(zip(tensors, col_scales)):
        check_float(f"tensors[{k}]", t, FLOAT_DTYPES)
        torch._check_value(t.numel() > 0, lambda: f"tensors[{k}] is empty")
        torch._check_value(
            t.device == tensors[0].device,
            lambda: f"all tensors must be on one device, got tensors[0] on {tensors[0].device} "
            f"and tensors[{k}] on {t.device}",
        )
        if s is None:
            continue
        check_float(f"col_scales[{k}]", s, FLOAT_DTYPES)
        torch._check_value(
            s.dim() == 1 and t.dim() > 0 and s.shape[0] == t.shape[-1],
            lambda: f"col_scales[{k}] must be 1-D with {t.shape[-1] if t.dim() else 1} entries "
            f"(the last dim of tensors[{k}]), got shape {tuple(s.shape)}",
        )
        torch._check_value(
            s.device == t.device, lambda: f"col_scales[{k}] is on {s.device} but tensors[{k}] is on {t.device}"
        )


@torch.library.register_fake("owlore::outlier_count")
def _outlier_count_fake(tensors, *, threshold, col_scales):
    check_outlier_count_args(tensors, threshold, col_scales)
    device = tensors[0].device
    return torch.empty((), dtype=torch.float32, device=device), torch.empty((), dtype=torch.int64, device=device)


def outlier_count(
    tensors: TensorOrList,
    *,
    threshold: float,
    col_scales: Optional[Sequence[Optional[torch.Tensor]]] = None,
    backend: Optional[str] = None,
) -> tuple[float, int]:
    """Return ``(mean, count)`` over all entries of ``tensors``.

    ``mean = sum(score) / numel`` with ``score = |w|`` (or ``|w_ij| * s_j`` where
    ``col_scales[k]`` is a 1-D tensor over the last dimension of ``tensors[k]``),
    accumulated in fp32; ``count`` is the number of entries with
    ``score > threshold * mean``. Two passes over the data: mean first, then count
    (one pass would need a histogram of scores). No full-size temporary; the
    inputs are not modified. Reading the two numbers is the call's one host sync;
    ``torch.ops.owlore.outlier_count`` returns them as device tensors instead.
    """
    tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
    col_scales = [None] * len(tensors) if col_scales is None else list(col_scales)
    threshold = float(threshold)
    if not torch.compiler.is_compiling():  # when tracing, the op's fake implementation runs them
        check_outlier_count_args(tensors, threshold, col_scales)
    mean, count = call("outlier_count", tensors[0].device, backend)(tensors, threshold=threshold,
                                                                    col_scales=col_scales)
    return mean.item(), count.item()


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


def outlier_count_reference(tensors, threshold, col_scales):
    """The pure-PyTorch kernel, positional: ``(mean, count)`` as 0-dim fp32 and int64 tensors."""
    device = tensors[0].device
    total = torch.zeros((), dtype=torch.float32, device=device)
    numel = 0
    for t, s in zip(tensors, col_scales):
        numel += t.numel()
        for chunk in _scores(t, s):
            total += chunk.sum(dtype=torch.float32)
    mean = total / numel
    cut = threshold * mean
    count = torch.zeros((), dtype=torch.int64, device=device)
    for t, s in zip(tensors, col_scales):
        for chunk in _scores(t, s):
            count += (chunk > cut).sum()
    return mean, count


@register("outlier_count", "torch")
def _outlier_count_torch(tensors, *, threshold, col_scales):
    return outlier_count_reference(tensors, threshold, col_scales)
