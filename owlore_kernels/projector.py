"""Subspace refresh for GaLore: which side to project on, and how to find the basis.

GaLore (Zhao et al., 2024) projects an m x n gradient G onto a rank-r basis
taken from G's own singular vectors:

* side "left":  P = U[:, :r]   (m x r), R = P^T G  (r x n)
* side "right": Q = Vh[:r, :]  (r x n), R = G Q^T  (m x r)
* side "full":  both, R = P^T G Q^T (r x r)

``proj_type`` picks the side from the shape exactly as galore-torch does:
``std`` compresses the smaller dimension to r and keeps the larger one (right
when m >= n, so R = G Q^T is m x r; else left, R = P^T G is r x n),
``reverse_std`` the opposite, and ``left``/``right``/``full`` force a side.

Two ways to find the basis:

* ``svd``: ``torch.linalg.svd(G, full_matrices=False)``, exact, and what
  galore-torch does. On a 2-core CPU it took 7.4 s at 4096x4096 and 27 s at
  4096x11008 (``benchmarks/bench_refresh.py``), every refresh, for every matrix.
* ``randomized``: a randomized range finder (Halko, Martinsson & Tropp 2011,
  Alg. 4.4): sketch Y = G Omega with k = r + oversample Gaussian columns, run
  ``power_iters`` re-orthonormalised power iterations (G G^T)^q Y, take
  Q = qr(Y), then the exact SVD of the small k x n matrix Q^T G. Cost is
  (2 + 2q) GEMMs of m x n x k plus small QRs -- ~0.2 s at 4096x11008, r=128.
  Deterministic for a given seed: Omega comes from a generator seeded per
  (seed, param index, step).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
PROJ_METHODS = ("svd", "randomized")


def projection_side(shape: torch.Size, proj_type: str) -> str:
    """The side (``"left"``, ``"right"`` or ``"full"``) GaLore projects an m x n gradient on."""
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    if proj_type in ("left", "right", "full"):
        return proj_type
    raise ValueError(f"proj_type must be one of {PROJ_TYPES}, got {proj_type!r}")


def subspace_shape(shape: torch.Size, rank: int, side: str) -> tuple[int, int]:
    """Shape of R (and of the Adam moments) for an m x n weight."""
    m, n = shape
    return {"left": (rank, n), "right": (m, rank), "full": (rank, rank)}[side]


def refresh_seed(seed: int, index: int, step: int) -> int:
    """A 63-bit seed from (seed, param index, step), so that every refresh of every param
    draws a different, reproducible sketch."""
    x = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + step * 0x94D049BB133111EB) & ((1 << 64) - 1)
    x ^= x >> 31
    return x & ((1 << 63) - 1)


def randomized_svd(
    matrix: torch.Tensor, rank: int, *, oversample: int = 8, power_iters: int = 1, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Approximate top-``rank`` singular vectors ``(U_r, Vh_r)`` of a 2-D fp32 matrix."""
    return randomized_svd_of_operator(
        matrix.shape,
        times=lambda x: matrix @ x,
        transpose_times=lambda y: matrix.t() @ y,
        project=lambda basis: basis.t() @ matrix,
        rank=rank, oversample=oversample, power_iters=power_iters, seed=seed,
        device=matrix.device, dtype=matrix.dtype,
    )


def randomized_svd_of_operator(
    shape: tuple[int, int],
    times: Callable[[torch.Tensor], torch.Tensor],
    transpose_times: Callable[[torch.Tensor], torch.Tensor],
    project: Callable[[torch.Tensor], torch.Tensor],
    *,
    rank: int,
    oversample: int,
    power_iters: int,
    seed: int,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The range finder on an m x n matrix G seen only through three products:

    ``times(X) = G X`` (X n x k -> m x k), ``transpose_times(Y) = G^T Y``
    (Y m x k -> n x k) and ``project(B) = B^T G`` (B m x k -> k x n), each
    returning the whole (replicated) tall-skinny result. A row- or
    column-sharded G supplies them with one collective each
    (``owlore_kernels.distributed``), so the sketch, the QRs and the small SVD
    -- and therefore the signs and the basis -- are those of one process.
    """
    m, n = shape
    k = min(rank + oversample, m, n)
    gen = torch.Generator(device=device).manual_seed(seed)
    omega = torch.randn(n, k, generator=gen, device=device, dtype=dtype)
    basis = times(omega)  # m x k
    for _ in range(power_iters):
        # re-orthonormalise between products: without it, the sketch's columns
        # collapse onto the top singular vector in fp32 after a few powers
        basis = torch.linalg.qr(basis).Q
        basis = torch.linalg.qr(transpose_times(basis)).Q  # n x k
        basis = times(basis)  # m x k
    basis = torch.linalg.qr(basis).Q
    small_u, _, vh = torch.linalg.svd(project(basis), full_matrices=False)  # k x n, cheap
    return basis @ small_u[:, :rank], vh[:rank]


def compute_projection(
    grad: torch.Tensor,
    rank: int,
    side: str,
    method: str = "svd",
    *,
    oversample: int = 8,
    power_iters: int = 1,
    seed: int = 0,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Fresh fp32 bases ``(P, Q)`` for ``grad``: P (m x r) for sides left/full, Q (r x n) for right/full.

    The unused one is None. A bf16/fp16 gradient is upcast for the decomposition
    (a full-size temporary, but only once per refresh, not per step).
    """
    matrix = grad.float()
    if method == "svd":
        u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
        u, vh = u[:, :rank], vh[:rank]
    elif method == "randomized":
        u, vh = randomized_svd(matrix, rank, oversample=oversample, power_iters=power_iters, seed=seed)
    else:
        raise ValueError(f"proj_method must be one of {PROJ_METHODS}, got {method!r}")
    left = u.contiguous() if side in ("left", "full") else None
    right = vh.contiguous() if side in ("right", "full") else None
    return left, right
