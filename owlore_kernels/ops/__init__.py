"""The fused ops, each defined once with ``torch.library`` as ``torch.ops.owlore.<name>``.

Each op module (``outlier_count``, ``project_adam``, ``back_project_update``, ``adamw``) holds:

* the schema (``torch.library.define``), so the op exists with or without the C++ extension;
* the fake implementation (``register_fake``), which runs the op's argument checks, so
  ``torch.compile`` and ``torch.library.opcheck`` see shapes, dtypes and errors;
* the pure-PyTorch reference, registered as the default kernel (CompositeExplicitAutograd)
  and used as the test oracle;
* the public function, which checks its arguments once and calls the op.

Device kernels register against the same op, each from its own backend:

* ``"cpp"``    -- ``csrc/registration.cpp``: ``TORCH_LIBRARY_IMPL(owlore, CPU, m)``, loaded by
  importing ``owlore_kernels._C``;
* ``"triton"`` -- ``_triton.py``: the launchers in ``owlore_kernels/kernels``, registered for CUDA.

``backend=None`` calls ``torch.ops.owlore.<name>`` and torch's dispatcher picks the kernel for
the tensors' device: C++ on CPU, Triton on CUDA, the reference where neither is loaded.
``backend="torch" | "cpp" | "triton"`` forces one (tests, benchmarks): the op itself where the
dispatcher runs that backend anyway ("cpp" on CPU, "triton" on CUDA), else the implementation
directly (the reference on CPU next to the extension; Triton on CPU tensors under
``TRITON_INTERPRET=1``, eager only). A forced backend that is missing or cannot run on the
tensors' device raises, naming it and why; an import that fails only removes its backend.

Under ``torch.compile`` the op is one graph node whose fake implementation supplies shapes.
Its hyperparameters are ``Scalar`` in the default overload: a Python number there is a
constant of the graph, so a new value recompiles. The hyperparameters that change from step to
step (``project_adam_``'s bias corrections, ``back_project_update_``'s beta and alpha) also have
a ``.tensor`` overload that takes them as 0-dim floating CPU tensors: graph inputs, read on the
host by the kernel (no device sync), so a compiled optimizer step does not recompile when the step
count or the learning rate changes. The public functions pick that overload when given tensors.

The multi-tensor ("foreach") ops update a list of weights in one call: ``project_adam_foreach_``,
``back_project_update_foreach_`` (per weight i, the single-weight op) and ``adamw_foreach_``
(plain AdamW, elementwise). Their per-weight numbers are one float64 CPU tensor per call, one
row per weight (``bias_corrections`` or ``coefficients``), read on the host and a graph input
under ``torch.compile``. They also take ``torch.amp.GradScaler``'s scale and overflow flag, as
``torch._fused_adamw_`` does: ``grad_scale`` (adamw and project_adam: the gradient, or R, is
divided by it) and ``found_inf`` (nonzero: the call writes nothing), optional one-element
floating tensors on the weights' device that the device kernels read themselves (no host sync).
"""
from __future__ import annotations

from ._registry import (  # noqa: F401  (the names of the ops package; the private ones for tests)
    BACKENDS, OP_NAMES, OPS, backend_report, call, call_with_scalars, check_backend, foreach_scalars, op_overload,
    qualname, register, resolve, _DISPATCH_KEYS, _NATURAL, _REGISTRY, _UNAVAILABLE, _dispatched_backend, _runs_on,
)


def _load_backends() -> None:
    """Define the ops, then import each optional backend; a failed import only removes that backend."""
    from . import adamw, back_project_update, outlier_count, project_adam  # noqa: F401  (schemas, fakes, "torch")

    try:
        from . import _cpp  # noqa: F401  (registers "cpp")
    except Exception as exc:  # the extension was not built, or fails to load
        _UNAVAILABLE["cpp"] = f"C++ extension not loaded ({type(exc).__name__}: {exc})"
    try:
        from . import _triton  # noqa: F401  (registers "triton")
    except Exception as exc:  # triton not installed, or no usable driver
        _UNAVAILABLE["triton"] = f"Triton kernels not loaded ({type(exc).__name__}: {exc})"
    for op in OPS:
        _NATURAL[op] = {device_type: _dispatched_backend(op, device_type) for device_type in ("cpu", "cuda")}


_load_backends()
