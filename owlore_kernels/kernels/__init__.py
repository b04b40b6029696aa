"""Triton kernels, one module per fused op, each with its launcher beside the kernel.

* ``outlier_count``       -- mean(|w|) and the outlier count, two passes, no host sync;
* ``project_adam``        -- R = P^T G (or G Q^T) as a tiled GEMM with Adam in the epilogue;
* ``back_project_update`` -- W <- beta W + alpha (P N), P N never stored.

Each launcher has a ``*_plan`` twin that checks the arguments and returns the launches it
would make (kernel, grid, arguments, constexprs, warps, stages) without running them; it
works on ``meta`` tensors, which is how ``benchmarks/gpu_static_check.py`` compiles every
specialization for sm_80 / sm_90 on a machine without a GPU.

Importing this package imports Triton. Under ``TRITON_INTERPRET=1`` (which must be set
before the import) the kernels also run on CPU tensors, slowly, for tests.
The public entry points are the ops in ``owlore_kernels.ops``; ``ops/_triton.py``
registers these launchers as their "triton" backend.
"""
from ._common import DOT_PRECISIONS, resolve_dot_precision
from .back_project_update import back_project_update_launch, back_project_update_plan
from .outlier_count import outlier_count_launch, outlier_count_plan
from .project_adam import project_adam_launch, project_adam_plan

__all__ = ["outlier_count_launch", "project_adam_launch", "back_project_update_launch",
           "outlier_count_plan", "project_adam_plan", "back_project_update_plan",
           "DOT_PRECISIONS", "resolve_dot_precision"]
