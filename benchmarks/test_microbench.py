"""Microbenchmarks: one optimizer step, the subspace refresh, the outlier scan.

Run with ``pytest benchmarks/`` (a few minutes on 2 CPU cores; ``-k`` narrows it). Results are
recorded, not asserted: medians with spread go to ``benchmarks/results/bench_micro.jsonl``.

* ``test_step``: one no-refresh step of OwLoreAdamW on each backend that runs on this device
  (``owlore_kernels.ops.backend_report()``; Triton only on CUDA -- the interpreter is a test
  vehicle), galore-torch's GaLoreAdamW, and torch.optim.AdamW(fused=True), at 4096x4096 and
  4096x11008, ranks 128 and 256. The projection is computed before timing (OwLore: one
  randomized refresh; galore-torch: a random orthonormal basis put into its projector) and
  ``update_proj_gap`` is huge, so the timed steps never refresh.
* ``test_refresh``: the refresh alone, exact SVD (rank-independent: once per shape, one round,
  ~10 s and ~37 s on 2 cores) vs the randomized range finder.
* ``test_outlier_scan``: ``outlier_count`` per backend vs a naive torch expression.
"""
from __future__ import annotations

import pytest
import torch

from conftest import DEVICE

SHAPES = [(4096, 4096), (4096, 11008)]
RANKS = [128, 256]
ROUNDS = 5


def _backends() -> list[str]:
    from owlore_kernels.ops import _runs_on, backend_report

    unavailable = backend_report()["unavailable"]
    names = [b for b in ("triton", "cpp", "torch") if b not in unavailable and _runs_on(b, DEVICE.type)]
    if DEVICE.type == "cpu":
        names = [b for b in names if b != "triton"]  # never the interpreter here
    return names


def _weight(shape):
    w = torch.nn.Parameter(torch.randn(*shape, device=DEVICE) * 0.02)
    w.grad = torch.randn(*shape, device=DEVICE) * 1e-3
    return w


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _run(benchmark, step, shape, **info):
    benchmark.extra_info.update(shape=list(shape), device=str(DEVICE), **info)
    step()  # warm-up: allocates state, builds the projection

    def timed():
        step()
        _sync()

    benchmark.pedantic(timed, rounds=ROUNDS, warmup_rounds=1, iterations=1)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("impl", ["owlore-" + b for b in _backends()] + ["galore_torch"])
def test_step(benchmark, impl, rank, shape):
    benchmark.group = f"step {shape[0]}x{shape[1]} r={rank}"
    w = _weight(shape)
    if impl == "galore_torch":
        from galore_torch import GaLoreAdamW
        from galore_torch.galore_projector import GaLoreProjector

        opt = GaLoreAdamW([{"params": [w], "rank": rank, "update_proj_gap": 10**9, "scale": 0.25,
                            "proj_type": "std"}], lr=1e-3, no_deprecation_warning=True)
        proj = GaLoreProjector(rank, update_proj_gap=10**9, scale=0.25, proj_type="std")
        m, n = shape
        # std: m < n projects on the left (P: m x r), m >= n on the right (r x n)
        basis = torch.linalg.qr(torch.randn(m if m < n else n, rank, device=DEVICE)).Q
        proj.ortho_matrix = basis if m < n else basis.t().contiguous()
        opt.state[w] = {"step": 1, "projector": proj}  # step 1: no refresh (iter % gap != 0)
        _run(benchmark, opt.step, shape, impl=impl, rank=rank)
    else:
        from owlore_kernels import OwLoreAdamW

        backend = impl.split("-", 1)[1]
        opt = OwLoreAdamW([{"params": [w], "rank": rank}], lr=1e-3, update_proj_gap=10**9,
                          proj_method="randomized", backend=backend)
        _run(benchmark, opt.step, shape, impl=impl, rank=rank, backend=backend)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_step_torch_adamw_fused(benchmark, shape):
    benchmark.group = f"step {shape[0]}x{shape[1]} full-rank"
    w = _weight(shape)
    opt = torch.optim.AdamW([w], lr=1e-3, fused=True)
    _run(benchmark, opt.step, shape, impl="torch.optim.AdamW(fused=True)")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("method, rank", [("svd", None), ("randomized", 128), ("randomized", 256)])
def test_refresh(benchmark, method, rank, shape):
    from owlore_kernels.projector import compute_projection

    benchmark.group = f"refresh {shape[0]}x{shape[1]}"
    grad = torch.randn(*shape, device=DEVICE)
    side = "left" if shape[0] < shape[1] else "right"
    benchmark.extra_info.update(shape=list(shape), method=method, rank=rank, device=str(DEVICE))

    def refresh():
        compute_projection(grad, rank or 128, side, method)
        _sync()

    # the exact SVD takes 10-40 s on 2 CPU cores: one round; the range finder five
    rounds = 1 if method == "svd" and DEVICE.type == "cpu" else ROUNDS
    benchmark.pedantic(refresh, rounds=rounds, warmup_rounds=0 if rounds == 1 else 1, iterations=1)


@pytest.mark.parametrize("impl", ["naive-torch"] + [f"outlier_count-{b}" for b in _backends()])
def test_outlier_scan(benchmark, impl):
    """One decoder block's worth of OWL scoring at 7B shapes: 4 x (4096x4096) + 3 x (4096x11008)."""
    from owlore_kernels.ops.outlier_count import outlier_count

    benchmark.group = "outlier scan (one LLaMA-7B block, M=5)"
    weights = [torch.randn(4096, 4096, device=DEVICE) for _ in range(4)]
    weights += [torch.randn(4096, 11008, device=DEVICE), torch.randn(4096, 11008, device=DEVICE),
                torch.randn(11008, 4096, device=DEVICE)]
    benchmark.extra_info.update(impl=impl, elements=sum(w.numel() for w in weights), device=str(DEVICE))
    if impl == "naive-torch":
        def scan():
            total = sum(w.abs().sum() for w in weights)
            mean = total / sum(w.numel() for w in weights)
            return int(sum((w.abs() > 5 * mean).sum() for w in weights))
    else:
        backend = impl.split("-", 1)[1]

        def scan():
            return outlier_count(weights, 5.0, backend=backend)[1]

    benchmark.pedantic(scan, rounds=ROUNDS, warmup_rounds=1, iterations=1)
