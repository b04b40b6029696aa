"""Triton kernels, one module per fused op, each with its launcher beside the kernel.

* ``outlier_count``       -- mean(|w|) and the outlier count, two passes, no host sync;
* ``project_adam``        -- R = P^T G (or G Q^T) as a tiled GEMM with Adam in the epilogue;
* ``back_project_update`` -- W <- W (1 - lr wd) - lr scale (P N), P N never stored.

Importing this package imports Triton. Under ``TRITON_INTERPRET=1`` (which must be set
before the import) the kernels also run on CPU tensors, slowly, for tests.
The public entry points are the ops in ``owlore_kernels.ops``; ``ops/_triton.py``
registers these launchers as their "triton" backend.
"""
from .back_project_update import back_project_update_launch
from .outlier_count import outlier_count_launch
from .project_adam import DOT_PRECISION, DOT_PRECISIONS, project_adam_launch

__all__ = ["outlier_count_launch", "project_adam_launch", "back_project_update_launch",
           "DOT_PRECISION", "DOT_PRECISIONS"]
