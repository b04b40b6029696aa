"""CPU: how much faster is the C++ backend than what a user would otherwise run?

Two questions, answered side by side in one process, with the candidates
interleaved repeat by repeat (so a noisy neighbour slows them all alike):

(a) outlier count on one weight: ``torch.ops.owlore.outlier_count`` (two
    OpenMP passes, no temporary) against the naive
    ``(w.abs() > M * w.abs().mean()).sum()``. Target: >= 3x.
(b) one optimizer step with no projection refresh: OwLoreAdamW with
    backend="cpp" and backend="torch", galore-torch's GaLoreAdamW, and
    torch.optim.AdamW(fused=True) (full-rank, for scale). Target: cpp >= 1.4x
    faster than galore-torch.
(c) the two fused ops alone, cpp against the torch reference, to show where
    the step's time goes.

The refresh is not what is measured (update_proj_gap is 10**9 and warm-up
steps run first), so the one refresh in warm-up uses cheap bases: OwLoreAdamW's
randomized range finder, and for galore-torch
``harness.frozen_galore_refresh()``, a random orthonormal basis of the same
shape (its exact SVD takes ~37 s at 4096x11008 on 2 cores and changes nothing
about the timed steps). The refresh itself is ``bench_refresh.py``'s question.

Reports median, p10-p90 and min-max per candidate (ms), prints a table with
ratios, and appends it with machine, versions, load average and date to
benchmarks/results/cpu_bench.md (the run, raw samples included, as a pytest-benchmark
saved run under benchmarks/results/cpu_bench/).

    python benchmarks/bench_cpu.py [--shapes 4096x4096 4096x11008] [--ranks 128 256] [--repeats 15]
"""
from __future__ import annotations

import argparse
import os

import torch

import owlore_kernels
from owlore_kernels.bench.harness import (Timing, append_results, benchmark_entry, frozen_galore_refresh,
                                          machine_stamp, markdown_table, stamp_line, time_interleaved)
from owlore_kernels.ops import backend_report
from owlore_kernels.ops.back_project_update import back_project_update_
from owlore_kernels.ops.outlier_count import outlier_count
from owlore_kernels.ops.project_adam import project_adam_

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
OUTLIER_M = 5.0  # OWL's outlier multiplier
LR = 1e-6  # small, so many steps leave the weights in range
# the optimizers whose step is timed: OwLoreAdamW per backend, galore-torch's GaLoreAdamW (same
# math), and torch.optim.AdamW full rank (for scale: no projection, ~8x the state)
STEP_IMPLS = ("owlore cpp", "owlore torch", "owlore triton", "galore-torch", "AdamW foreach", "AdamW fused")


def seeded_randn(shape, device="cpu", seed: int = 0, std: float = 1.0) -> torch.Tensor:
    """The same values for every candidate and device: drawn on a seeded CPU generator, then moved."""
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * std).to(device)


def make_outlier_count(impl: str, shape, device="cpu"):
    """``outlier_count`` on one m x n weight: ``impl`` is a backend, or "naive torch" (the expression users write)."""
    w = seeded_randn(shape, device)
    if impl == "naive torch":
        return lambda: (w.abs() > OUTLIER_M * w.abs().mean()).sum()
    return lambda: outlier_count(w, threshold=OUTLIER_M, backend=impl)


def make_step(impl: str, shape, rank: int, device="cpu", dtype=torch.float32):
    """``opt.step`` of one of ``STEP_IMPLS`` on its own m x n weight, after one untimed step.

    The gradient is the same for every impl (seeded, never written by a step). The untimed
    step creates the state and the projection: OwLore's randomized range finder, and for
    galore-torch ``frozen_galore_refresh()``'s random basis (its exact SVD changes nothing about
    the steps after it). ``update_proj_gap`` is 10**9, so no timed step refreshes.
    """
    if impl not in STEP_IMPLS:
        raise ValueError(f"impl must be one of {STEP_IMPLS}, got {impl!r}")
    w = torch.nn.Parameter(seeded_randn(shape, device, seed=1, std=0.02).to(dtype))
    w.grad = seeded_randn(shape, device, seed=2, std=1e-2).to(dtype)
    group = [{"params": [w], "rank": rank, "update_proj_gap": 10**9, "scale": 0.25, "proj_type": "std"}]
    if impl.startswith("owlore"):
        opt = owlore_kernels.OwLoreAdamW(group, lr=LR, proj_method="randomized", backend=impl.split()[1])
    elif impl == "galore-torch":
        from galore_torch import GaLoreAdamW

        opt = GaLoreAdamW(group, lr=LR, no_deprecation_warning=True)
    else:
        opt = torch.optim.AdamW([w], lr=LR, **({"foreach": True} if impl == "AdamW foreach" else {"fused": True}))
    with frozen_galore_refresh():
        opt.step()
    return opt.step


def make_fused_op(op: str, backend: str, shape, rank: int, device="cpu"):
    """One call of a fused op (``"project_adam"`` or ``"back_project_update"``) at step 2, as
    OwLoreAdamW.step makes it for an m x n weight (side as galore-torch's "std": the shorter one)."""
    m, n = shape
    side = "right" if m >= n else "left"
    proj = torch.linalg.qr(seeded_randn((m if side == "left" else n, rank), seed=3)).Q
    proj = (proj if side == "left" else proj.t().contiguous()).to(device)
    low = (rank, n) if side == "left" else (m, rank)
    out = torch.empty(low, device=device)
    beta1, beta2, step, weight_decay, scale = 0.9, 0.999, 2, 0.01, 0.25
    if op == "project_adam":
        grad = seeded_randn(shape, device, seed=2, std=1e-2)
        exp_avg, exp_avg_sq = torch.zeros(low, device=device), torch.zeros(low, device=device)
        return lambda: project_adam_(grad, proj, exp_avg, exp_avg_sq, side=side, beta1=beta1, beta2=beta2, eps=1e-6,
                                     bias_correction1=1 - beta1**step, bias_correction2=1 - beta2**step, out=out,
                                     backend=backend)
    if op == "back_project_update":
        w = seeded_randn(shape, device, seed=1, std=0.02)
        out.copy_(seeded_randn(low, device, seed=4))
        return lambda: back_project_update_(w, proj, out, side=side, beta=1 - LR * weight_decay, alpha=-LR * scale,
                                            backend=backend)
    raise ValueError(f"op must be 'project_adam' or 'back_project_update', got {op!r}")


# the foreach ops (one call per group of weights; owlore_kernels.ops) and the loop of single-weight
# calls they replace, on one decoder block's 7 linears
FOREACH_OPS = ("project_adam_foreach", "back_project_update_foreach", "adamw_foreach")


def foreach_available() -> bool:
    """Whether this owlore_kernels defines the foreach ops."""
    from owlore_kernels.ops import OPS

    return all(op in OPS for op in FOREACH_OPS)


def block_shapes(hidden: int, intermediate: int) -> list[tuple[int, int]]:
    """A LLaMA decoder block's 7 linear weights: q, k, v, o (h x h), gate, up (i x h), down (h x i)."""
    return [(hidden, hidden)] * 4 + [(intermediate, hidden)] * 2 + [(hidden, intermediate)]


def make_foreach_op(op: str, impl: str, shapes, rank: int, device="cpu"):
    """One step's worth of ``op`` over the weights ``shapes`` (galore-torch's "std" side per weight).

    ``impl``: ``"foreach <backend>"`` (one call per projection side, as OwLoreAdamW groups them),
    ``"loop <backend>"`` (one single-weight call per weight: the same math; projection ops only),
    or for ``adamw_foreach`` ``"AdamW foreach"`` / ``"AdamW fused"`` (torch.optim's multi-tensor
    kernels on the same weights: the same math as ``variant="torch"``).
    """
    from owlore_kernels.ops import adamw, back_project_update, project_adam

    kind, backend = impl.split(" ", 1)
    beta1, beta2, step, weight_decay, scale = 0.9, 0.999, 2, 0.01, 0.25
    bc1, bc2 = 1 - beta1**step, 1 - beta2**step
    weights = [seeded_randn(shape, device, seed=1 + k, std=0.02) for k, shape in enumerate(shapes)]
    if op == "adamw_foreach":
        grads = [seeded_randn(shape, device, seed=100 + k, std=1e-2) for k, shape in enumerate(shapes)]
        if kind == "AdamW":
            params = [torch.nn.Parameter(w) for w in weights]
            for p, g in zip(params, grads):
                p.grad = g
            opt = torch.optim.AdamW(params, lr=LR, weight_decay=weight_decay,
                                    **({"foreach": True} if backend == "foreach" else {"fused": True}))
            opt.step()  # the state
            return opt.step
        moments = [(torch.zeros_like(w), torch.zeros_like(w)) for w in weights]
        coefficients = [(-LR / bc1, 1 - LR * weight_decay, bc2**0.5)] * len(weights)
        args = dict(variant="torch", beta1=beta1, beta2=beta2, eps=1e-8, backend=backend)
        return lambda: adamw.adamw_foreach_(weights, grads, [m for m, _ in moments], [v for _, v in moments],
                                            coefficients=coefficients, **args)
    sides = ["right" if m >= n else "left" for m, n in shapes]
    projs, lows = [], []
    for k, ((m, n), side) in enumerate(zip(shapes, sides)):
        q = torch.linalg.qr(seeded_randn((m if side == "left" else n, rank), seed=200 + k)).Q
        projs.append((q if side == "left" else q.t().contiguous()).to(device))
        lows.append((rank, n) if side == "left" else (m, rank))
    groups = {side: [k for k in range(len(shapes)) if sides[k] == side] for side in ("left", "right")}
    if op == "project_adam_foreach":
        grads = [seeded_randn(shape, device, seed=100 + k, std=1e-2) for k, shape in enumerate(shapes)]
        state = [(torch.zeros(low, device=device), torch.zeros(low, device=device), torch.empty(low, device=device))
                 for low in lows]
        args = dict(beta1=beta1, beta2=beta2, eps=1e-6, backend=backend)

        def foreach():
            for side, ks in groups.items():
                project_adam.project_adam_foreach_(
                    [grads[k] for k in ks], [projs[k] for k in ks], [state[k][0] for k in ks],
                    [state[k][1] for k in ks], [state[k][2] for k in ks], side=side,
                    bias_corrections=[(bc1, bc2)] * len(ks), **args)

        def loop():
            for k in range(len(shapes)):
                project_adam.project_adam_(grads[k], projs[k], state[k][0], state[k][1], out=state[k][2],
                                           side=sides[k], bias_correction1=bc1, bias_correction2=bc2, **args)

        return foreach if kind == "foreach" else loop
    if op == "back_project_update_foreach":
        updates = [seeded_randn(low, device, seed=300 + k) for k, low in enumerate(lows)]
        beta, alpha = 1 - LR * weight_decay, -LR * scale

        def foreach():
            for side, ks in groups.items():
                back_project_update.back_project_update_foreach_(
                    [weights[k] for k in ks], [projs[k] for k in ks], [updates[k] for k in ks], side=side,
                    coefficients=[(beta, alpha)] * len(ks), backend=backend)

        def loop():
            for k in range(len(shapes)):
                back_project_update.back_project_update_(weights[k], projs[k], updates[k], side=sides[k],
                                                         beta=beta, alpha=alpha, backend=backend)

        return foreach if kind == "foreach" else loop
    raise ValueError(f"op must be one of {FOREACH_OPS}, got {op!r}")


def bench_outlier(shape: tuple[int, int], repeats: int) -> list[dict]:
    candidates = {"cpp outlier_count": make_outlier_count("cpp", shape),
                  "naive torch": make_outlier_count("naive torch", shape)}
    cpp, naive = candidates["cpp outlier_count"](), candidates["naive torch"]()
    assert cpp[1] == int(naive), (cpp, naive)  # same answer before timing it
    timings = time_interleaved(candidates, repeats=repeats, warmup=2)
    return [row("outlier", shape, None, k, t, baseline=timings["naive torch"]) for k, t in timings.items()]


def bench_step(shape: tuple[int, int], rank: int, repeats: int, warmup: int, with_adamw: bool) -> list[dict]:
    names = ("owlore cpp", "owlore torch", "galore-torch") + (("AdamW fused",) if with_adamw else ())
    candidates = {name: make_step(name, shape, rank) for name in names}
    timings = time_interleaved(candidates, repeats=repeats, warmup=max(0, warmup - 1))  # make_step ran one
    return [row("step", shape, rank, k, t, baseline=timings["galore-torch"]) for k, t in timings.items()]


def bench_fused_ops(shape: tuple[int, int], rank: int, repeats: int) -> list[dict]:
    side = "right" if shape[0] >= shape[1] else "left"
    candidates = {f"{backend} {op}": make_fused_op(op, backend, shape, rank)
                  for op in ("project_adam", "back_project_update") for backend in ("cpp", "torch")}
    timings = time_interleaved(candidates, repeats=repeats, warmup=2)
    return [row(f"op ({side})", shape, rank, k, t, baseline=timings["torch " + k.split(" ", 1)[1]])
            for k, t in timings.items()]


def row(what: str, shape, rank, name: str, timing: Timing, baseline: Timing) -> dict:
    return {"what": what, "shape": f"{shape[0]}x{shape[1]}", "rank": rank, "candidate": name, **timing.summary(),
            "speedup_vs_baseline": baseline.median / timing.median, "timing": timing}


def entry(r: dict) -> dict:
    """The row as a pytest-benchmark run entry, grouped as ``make microbench`` groups its tables."""
    group = f"{r['what']} {r['shape']}" + (f" r={r['rank']}" if r["rank"] else "")
    return benchmark_entry(group, r["candidate"], r["timing"], params={"shape": r["shape"], "rank": r["rank"]})


def table(rows: list[dict]) -> str:
    headers = ["what", "shape", "rank", "candidate", "median ms", "p10–p90 ms", "min–max ms", "speedup vs baseline"]
    return markdown_table(headers, [
        [r["what"], r["shape"], r["rank"] or "-", r["candidate"], f"{r['median']:.1f}",
         f"{r['p10']:.1f}–{r['p90']:.1f}", f"{r['min']:.1f}–{r['max']:.1f}", f"{r['speedup_vs_baseline']:.2f}×"]
        for r in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["4096x4096", "4096x11008"], help="weight shapes, MxN")
    parser.add_argument("--ranks", nargs="+", type=int, default=[128, 256], help="projection ranks")
    parser.add_argument("--repeats", type=int, default=15, help="timed runs per candidate")
    parser.add_argument("--warmup", type=int, default=3, help="optimizer steps before timing (the first refreshes)")
    parser.add_argument("--no-save", action="store_true", help="print only; append nothing to benchmarks/results")
    args = parser.parse_args()
    if backend_report()["cpu"]["project_adam"] != "cpp":
        raise SystemExit(f"the C++ extension is not loaded: {backend_report()['unavailable']}")
    torch.manual_seed(0)
    stamp = machine_stamp()
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes]

    rows: list[dict] = []
    for shape in shapes:
        rows += bench_outlier(shape, args.repeats)
    for shape in shapes:
        for i, rank in enumerate(args.ranks):
            rows += bench_step(shape, rank, args.repeats, args.warmup, with_adamw=(i == 0))
            print(table(rows[-4:]), flush=True)
    for shape in shapes:
        rows += bench_fused_ops(shape, args.ranks[0], args.repeats)

    command = (f"python benchmarks/bench_cpu.py --shapes {' '.join(args.shapes)} --ranks "
               f"{' '.join(map(str, args.ranks))} --repeats {args.repeats} --warmup {args.warmup}")
    notes = ("outlier: baseline = naive torch; step: baseline = galore-torch GaLoreAdamW; "
             "op: baseline = the torch backend of the same op.")
    print(f"\n{stamp_line(stamp)}\n{notes}\n\n{table(rows)}")
    if not args.no_save:
        append_results(RESULTS, "cpu_bench", rows=[{k: v for k, v in r.items() if k != "timing"} for r in rows],
                       stamp=stamp, table=table(rows), command=command, notes=notes,
                       benchmarks=[entry(r) for r in rows])


if __name__ == "__main__":
    main()
