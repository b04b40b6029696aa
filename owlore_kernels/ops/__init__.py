"""One definition per fused op, several backends behind it.

Each op lives in its own module (``outlier_count``, ``project_adam``,
``back_project_update``). That module holds the op's public function, which
checks its arguments once, and the pure-PyTorch reference, which is both the
test oracle and the fallback. Backends register against the op by name:

* ``"torch"``  -- the reference, always present;
* ``"cpp"``    -- the OpenMP extension built from ``csrc/`` (CPU tensors);
* ``"triton"`` -- the kernels in ``owlore_kernels/kernels`` (CUDA tensors).

An import that fails only removes its backend (see ``_load_backends``).
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch

BACKENDS = ("triton", "cpp", "torch")
OPS = ("outlier_count", "project_adam", "back_project_update")

# op name -> backend name -> implementation
_REGISTRY: dict[str, dict[str, Callable]] = {op: {} for op in OPS}
# backend name -> why it could not be loaded (only for backends that failed)
_UNAVAILABLE: dict[str, str] = {}
# the order in which backend=None tries backends, per device type; the
# interpreter can run Triton on CPU tensors, but at ~1 ms per program it is a
# test vehicle, never an automatic choice
_AUTO_ORDER = {"cuda": ("triton", "torch"), "cpu": ("cpp", "torch")}


def _runs_on(backend: str, device_type: str) -> bool:
    if backend == "torch":
        return True
    if backend == "cpp":
        return device_type == "cpu"
    # triton: CUDA, or any device under TRITON_INTERPRET=1 (tests on CPU)
    return device_type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def register(op: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator: register ``fn`` as ``backend``'s implementation of ``op``."""
    if op not in _REGISTRY:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")

    def wrap(fn: Callable) -> Callable:
        _REGISTRY[op][backend] = fn
        return fn

    return wrap


def check_backend(backend: Optional[str]) -> None:
    """Raise ``ValueError`` for a name that is not a backend (None means auto)."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")


def resolve(op: str, device: torch.device, backend: Optional[str] = None) -> tuple[str, Callable]:
    """Pick the implementation of ``op`` for tensors on ``device``.

    ``backend=None`` picks the fastest available one: Triton on CUDA, the C++
    extension on CPU, else the reference. A forced backend that is missing or
    cannot run on ``device`` raises ``RuntimeError`` rather than falling back.
    """
    _load_backends()
    check_backend(backend)
    impls = _REGISTRY[op]
    if backend is not None:
        if backend not in impls:
            why = _UNAVAILABLE.get(backend, "it registers no implementation of this op")
            raise RuntimeError(f"backend={backend!r} was forced for op {op!r} but is not available: {why}")
        if not _runs_on(backend, device.type):
            raise RuntimeError(f"backend={backend!r} was forced for op {op!r} but cannot run on {device.type} tensors")
        return backend, impls[backend]
    for name in _AUTO_ORDER.get(device.type, ("torch",)):
        if name in impls:
            return name, impls[name]
    raise RuntimeError(f"no backend for op {op!r} on {device}")  # unreachable: torch is always there


def backend_report() -> dict[str, dict[str, str]]:
    """Which backend each op uses by default, per device type, and why any backend is missing.

    Returns ``{"cpu": {op: backend}, "cuda": {op: backend}, "unavailable": {backend: reason}}``.
    """
    _load_backends()
    report: dict[str, dict[str, str]] = {}
    for dev in ("cpu", "cuda"):
        report[dev] = {op: resolve(op, torch.device(dev))[0] for op in OPS}
    report["unavailable"] = dict(_UNAVAILABLE)
    return report


_LOADED = False


def _load_backends() -> None:
    """Import each optional backend once; a failed import only removes that backend."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    from . import back_project_update, outlier_count, project_adam  # noqa: F401  (reference, registers "torch")

    try:
        from . import _cpp  # noqa: F401  (registers "cpp")
    except Exception as exc:  # the extension was not built, or fails to load
        _UNAVAILABLE["cpp"] = f"C++ extension not loaded ({type(exc).__name__}: {exc})"
    try:
        from . import _triton  # noqa: F401  (registers "triton")
    except Exception as exc:  # triton not installed, or no usable driver
        _UNAVAILABLE["triton"] = f"Triton kernels not loaded ({type(exc).__name__}: {exc})"
