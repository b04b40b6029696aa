"""The "triton" backend: the launchers in ``owlore_kernels/kernels``, registered as the ops'
CUDA kernels (``torch.library.register_kernel(..., "cuda")``).

Importing this module imports Triton; ``ops._load_backends`` catches a failure and only
drops this backend. On CPU tensors it runs only when forced (``backend="triton"``) under
``TRITON_INTERPRET=1``, which must be set before anything imports ``owlore_kernels.kernels``.
"""
from __future__ import annotations

from ..kernels import (adamw_foreach_launch, back_project_update_foreach_launch, back_project_update_launch,
                       outlier_count_launch, project_adam_foreach_launch, project_adam_launch)
from ._registry import register


@register("outlier_count", "triton")
def _outlier_count_triton(tensors, *, threshold, col_scales):
    mean, count = outlier_count_launch(tensors, threshold, col_scales)
    return mean, count.clone()  # a fresh tensor, not a view of the launcher's accumulator


@register("project_adam", "triton")
def _project_adam_triton(grad, proj, exp_avg, exp_avg_sq, out, *, side, beta1, beta2, eps, bias_correction1,
                         bias_correction2):
    # float(): Triton would specialise an int argument (1 becomes a constant)
    project_adam_launch(grad, proj, exp_avg, exp_avg_sq, out, side, float(beta1), float(beta2), float(eps),
                        float(bias_correction1), float(bias_correction2))


@register("back_project_update", "triton")
def _back_project_update_triton(param, proj, norm_update, *, side, beta, alpha):
    back_project_update_launch(param, proj, norm_update, side, float(beta), float(alpha))


# The foreach ops: one launch per group of same-shape weights (adamw_foreach_: one per list); the
# per-weight rows of bias_corrections / coefficients travel with the weights' addresses in one
# int64 table, uploaded in one small host-to-device copy per launch.


@register("project_adam_foreach", "triton")
def _project_adam_foreach_triton(grads, projs, exp_avgs, exp_avg_sqs, outs, *, side, beta1, beta2, eps,
                                 bias_corrections, grad_scale=None, found_inf=None):
    project_adam_foreach_launch(grads, projs, exp_avgs, exp_avg_sqs, outs, side, float(beta1), float(beta2),
                                float(eps), bias_corrections, grad_scale=grad_scale, found_inf=found_inf)


@register("back_project_update_foreach", "triton")
def _back_project_update_foreach_triton(params, projs, norm_updates, *, side, coefficients, found_inf=None):
    back_project_update_foreach_launch(params, projs, norm_updates, side, coefficients, found_inf=found_inf)


@register("adamw_foreach", "triton")
def _adamw_foreach_triton(params, grads, exp_avgs, exp_avg_sqs, *, variant, beta1, beta2, eps, coefficients,
                          grad_scale=None, found_inf=None):
    adamw_foreach_launch(params, grads, exp_avgs, exp_avg_sqs, variant, float(beta1), float(beta2), float(eps),
                         coefficients, grad_scale=grad_scale, found_inf=found_inf)
