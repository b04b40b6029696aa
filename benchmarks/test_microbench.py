"""Microbenchmarks of the fused ops and of ``OwLoreAdamW.step()``, through pytest-benchmark.

``make microbench`` times them, saves the run (``.benchmarks/``, with the machine) and compares
it with the previous saved run; ``make test`` runs each once with ``--benchmark-disable``, as a
smoke test of every timed path. Each table (``benchmark.group``) holds like with like: one op,
or one optimizer step, at one shape and rank:

* ``project_adam_ MxN r=R``, ``back_project_update_ MxN r=R``: the op per backend that runs on
  this device (C++ and the torch reference on CPU; Triton and the torch reference on CUDA --
  the Triton interpreter is a test vehicle, not timed), one call at step 2 as the optimizer
  makes it.
* ``outlier_count MxN``: per backend, and the expression users would otherwise write,
  ``(w.abs() > 5 * w.abs().mean()).sum()``.
* ``step MxN r=R``: one no-refresh ``OwLoreAdamW.step()`` per backend, galore-torch's
  ``GaLoreAdamW.step()`` (the same math; its first step's SVD replaced by a random basis,
  ``update_proj_gap`` 10**9), and full-rank ``torch.optim.AdamW`` (``foreach`` and
  ``fused=True``; no projection, for scale).

* ``project_adam_foreach_ ...``, ``back_project_update_foreach_ ...``: one decoder block's 7
  linears in one call per projection side (as OwLoreAdamW groups them) against a loop of 7
  single-weight calls, per backend; ``adamw_foreach_ ...``: the same 7 weights as plain AdamW
  against torch.optim.AdamW's ``foreach`` and ``fused`` kernels. Skipped where owlore_kernels
  has no foreach ops.

Shapes are a LLaMA MLP weight at 1/4 and 1/2 of LLaMA-7B's width, both orientations (the
"std" projection side follows the shape); CUDA adds 7B's own 4096x11008 at rank 256. fp32.
``--benchmark-disable`` runs them at the
tiny ``SMOKE_SHAPES`` instead (the same code paths). Timer: the wall clock on CPU; on CUDA ``torch.cuda.synchronize()`` ends each round and an
untimed setup flushes the L2 cache (``harness.run_pedantic``). ``--microbench-rounds N``
overrides the rounds (default 20 on CPU, 50 on CUDA). The candidates are built by
``bench_cpu.py``'s ``make_*`` functions, which its interleaved comparison uses too.
"""
from __future__ import annotations

import pytest
import torch

from bench_cpu import (STEP_IMPLS, block_shapes, foreach_available, make_foreach_op, make_fused_op,
                       make_outlier_count, make_step)
from owlore_kernels.bench.harness import run_pedantic
from owlore_kernels.ops import _REGISTRY, _runs_on, backend_report

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# (m, n, rank): an MLP weight of a 1/4- and a 1/2-width LLaMA-7B (hidden 1024 / 2048), the second
# in both orientations (left and right projection), and 7B's own on a GPU (2 CPU cores: ~0.3 s a step)
SHAPES = [(1024, 2816, 64), (2048, 5504, 128), (5504, 2048, 128)] + (
    [(4096, 11008, 256)] if DEVICE.type == "cuda" else [])
# `--benchmark-disable` (the smoke run in `make test`) runs every timed path once, both projection
# sides, at a size that keeps the whole run under a minute on 2 cores (mostly imports)
SMOKE_SHAPES = [(256, 704, 16), (704, 256, 16)]
# the foreach ops: one decoder block's 7 linears, (hidden, intermediate, rank), at 1/4 of LLaMA-7B's width
BLOCKS = [(1024, 2816, 64)]
SMOKE_BLOCKS = [(64, 176, 8)]
FOREACH = pytest.mark.skipif(not foreach_available(), reason="this owlore_kernels has no foreach ops")
WARMUP_ROUNDS = {"cpu": 2, "cuda": 5}
DEFAULT_ROUNDS = {"cpu": 20, "cuda": 50}


def backends() -> list[str]:
    """The op backends loaded here that run on DEVICE; never Triton's interpreter (a test vehicle)."""
    unavailable = backend_report()["unavailable"]
    found = [b for b in ("triton", "cpp", "torch") if b not in unavailable and _runs_on(b, DEVICE.type)]
    return [b for b in found if not (b == "triton" and DEVICE.type != "cuda")]


def op_backends(op: str) -> list[str]:
    """``backends()`` that implement ``op``."""
    return [b for b in backends() if b in _REGISTRY.get(op, {})]


def step_impls() -> list[str]:
    found = backends()
    return [impl for impl in STEP_IMPLS if not impl.startswith("owlore") or impl.split()[1] in found]


def shape_id(shape) -> str:
    return f"{shape[0]}x{shape[1]}-r{shape[2]}"


def pytest_generate_tests(metafunc):
    config = metafunc.config
    smoke = config.getoption("benchmark_disable") and not config.getoption("benchmark_enable")
    if "shape" in metafunc.fixturenames:
        metafunc.parametrize("shape", SMOKE_SHAPES if smoke else SHAPES, ids=shape_id)
    if "block" in metafunc.fixturenames:
        metafunc.parametrize("block", SMOKE_BLOCKS if smoke else BLOCKS, ids=lambda b: f"h{b[0]}-i{b[1]}-r{b[2]}")


def timed(benchmark, request, fn, **info):
    benchmark.extra_info.update(device=str(DEVICE), **info)
    rounds = request.config.getoption("microbench_rounds") or DEFAULT_ROUNDS[DEVICE.type]
    return run_pedantic(benchmark, fn, device=DEVICE, rounds=rounds, warmup_rounds=WARMUP_ROUNDS[DEVICE.type])


@pytest.mark.parametrize("backend", backends())
def test_project_adam(benchmark, request, backend, shape):
    m, n, rank = shape
    benchmark.group = f"project_adam_ {m}x{n} r={rank}"
    timed(benchmark, request, make_fused_op("project_adam", backend, (m, n), rank, DEVICE), backend=backend)


@pytest.mark.parametrize("backend", backends())
def test_back_project_update(benchmark, request, backend, shape):
    m, n, rank = shape
    benchmark.group = f"back_project_update_ {m}x{n} r={rank}"
    timed(benchmark, request, make_fused_op("back_project_update", backend, (m, n), rank, DEVICE), backend=backend)


@pytest.mark.parametrize("impl", backends() + ["naive torch"])
def test_outlier_count(benchmark, request, impl, shape):
    m, n, _ = shape
    benchmark.group = f"outlier_count {m}x{n}"
    timed(benchmark, request, make_outlier_count(impl, (m, n), DEVICE), impl=impl)


@pytest.mark.parametrize("impl", step_impls())
def test_step(benchmark, request, impl, shape):
    m, n, rank = shape
    benchmark.group = f"step {m}x{n} r={rank}"
    # `make microbench` fails on a slower median of OwLoreAdamW's step only (benchmarks/conftest.py)
    benchmark.extra_info["regression_gate"] = impl.startswith("owlore")
    timed(benchmark, request, make_step(impl, (m, n), rank, DEVICE), impl=impl)


@FOREACH
@pytest.mark.parametrize("op", ["project_adam_foreach", "back_project_update_foreach"])
@pytest.mark.parametrize("impl", [f"{kind} {b}" for b in backends() for kind in ("foreach", "loop")])
def test_projection_foreach(benchmark, request, op, impl, block):
    hidden, intermediate, rank = block
    if impl.startswith("foreach") and impl.split()[1] not in op_backends(op):
        pytest.skip(f"no {impl.split()[1]} kernel of {op} here")
    benchmark.group = f"{op}_ one block h={hidden} i={intermediate} r={rank}: 7 weights"
    timed(benchmark, request, make_foreach_op(op, impl, block_shapes(hidden, intermediate), rank, DEVICE),
          impl=impl)


@FOREACH
@pytest.mark.parametrize("impl", [f"foreach {b}" for b in backends()] + ["AdamW foreach", "AdamW fused"])
def test_adamw_foreach(benchmark, request, impl, block):
    hidden, intermediate, _ = block
    if impl.startswith("foreach") and impl.split()[1] not in op_backends("adamw_foreach"):
        pytest.skip(f"no {impl.split()[1]} kernel of adamw_foreach here")
    benchmark.group = f"adamw_foreach_ one block h={hidden} i={intermediate}: 7 weights"
    timed(benchmark, request, make_foreach_op("adamw_foreach", impl, block_shapes(hidden, intermediate), 0, DEVICE),
          impl=impl)
