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
benchmarks/results/cpu_bench.md (raw samples to cpu_bench.jsonl).

    python benchmarks/bench_cpu.py [--shapes 4096x4096 4096x11008] [--ranks 128 256] [--repeats 15]
"""
from __future__ import annotations

import argparse
import os

import torch

import owlore_kernels
from owlore_kernels.bench.harness import (Timing, append_results, frozen_galore_refresh, machine_stamp,
                                          markdown_table, stamp_line, time_interleaved)
from owlore_kernels.ops import backend_report
from owlore_kernels.ops.back_project_update import back_project_update_
from owlore_kernels.ops.outlier_count import outlier_count
from owlore_kernels.ops.project_adam import project_adam_

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
OUTLIER_M = 5.0  # OWL's outlier multiplier


def bench_outlier(shape: tuple[int, int], repeats: int) -> list[dict]:
    w = torch.randn(*shape)
    candidates = {
        "cpp outlier_count": lambda: outlier_count(w, threshold=OUTLIER_M, backend="cpp"),
        "naive torch": lambda: (w.abs() > OUTLIER_M * w.abs().mean()).sum(),
    }
    cpp, naive = candidates["cpp outlier_count"](), candidates["naive torch"]()
    assert cpp[1] == int(naive), (cpp, naive)  # same answer before timing it
    timings = time_interleaved(candidates, repeats=repeats, warmup=2)
    return [row("outlier", shape, None, k, t, baseline=timings["naive torch"]) for k, t in timings.items()]


def bench_step(shape: tuple[int, int], rank: int, repeats: int, warmup: int, with_adamw: bool) -> list[dict]:
    from galore_torch import GaLoreAdamW

    grad = torch.randn(*shape) * 1e-2  # shared: no candidate writes to the gradient
    lr = 1e-6  # small, so many steps leave the weights in range

    def galore_group(w):
        return [{"params": [w], "rank": rank, "update_proj_gap": 10**9, "scale": 0.25, "proj_type": "std"}]

    weights, optimizers = {}, {}
    for name in ("owlore cpp", "owlore torch", "galore-torch", "AdamW fused") if with_adamw else (
            "owlore cpp", "owlore torch", "galore-torch"):
        w = torch.nn.Parameter(torch.randn(*shape) * 0.02)
        w.grad = grad
        weights[name] = w
        if name.startswith("owlore"):
            optimizers[name] = owlore_kernels.OwLoreAdamW(
                galore_group(w), lr=lr, proj_method="randomized", backend=name.split()[1])
        elif name == "galore-torch":
            optimizers[name] = GaLoreAdamW(galore_group(w), lr=lr)
        else:
            optimizers[name] = torch.optim.AdamW([w], lr=lr, fused=True)
    candidates = {k: opt.step for k, opt in optimizers.items()}
    timings = time_interleaved(candidates, repeats=repeats, warmup=warmup)
    rows = [row("step", shape, rank, k, t, baseline=timings["galore-torch"]) for k, t in timings.items()]
    del weights, optimizers
    return rows


def bench_fused_ops(shape: tuple[int, int], rank: int, repeats: int) -> list[dict]:
    m, n = shape
    side = "right" if m >= n else "left"  # galore-torch's "std" choice
    grad = torch.randn(m, n) * 1e-2
    w = torch.randn(m, n) * 0.02
    proj = torch.linalg.qr(torch.randn(m if side == "left" else n, rank)).Q
    if side == "right":
        proj = proj.t().contiguous()
    low = (rank, n) if side == "left" else (m, rank)
    exp_avg, exp_avg_sq, out = torch.zeros(low), torch.zeros(low), torch.empty(low)
    beta1, beta2, step, lr, weight_decay, scale = 0.9, 0.999, 2, 1e-6, 0.01, 0.25
    adam = dict(side=side, beta1=beta1, beta2=beta2, eps=1e-6, bias_correction1=1 - beta1**step,
                bias_correction2=1 - beta2**step, out=out)
    update = dict(side=side, beta=1 - lr * weight_decay, alpha=-lr * scale)
    candidates = {
        "cpp project_adam": lambda: project_adam_(grad, proj, exp_avg, exp_avg_sq, backend="cpp", **adam),
        "torch project_adam": lambda: project_adam_(grad, proj, exp_avg, exp_avg_sq, backend="torch", **adam),
        "cpp back_project_update": lambda: back_project_update_(w, proj, out, backend="cpp", **update),
        "torch back_project_update": lambda: back_project_update_(w, proj, out, backend="torch", **update),
    }
    timings = time_interleaved(candidates, repeats=repeats, warmup=2)
    return [row(f"op ({side})", shape, rank, k, t, baseline=timings["torch " + k.split(" ", 1)[1]])
            for k, t in timings.items()]


def row(what: str, shape, rank, name: str, timing: Timing, baseline: Timing) -> dict:
    return {"what": what, "shape": f"{shape[0]}x{shape[1]}", "rank": rank, "candidate": name, **timing.summary(),
            "speedup_vs_baseline": baseline.median / timing.median}


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
    with frozen_galore_refresh():
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
        append_results(RESULTS, "cpu_bench", rows=rows, stamp=stamp, table=table(rows), command=command, notes=notes)


if __name__ == "__main__":
    main()
