"""An fp64 GaLore-AdamW written from galore-torch 1.0 and OwLoreAdamW's documented rule, with a
forward error bound for an fp32 implementation of it; a test oracle for OwLoreAdamW.

It imports nothing from owlore_kernels: the projection side (galore-torch's GaLoreProjector),
the top-r basis (torch.linalg.svd in fp64), the refresh schedule and both update rules are
written here again. Per weight W (m x n) with gradient G, update t = 1, 2, ...::

    if (t - 1) % update_proj_gap == 0:  P, Q <- top-r left / right singular vectors of G
    R = P^T G | G Q^T | P^T G Q^T          (side "left" | "right" | "full"; plain: R = G)
    m = b1 m + (1 - b1) R ;  v = b2 v + (1 - b2) R^2
    "galore": N = m / (sqrt(v) + eps),                  W <- (W - s scale U) (1 - lr wd)
              with s = lr sqrt(1 - b2^t) / (1 - b1^t)
    "torch":  N = (m / bc1) / (sqrt(v / bc2) + eps),     W <- W (1 - lr wd) - lr scale U
    U = P N | N Q | P N Q                   (plain: U = N, scale = 1)

Singular vectors are defined up to sign, and the moments carry over a refresh, so the sign
an implementation picks changes its later updates; the oracle takes each new basis
vector's sign from the implementation under test (``gauge``), nothing else.

Alongside the exact values the oracle carries, entry by entry, a first-order bound on how
far an implementation that computes in fp32 and stores W in ``store_dtype`` may be from
them (``err_*``; the derivation is in ``OracleAdamW.step``), and the weights three wrong
implementations would reach from the same gradients (``wrong``), so a test can check that
its tolerance is tighter than the bugs it is meant to catch.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

U32 = 2.0**-24  # fp32 unit roundoff (round to nearest)
# unit roundoff of each storage type: 24, 8 and 11 significant bits
UNIT_ROUNDOFF = {torch.float32: U32, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
# The weights a wrong update rule would give (same gradients, moments and bases).
WRONG_RULES = ("never updated", "no weight decay", "decay on the other side of the update")


def galore_side(shape: tuple[int, int], proj_type: str) -> str:
    """galore-torch 1.0's GaLoreProjector: "std" projects a tall or square G (m >= n) from the
    right (R = G Q^T, m x r: the smaller dimension n is compressed) and a wide one from the
    left (R = P^T G, r x n); "reverse_std" the opposite; "left", "right", "full" force it."""
    m, n = shape
    tall_or_square = m >= n
    sides = {"std": "right" if tall_or_square else "left", "reverse_std": "left" if tall_or_square else "right"}
    return sides.get(proj_type, proj_type)


def gamma(k: int) -> float:
    """Higham's gamma_k = k u / (1 - k u): a k-term fp32 dot product's error is <= gamma_k sum |x_i y_i|."""
    return k * U32 / (1 - k * U32)


class OracleAdamW:
    """One weight's GaLore-AdamW (``rank`` set) or AdamW (``rank=None``) step, in fp64.

    ``w["right"]`` is the weight, ``m``, ``v`` the moments, ``left``/``right`` the bases
    (P m x r, Q r x n), ``t`` the updates done; ``err_w``, ``err_m``, ``err_v`` bound an fp32
    implementation's distance to them entry by entry, ``err_left``/``err_right`` per basis
    vector (2-norm); ``w[rule]`` for each of ``WRONG_RULES``.
    """

    def __init__(self, weight: torch.Tensor, *, lr: float, betas=(0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, correct_bias: bool = True, variant: str = "galore",
                 rank: Optional[int] = None, update_proj_gap: int = 200, scale: float = 0.25,
                 proj_type: str = "std"):
        self.store_dtype = weight.dtype
        w0 = weight.detach().double()
        self.w = {"right": w0.clone(), **{rule: w0.clone() for rule in WRONG_RULES}}
        self.err_w = torch.zeros_like(w0)
        self.lr, self.betas, self.eps, self.wd = float(lr), betas, eps, weight_decay
        self.correct_bias, self.variant = correct_bias, variant
        self.galore = rank is not None
        self.rank = min(rank, *weight.shape) if self.galore else None
        self.gap, self.proj_type = update_proj_gap, proj_type
        self.scale = scale if self.galore else 1.0
        self.side = galore_side(tuple(weight.shape), proj_type) if self.galore else None
        self.t = 0
        self.m = self.v = self.err_m = self.err_v = None
        self.left = self.right = self.err_left = self.err_right = None

    # ------------------------------------------------------------- the refresh
    def _refresh(self, g: torch.Tensor, gauge: dict) -> None:
        """Top-r singular vectors of G in fp64, each vector's sign taken from ``gauge``.

        The implementation's basis is checked here against an a-priori bound, and its measured
        distance (per vector, 2-norm) is what the later error bounds carry: the weights' bound
        then reflects the basis the implementation really uses, which is itself within:

        an fp32 SVD (LAPACK's) gives factors that are exact for G + E with ||E||_2 <= p(m, n) u
        ||G||_2 (LAPACK Users' Guide, section 4.9: p a modestly growing function; taken as
        max(m, n) here). By Wedin's theorem a singular vector then turns by sin(theta_k) <=
        ||E|| / (gap_k - ||E||), gap_k the distance from sigma_k to the other singular values,
        and |v~ - v| = 2 sin(theta / 2) <= sqrt(2) sin(theta) once the signs agree; the result is
        rounded to fp32 once more (u). Tests use spectra with gaps >= 0.1 sigma_1, where this
        is ~1e-4; a wrong side or a bottom-r basis is off by ~1.
        """
        u, s, vh = torch.linalg.svd(g, full_matrices=False)
        r = self.rank
        others = torch.cat([s, s.new_tensor([0.0])])  # sigma_j = 0 beyond min(m, n), e.g. for r = n
        gaps = torch.stack([(others[k] - torch.cat([others[:k], others[k + 1:]])).abs().min() for k in range(r)])
        e = max(g.shape) * U32 * s[0]
        if bool((gaps <= 2 * e).any()):
            raise ValueError(f"singular values {s[:r + 1].tolist()} are too close for a well-defined top-{r} basis")
        limit = math.sqrt(2) * e / (gaps - e) + U32
        if self.side in ("left", "full"):
            self.left, self.err_left = _aligned(u[:, :r], gauge["proj_left"], limit, dim=0, what="proj_left")
        if self.side in ("right", "full"):
            self.right, self.err_right = _aligned(vh[:r], gauge["proj_right"], limit, dim=1, what="proj_right")

    # --------------------------------------------------------------- the step
    def step(self, grad: torch.Tensor, gauge: Optional[dict] = None) -> None:
        """One update with gradient ``grad`` (read exactly: every fp16/bf16/fp32 value is an
        fp64 value). ``gauge``: the implementation's state after the same update (only its
        ``proj_left``/``proj_right`` are read, at refreshes, for the signs).

        Error bound, first order, entry by entry (|x| and products taken entrywise; u = 2^-24):

        * R: the basis error b_k (see ``_refresh``) moves R = P^T G by at most
          b_k ||G[:, j]||, and the fp32 product adds gamma_K (|P| + b)^T |G| (K = m; G Q^T
          likewise with K = n; "full" composes the two). A plain param's R = G is exact.
        * m, v: e_m <- b1 e_m + (1 - b1) e_R + 3u |terms|; e_v <- b2 e_v + (1 - b2)(2|R| e_R +
          e_R^2) + 4u |terms| (the moments are convex combinations; each op rounds once).
        * N = a / D, a = m / c1, D = sqrt(v / c2) + eps (c = 1 for "galore", the bias
          corrections for "torch"): |d sqrt(v)| <= min(e_v / (2 sqrt(v)), sqrt(e_v)), so
          e_D = that / sqrt(c2) + 3u D and e_N = (e_a + |N| e_D) / (D - e_D) + u |N|; this
          needs D > e_D, which is asserted (eps keeps D away from 0).
        * U = P N: (|P| + b) e_N + (b^T |N|) + gamma_r |P||N| (the basis error times N, the
          product's rounding); N Q and P N Q likewise. A plain param's U = N.
        * W: e_W <- (1 - lr wd) e_W + s' e_U + 4u (|(1 - lr wd) W| + s' |U|) (the fp32 update,
          its scalars rounded to fp32 too) + u_store (|W| + e_W) (rounding to a bf16/fp16
          weight; none for fp32), s' the step's coefficient of U.
        """
        g = grad.detach().double()
        b1, b2 = self.betas
        if self.galore and self.t % self.gap == 0:
            self._refresh(g, gauge)
        low, err_low = self._project(g)
        if self.m is None:
            self.m, self.v = torch.zeros_like(low), torch.zeros_like(low)
            self.err_m, self.err_v = torch.zeros_like(low), torch.zeros_like(low)
        self.t += 1
        t = self.t
        m_prev, v_prev = self.m, self.v
        self.m = b1 * m_prev + (1 - b1) * low
        self.v = b2 * v_prev + (1 - b2) * low * low
        self.err_m = b1 * self.err_m + (1 - b1) * err_low + 3 * U32 * (b1 * m_prev.abs() + (1 - b1) * low.abs())
        self.err_v = (b2 * self.err_v + (1 - b2) * (2 * low.abs() * err_low + err_low**2)
                      + 4 * U32 * (b2 * v_prev + (1 - b2) * low * low))

        bc1, bc2 = (1 - b1**t, 1 - b2**t) if self.correct_bias else (1.0, 1.0)
        if self.variant == "galore":
            c1 = c2 = 1.0
            coeff = self.lr * math.sqrt(bc2) / bc1 * self.scale
        else:
            c1, c2 = bc1, bc2
            coeff = self.lr * self.scale
        sqrt_v = self.v.sqrt()
        err_sqrt = torch.minimum(self.err_v / (2 * sqrt_v).clamp_min(1e-300), self.err_v.sqrt())
        denom = self.v.div(c2).sqrt() + self.eps
        err_denom = err_sqrt / math.sqrt(c2) + 3 * U32 * denom
        assert bool((denom > err_denom).all()), "the bound needs sqrt(v) + eps above its own error"
        norm = (self.m / c1) / denom
        err_norm = (self.err_m / c1 + U32 * norm.abs() + norm.abs() * err_denom) / (denom - err_denom) + U32 * norm.abs()
        update, err_update = self._back_project(norm, err_norm)

        decay = 1.0 - self.lr * self.wd
        w = self.w["right"]
        if self.variant == "galore":  # (W - coeff U) decay
            new, step_coeff = (w - coeff * update) * decay, coeff * decay
        else:  # W decay - coeff U
            new, step_coeff = w * decay - coeff * update, coeff
        self.err_w = (decay * self.err_w + step_coeff * err_update
                      + 4 * U32 * (decay * w.abs() + step_coeff * update.abs()))
        if self.store_dtype != torch.float32:
            self.err_w = self.err_w + UNIT_ROUNDOFF[self.store_dtype] * (new.abs() + self.err_w)
        self.w["right"] = new
        self.w["no weight decay"] = self.w["no weight decay"] - coeff * update
        other = self.w["decay on the other side of the update"]
        self.w["decay on the other side of the update"] = (
            other * decay - coeff * update if self.variant == "galore" else (other - coeff * update) * decay)

    def _project(self, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """R and its error bound (see ``step``)."""
        if not self.galore:
            return g, torch.zeros_like(g)
        left, right, b_left, b_right = self.left, self.right, self.err_left, self.err_right
        m, n = g.shape
        if self.side in ("left", "full"):
            low = left.t() @ g
            err = (b_left[:, None] * g.norm(dim=0)[None, :]
                   + gamma(m) * (left.abs() + b_left[None, :]).t() @ g.abs())
            if self.side == "left":
                return low, err
            g, err_g = low, err  # full: then R = (P^T G) Q^T
        else:
            err_g = torch.zeros_like(g)
        low_right = g @ right.t()
        err = (err_g @ (right.abs() + b_right[:, None]).t() + g.norm(dim=1)[:, None] * b_right[None, :]
               + gamma(n) * g.abs() @ (right.abs() + b_right[:, None]).t())
        return low_right, err

    def _back_project(self, norm: torch.Tensor, err: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """U and its error bound (see ``step``)."""
        if not self.galore:
            return norm, err
        r = self.rank
        if self.side in ("right", "full"):
            q, b = self.right, self.err_right
            full = norm @ q
            err = err @ (q.abs() + b[:, None]) + (norm.abs() @ b)[:, None] + gamma(r) * norm.abs() @ q.abs()
            if self.side == "right":
                return full, err
            norm = full  # full: then U = P (N Q)
        p, b = self.left, self.err_left
        full = p @ norm
        err = (p.abs() + b[None, :]) @ err + (b @ norm.abs())[None, :] + gamma(r) * p.abs() @ norm.abs()
        return full, err


def _aligned(basis: torch.Tensor, gauge: torch.Tensor, limit: torch.Tensor, dim: int,
             what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``basis`` with each vector (a column for dim=0, a row for dim=1) flipped to point the way
    the same vector of ``gauge`` points, and the vectors' distances to ``gauge``, each checked
    against ``limit``."""
    gauge = gauge.double()
    if gauge.shape != basis.shape:
        raise AssertionError(f"{what} has shape {tuple(gauge.shape)}, expected {tuple(basis.shape)}")
    signs = torch.where((basis * gauge).sum(dim=dim) < 0, -1.0, 1.0).to(basis.dtype)
    basis = basis * (signs[None, :] if dim == 0 else signs[:, None])
    distance = (gauge - basis).norm(dim=dim)
    if not bool((distance <= limit).all()):
        raise AssertionError(f"{what} is not the top singular vectors of the gradient: distances "
                             f"{distance.tolist()} to the fp64 ones, allowed {limit.tolist()}")
    return basis, distance


def spectrum_gradients(shape: tuple[int, int], steps: int, rank: int, size: float, seed: int = 0) -> list:
    """Gradients G = U diag(s) V^T with new random U, V at each step and singular values
    s = size (1, 0.86, ..., 0.3) for the top ``rank``, then 0.02 size: every gap is >= 0.1
    size, so the top-r basis and each of its vectors are well defined (see ``_refresh``)."""
    gen = torch.Generator().manual_seed(seed)
    m, n = shape
    k = min(m, n)
    top = torch.linspace(1.0, 0.3, rank) if rank > 1 else torch.ones(1)
    s = torch.cat([top, torch.full((k - rank,), 0.02)]) * size
    grads = []
    for _ in range(steps):
        u = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64)).Q
        v = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64)).Q
        grads.append(((u * s.double()) @ v.t()).float())
    return grads
