"""Host cost of one optimizer step per GaLore weight: OwLoreAdamW vs galore-torch, on weights so small
that the math does not count.

224 weights of 64 x 96 at rank 16 (the count of LLaMA-2-7B's block linears; each weight's GEMMs
are ~0.2 MFLOP, microseconds), random gradients, refresh frozen after the first step (an
update_proj_gap larger than the run). What is left is what each step spends per weight on the
host: argument checks, state lookups, dispatch and launches. OwLoreAdamW groups the weights and
makes one call of each multi-tensor op per group; galore-torch makes ~12 torch calls per weight.
Also timed: OwLoreAdamW with one weight per group (224 groups), the cost of an ungrouped step.

    python benchmarks/bench_step_host.py [--weights 224] [--repeats 15]

Results are appended to benchmarks/results/step_host.md with the machine stamp.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _weights(count: int, shape: tuple[int, int], seed: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.02) for _ in range(count)]


def _set_grads(params: list[torch.nn.Parameter], grads: list[torch.Tensor]) -> None:
    for p, g in zip(params, grads):
        p.grad = g


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=int, default=224)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--cols", type=int, default=96)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--no-save", action="store_true", help="print only; append nothing to results/")
    args = parser.parse_args(argv)

    import galore_torch

    from owlore_kernels import OwLoreAdamW
    from owlore_kernels.bench.harness import (append_results, frozen_galore_refresh, machine_stamp,
                                              markdown_table, time_interleaved)

    stamp = machine_stamp()
    shape = (args.rows, args.cols)
    group = dict(rank=args.rank, update_proj_gap=10**9, scale=0.25, proj_type="std")
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(shape, generator=gen) for _ in range(args.weights)]
    runs = {}
    ours = _weights(args.weights, shape, 0)
    runs["owlore (grouped)"] = (ours, OwLoreAdamW([{"params": ours, **group}], lr=1e-3))
    single = _weights(args.weights, shape, 0)
    runs["owlore (one group per weight)"] = (single, OwLoreAdamW([{"params": [p], **group} for p in single], lr=1e-3))
    theirs = _weights(args.weights, shape, 0)
    runs["galore-torch"] = (theirs, galore_torch.GaLoreAdamW([{"params": theirs, **group}], lr=1e-3,
                                                             no_deprecation_warning=True))

    def stepper(params, opt):
        def step():
            _set_grads(params, grads)
            opt.step()
        return step

    with frozen_galore_refresh():
        for params, opt in runs.values():  # the first step makes the state and the bases
            stepper(params, opt)()
        timings = time_interleaved({name: stepper(*run) for name, run in runs.items()},
                                   repeats=args.repeats, warmup=2)
    base = timings["galore-torch"].median
    rows = []
    for name, t in timings.items():
        rows.append({"candidate": name, "weights": args.weights, "shape": f"{shape[0]}x{shape[1]}", "rank": args.rank,
                     "step ms (median)": round(t.median, 2), "p10": round(t.p10, 2),  # Timing is in ms
                     "p90": round(t.p90, 2), "us per weight": round(t.median * 1e3 / args.weights, 1),
                     "vs galore-torch": round(t.median / base, 3)})
    headers = list(rows[0])
    table = markdown_table(headers, [[r[h] for h in headers] for r in rows])
    print(table)
    if not args.no_save:
        append_results(RESULTS, "step_host", rows=rows, stamp=stamp, table=table,
                       command="python benchmarks/bench_step_host.py " + " ".join(argv or sys.argv[1:]),
                       notes=f"torch threads: {torch.get_num_threads()}")
    return {r["candidate"]: r for r in rows}


if __name__ == "__main__":
    main()
