"""The "triton" backend: registers the launchers in ``owlore_kernels/kernels`` against the
op definitions (same positional signatures as the torch references).

Importing this module imports Triton; ``ops._load_backends`` catches a failure and only
drops this backend. On CPU tensors it runs only under ``TRITON_INTERPRET=1`` (see
``ops._runs_on``); set that before anything imports ``owlore_kernels.kernels``.
"""
from __future__ import annotations

from ..kernels import back_project_update_launch, outlier_count_launch, project_adam_launch
from . import register


@register("outlier_count", "triton")
def outlier_count_triton(tensors, threshold, col_scales):
    mean, count = outlier_count_launch(tensors, threshold, col_scales)
    return mean.item(), count.item()  # the op's one host sync, after both passes


@register("project_adam", "triton")
def project_adam_triton(grad, proj, exp_avg, exp_avg_sq, out, side, beta1, beta2, eps, bias1, bias2):
    project_adam_launch(grad, proj, exp_avg, exp_avg_sq, out, side, beta1, beta2, eps, bias1, bias2)


@register("back_project_update", "triton")
def back_project_update_triton(param, proj, norm_update, side, beta, alpha):
    back_project_update_launch(param, proj, norm_update, side, beta, alpha)
