"""Argument checks shared by the op entry points (they run once per call, before dispatch)."""
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
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")


def check_float(name: str, t: torch.Tensor, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in {dtypes}, got {t.dtype}")


def check_projection_shapes(side: str, full: torch.Tensor, proj: torch.Tensor, low: torch.Tensor, what: str) -> None:
    """``full`` is m x n; ``proj`` is P (m x r, side='left') or Q (r x n, side='right');
    ``low`` is the subspace tensor: r x n (left) or m x r (right)."""
    if full.dim() != 2 or proj.dim() != 2 or low.dim() != 2:
        raise ValueError(f"{what}: expected 2-D tensors, got {tuple(full.shape)}, {tuple(proj.shape)}, {tuple(low.shape)}")
    m, n = full.shape
    if side == "left":
        r = proj.shape[1]
        ok = proj.shape[0] == m and tuple(low.shape) == (r, n)
        want = f"proj (m, r)=({m}, r) and subspace (r, n)=(r, {n})"
    else:
        r = proj.shape[0]
        ok = proj.shape[1] == n and tuple(low.shape) == (m, r)
        want = f"proj (r, n)=(r, {n}) and subspace (m, r)=({m}, r)"
    if not ok:
        raise ValueError(
            f"{what} side={side!r}: weight {tuple(full.shape)} needs {want}, "
            f"got proj {tuple(proj.shape)} and subspace {tuple(low.shape)}"
        )


def check_same_device(*named: tuple[str, torch.Tensor]) -> None:
    devices = {t.device for _, t in named}
    if len(devices) > 1:
        listing = ", ".join(f"{n} on {t.device}" for n, t in named)
        raise ValueError(f"all tensors must be on one device, got {listing}")
