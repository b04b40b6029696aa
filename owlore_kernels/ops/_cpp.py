"""The "cpp" backend: the OpenMP kernels in ``csrc/``, built as ``owlore_kernels._C``.

Importing ``_C`` registers their CPU kernels with the ops defined in this package
(``csrc/registration.cpp``, ``TORCH_LIBRARY_IMPL(owlore, CPU, m)``), so the
dispatcher runs them for CPU tensors. A forced ``backend="cpp"`` calls the op
through the dispatcher too, which for CPU tensors is that kernel. If the
extension was not built, the import below raises and ``ops._load_backends``
records why "cpp" is missing.
"""
from __future__ import annotations

import torch

from .. import _C  # noqa: F401  (loading the library registers the CPU kernels)
from ._registry import OPS, op_overload, qualname, register

for _op in OPS:
    if not torch._C._dispatch_has_kernel_for_dispatch_key(qualname(_op), "CPU"):
        raise ImportError(f"owlore_kernels._C registers no CPU kernel for {qualname(_op)} (a stale build?)")
    register(_op, "cpp")(op_overload(_op))
