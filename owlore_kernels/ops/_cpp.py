"""The "cpp" backend: the OpenMP kernels in ``csrc/``, built as ``owlore_kernels._C``.

Importing ``_C`` registers ``torch.ops.owlore.*`` (the schemas live in
``csrc/registration.cpp``); this module adapts them to the positional
signatures of the torch references. If the extension was not built, the
import below raises and ``ops._load_backends`` records why "cpp" is missing.
"""
from __future__ import annotations

import torch

from .. import _C  # noqa: F401  (loading the library registers torch.ops.owlore.*)
from . import register

_owlore = torch.ops.owlore


@register("outlier_count", "cpp")
def outlier_count_cpp(tensors, threshold, col_scales):
    """Two OpenMP passes (mean, then count), fp32 block partials folded in double."""
    mean, count = _owlore.outlier_count(list(tensors), float(threshold), list(col_scales))
    return mean, count


@register("project_adam", "cpp")
def project_adam_cpp(grad, proj, exp_avg, exp_avg_sq, out, side, beta1, beta2, eps, bias1, bias2):
    """R a tile at a time (per-thread L2-sized buffer), Adam in the tile's epilogue."""
    _owlore.project_adam_(grad, proj, exp_avg, exp_avg_sq, out, side, float(beta1), float(beta2), float(eps), float(bias1),
                          float(bias2))


@register("back_project_update", "cpp")
def back_project_update_cpp(param, proj, norm_update, side, beta, alpha):
    """W updated one tile at a time by a GEMM with that beta and alpha."""
    _owlore.back_project_update_(param, proj, norm_update, side, float(beta), float(alpha))
