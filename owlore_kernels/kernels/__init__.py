"""Triton kernels, one module per fused op, each with its launcher beside the kernel.

* ``outlier_count``       -- mean(|w|) and the outlier count, two passes, no host sync;
* ``project_adam``        -- R = P^T G (or G Q^T) as a tiled GEMM with Adam in the epilogue;
* ``back_project_update`` -- W <- beta W + alpha (P N), P N never stored;
* ``adamw``               -- plain AdamW over a list of tensors, one launch.

The two GEMM ops also have ``*_foreach_launch`` twins: one launch per group of same-shape
weights, each weight's addresses and scalars read from an int64 pointer table.

Each launcher has a ``*_plan`` twin that checks the arguments and returns the launches it
would make (kernel, grid, arguments, constexprs, warps, stages) without running them; it
works on ``meta`` tensors, which is how ``benchmarks/gpu_static_check.py`` compiles every
specialization for sm_80 / sm_90 on a machine without a GPU.

Importing this package imports Triton. Under ``TRITON_INTERPRET=1`` (which must be set
before the import) the kernels also run on CPU tensors, slowly, for tests.
The public entry points are the ops in ``owlore_kernels.ops``; ``ops/_triton.py``
registers these launchers as their "triton" backend.
"""
from ._common import DOT_PRECISIONS, interpreter_problem, interpreting, resolve_dot_precision

if interpreting():
    import numpy
    import triton

    _problem = interpreter_problem(triton.__version__, numpy.__version__)
    if _problem is not None:  # ops._load_backends then reports the triton backend unavailable, with this reason
        raise ImportError(_problem)
from .adamw import adamw_foreach_launch
from .back_project_update import back_project_update_foreach_launch, back_project_update_launch, back_project_update_plan
from .outlier_count import outlier_count_launch, outlier_count_plan
from .project_adam import project_adam_foreach_launch, project_adam_launch, project_adam_plan

__all__ = ["outlier_count_launch", "project_adam_launch", "back_project_update_launch",
           "project_adam_foreach_launch", "back_project_update_foreach_launch", "adamw_foreach_launch",
           "outlier_count_plan", "project_adam_plan", "back_project_update_plan",
           "DOT_PRECISIONS", "resolve_dot_precision"]
