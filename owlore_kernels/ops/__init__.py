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
under ``torch.compile``.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch

BACKENDS = ("triton", "cpp", "torch")
# op -> the name of its definition in torch.ops.owlore (a trailing underscore: it writes into its arguments)
OP_NAMES = {"outlier_count": "outlier_count", "project_adam": "project_adam_",
            "back_project_update": "back_project_update_", "project_adam_foreach": "project_adam_foreach_",
            "back_project_update_foreach": "back_project_update_foreach_", "adamw_foreach": "adamw_foreach_"}
OPS = tuple(OP_NAMES)
# the dispatch key of each device backend's kernel
_DISPATCH_KEYS = {"cpp": "CPU", "triton": "CUDA"}

# op -> backend -> implementation, called with the op's schema (positional tensors, keyword options)
_REGISTRY: dict[str, dict[str, Callable]] = {op: {} for op in OPS}
# backend -> why it could not be loaded (only for backends that failed)
_UNAVAILABLE: dict[str, str] = {}
# op -> device type -> the backend whose kernel the dispatcher runs there (set once the backends are loaded)
_NATURAL: dict[str, dict[str, str]] = {op: {} for op in OPS}


def qualname(op: str) -> str:
    """``"project_adam"`` -> ``"owlore::project_adam_"``."""
    return f"owlore::{OP_NAMES[op]}"


def op_overload(op: str) -> torch._ops.OpOverload:
    """The dispatcher entry point, e.g. ``torch.ops.owlore.project_adam_.default``."""
    return getattr(torch.ops.owlore, OP_NAMES[op]).default


def register(op: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator: ``fn`` implements ``op`` for ``backend``; also registers it with torch's dispatcher,
    as the default kernel ("torch") or the CUDA kernel ("triton")."""
    if op not in _REGISTRY:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")

    def wrap(fn: Callable) -> Callable:
        if backend == "torch":
            torch.library.register_kernel(qualname(op), None, fn)  # CompositeExplicitAutograd
        elif backend == "triton":
            torch.library.register_kernel(qualname(op), "cuda", fn)
        _REGISTRY[op][backend] = fn
        return fn

    return wrap


def call_with_scalars(op: str, device: torch.device, backend: Optional[str],
                      **scalars) -> tuple[Callable, dict, bool]:
    """``(implementation, scalars, converted)`` for a call of ``op`` whose hyperparameters
    ``scalars`` may be numbers or 0-dim CPU tensors.

    All numbers: the implementation ``call`` picks, and the numbers. Any tensor, where the
    dispatcher runs the kernel (``backend=None``, or a forced backend that is the one it runs):
    the op's ``.tensor`` overload, every value a tensor (numbers become float64), so a compiled
    caller passes them as graph inputs. Any tensor and another forced backend: its kernel takes
    numbers, so the tensors are read (eager only) and ``converted`` is True.
    """
    fn = call(op, device, backend)
    if not any(isinstance(v, torch.Tensor) for v in scalars.values()):
        return fn, scalars, False
    if fn is op_overload(op):
        overload = getattr(torch.ops.owlore, OP_NAMES[op]).tensor
        return overload, {k: v if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=torch.float64)
                          for k, v in scalars.items()}, False
    return fn, {k: v.item() if isinstance(v, torch.Tensor) else v for k, v in scalars.items()}, True


def foreach_scalars(values, columns: int) -> torch.Tensor:
    """The per-weight numbers of a foreach op as the float64 CPU tensor it takes: a tensor is
    passed on as it is (the checks judge it); a list of tuples is converted once, an empty one
    to shape (0, ``columns``)."""
    if isinstance(values, torch.Tensor):
        return values
    if len(values) == 0:
        return torch.empty(0, columns, dtype=torch.float64)
    return torch.tensor(values, dtype=torch.float64)


def check_backend(backend: Optional[str]) -> None:
    """Raise ``ValueError`` for a name that is not a backend (None means auto)."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")


def _runs_on(backend: str, device_type: str) -> bool:
    if backend == "torch":
        return True
    if backend == "cpp":
        return device_type == "cpu"
    # triton: CUDA, or any device under TRITON_INTERPRET=1 (tests on CPU)
    return device_type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _dispatched_backend(op: str, device_type: str) -> str:
    """The backend whose kernel torch's dispatcher runs for ``op`` on ``device_type`` tensors."""
    for backend, key in _DISPATCH_KEYS.items():
        if key.lower() == device_type and torch._C._dispatch_has_kernel_for_dispatch_key(qualname(op), key):
            return backend
    return "torch"


def resolve(op: str, device: torch.device, backend: Optional[str] = None) -> tuple[str, Callable]:
    """``(backend name, implementation)`` that a call of ``op`` on ``device`` tensors runs.

    ``backend=None``: the dispatcher's choice, and the dispatcher entry point itself.
    A forced backend that is missing or cannot run on ``device`` raises ``RuntimeError``
    rather than falling back.
    """
    check_backend(backend)
    if backend is None:
        return _dispatched_backend(op, device.type), op_overload(op)
    impls = _REGISTRY[op]
    if backend not in impls:
        why = _UNAVAILABLE.get(backend, "it registers no implementation of this op")
        raise RuntimeError(f"backend={backend!r} was forced for op {op!r} but is not available: {why}")
    if not _runs_on(backend, device.type):
        raise RuntimeError(f"backend={backend!r} was forced for op {op!r} but cannot run on {device.type} tensors")
    if _NATURAL[op].get(device.type) == backend:
        # the dispatcher runs this very kernel: call the op, which torch.compile can trace
        return backend, op_overload(op)
    return backend, impls[backend]


def call(op: str, device: torch.device, backend: Optional[str] = None) -> Callable:
    """The implementation to call: the dispatcher for ``backend=None``, else the forced backend's."""
    if backend is None:
        return op_overload(op)
    return resolve(op, device, backend)[1]


def backend_report() -> dict[str, dict[str, str]]:
    """Which backend each op uses by default, per device type, and why any backend is missing.

    Returns ``{"cpu": {op: backend}, "cuda": {op: backend}, "unavailable": {backend: reason}}``.
    """
    report: dict[str, dict[str, str]] = {dev: {op: _dispatched_backend(op, dev) for op in OPS} for dev in ("cpu", "cuda")}
    report["unavailable"] = dict(_UNAVAILABLE)
    return report


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
