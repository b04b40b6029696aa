"""Argument checks of the fused ops, in one place.

Each op's checks run in its public function (eager, before any tensor is modified) and in
its fake implementation (``torch.compile`` tracing, ``opcheck``), so a bad argument is
reported the same way on every path. The Triton launchers run them too, since
``torch.ops.owlore.*`` and direct launcher calls reach a kernel without the public function.
The module sits beside, not inside, ``ops``: importing ``ops`` loads the backends, which
import the kernels, which import these checks. ``torch._check_value`` / ``torch._check_type`` raise
``ValueError`` / ``TypeError`` in eager mode and become guards or runtime asserts on
symbolic shapes while tracing.
"""
from __future__ import annotations

import torch

SIDES = ("left", "right")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Rows per chunk in the reference paths: about 1M elements, so a bf16 weight's
# fp32 upcast costs a few MB of temporary instead of a full-size copy.
CHUNK_ELEMENTS = 1 << 20


def row_chunks(rows: int, cols: int):
    """Yield ``slice`` objects that cover ``rows`` in chunks of about CHUNK_ELEMENTS elements."""
    step = max(1, CHUNK_ELEMENTS // max(cols, 1))
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


def check_side(side: str) -> None:
    torch._check_value(side in SIDES, lambda: f"side must be one of {SIDES}, got {side!r}")


def check_float(name: str, t: torch.Tensor, dtypes=FLOAT_DTYPES) -> None:
    torch._check_type(isinstance(t, torch.Tensor), lambda: f"{name} must be a torch.Tensor, got {type(t).__name__}")
    torch._check_value(t.dtype in dtypes, lambda: f"{name} must have dtype in {dtypes}, got {t.dtype}")


def check_projection_shapes(side: str, full: torch.Tensor, proj: torch.Tensor, low: torch.Tensor, what: str) -> None:
    """``full`` is m x n; ``proj`` is P (m x r, side='left') or Q (r x n, side='right');
    ``low`` is the subspace tensor: r x n (left) or m x r (right)."""
    torch._check_value(
        full.dim() == 2 and proj.dim() == 2 and low.dim() == 2,
        lambda: f"{what}: expected 2-D tensors, got {tuple(full.shape)}, {tuple(proj.shape)}, {tuple(low.shape)}",
    )
    m, n = full.shape
    if side == "left":
        r = proj.shape[1]
        ok = proj.shape[0] == m and low.shape[0] == r and low.shape[1] == n
        want = f"proj (m, r)=({m}, r) and subspace (r, n)=(r, {n})"
    else:
        r = proj.shape[0]
        ok = proj.shape[1] == n and low.shape[0] == m and low.shape[1] == r
        want = f"proj (r, n)=(r, {n}) and subspace (m, r)=({m}, r)"
    torch._check_value(
        ok,
        lambda: f"{what} side={side!r}: weight {tuple(full.shape)} needs {want}, "
        f"got proj {tuple(proj.shape)} and subspace {tuple(low.shape)}",
    )


def check_same_shape(name: str, t: torch.Tensor, like_name: str, like: torch.Tensor) -> None:
    torch._check_value(
        t.shape == like.shape,
        lambda: f"{name} shape {tuple(t.shape)} != {like_name} shape {tuple(like.shape)}",
    )


def check_same_device(*named: tuple[str, torch.Tensor]) -> None:
    devices = {t.device for _, t in named}
    torch._check_value(
        len(devices) == 1,
        lambda: "all tensors must be on one device, got " + ", ".join(f"{n} on {t.device}" for n, t in named),
    )


def check_unit_interval(name: str, value: float, meaning: str) -> None:
    """``value`` in (0, 1]. Two checks, not a chained comparison: a symbolic value (a traced
    ``tensor.item()``) becomes two runtime asserts instead of a data-dependent guard."""
    torch._check_value(value > 0.0, lambda: f"{name} must be in (0, 1] ({meaning}), got {value}")
    torch._check_value(value <= 1.0, lambda: f"{name} must be in (0, 1] ({meaning}), got {value}")


def check_tensor_scalar(name: str, t: torch.Tensor) -> None:
    """A hyperparameter passed as a tensor (the ops' ``.tensor`` overloads): a 0-dim floating
    CPU tensor, whose value the kernel reads on the host without a device sync."""
    torch._check_type(isinstance(t, torch.Tensor), lambda: f"{name} must be a torch.Tensor, got {type(t).__name__}")
    torch._check_value(
        t.dim() == 0 and t.is_floating_point() and t.device.type == "cpu",
        lambda: f"{name} must be a 0-dim floating CPU tensor, got shape {tuple(t.shape)}, {t.dtype} on {t.device}",
    )


def check_bias_corrections(bias_correction1, bias_correction2) -> None:
    """Each bias correction in (0, 1]: a number by value; a tensor (the ``.tensor`` overload)
    is a 0-dim floating CPU tensor, whose value the kernel checks when it reads it."""
    for k, value in enumerate((bias_correction1, bias_correction2), start=1):
        if isinstance(value, torch.Tensor):
            check_tensor_scalar(f"bias_correction{k}", value)
        else:
            check_unit_interval(f"bias_correction{k}", value, f"1 - beta{k}**t, or 1 for none")


def check_project_adam_args(grad, proj, exp_avg, exp_avg_sq, out, side, bias_correction1, bias_correction2) -> None:
    """``out`` may be None (the public function allocates it after the checks). The bias
    corrections are numbers, or 0-dim CPU tensors whose values only the kernel reads."""
    check_side(side)
    check_float("grad", grad)
    written = [("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)] + ([("out", out)] if out is not None else [])
    for name, t in [("proj", proj)] + written:
        check_float(name, t, (torch.float32,))
    check_projection_shapes(side, grad, proj, exp_avg, "project_adam_")
    for name, t in written[1:]:
        check_same_shape(name, t, "exp_avg", exp_avg)
    check_bias_corrections(bias_correction1, bias_correction2)
    check_same_device(("grad", grad), ("proj", proj), *written)


def check_back_project_update_args(param, proj, norm_update, side, beta=None, alpha=None) -> None:
    """``beta`` and ``alpha`` are checked only when they are tensors (numbers are free)."""
    check_side(side)
    for name, value in (("beta", beta), ("alpha", alpha)):
        if isinstance(value, torch.Tensor):
            check_tensor_scalar(name, value)
    check_float("param", param)
    check_float("proj", proj, (torch.float32,))
    check_float("norm_update", norm_update, (torch.float32,))
    check_projection_shapes(side, param, proj, norm_update, "back_project_update_")
    check_same_device(("param", param), ("proj", proj), ("norm_update", norm_update))
