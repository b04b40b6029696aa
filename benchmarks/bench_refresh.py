"""Refresh cost: exact SVD (galore-torch's) against the randomized range finder.

One question: how much faster is proj_method="randomized" than "svd" on CPU,
and how much of the top-r spectral energy does it keep? Both run side by side
in one process on the same gradient (power-law spectrum, as LLM gradients
have). Prints a table and appends it, with machine, versions and date, to
benchmarks/results/refresh.md (the run, samples included, as a pytest-benchmark saved run
under benchmarks/results/refresh/).

    python benchmarks/bench_refresh.py [--shapes 4096x4096 4096x11008] [--rank 128] [--repeats 3] [--no-save]
"""
from __future__ import annotations

import argparse
import os

import torch

from owlore_kernels.bench.harness import (append_results, benchmark_entry, machine_stamp, markdown_table,
                                          time_interleaved)
from owlore_kernels.projector import compute_projection

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def decaying_gradient(m: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """m x n matrix with singular values (1 + i)^-1; returns (G, its singular values)."""
    gen = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u = torch.linalg.qr(torch.randn(m, k, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=gen)).Q
    s = (1.0 + torch.arange(k, dtype=torch.float32)) ** -1.0
    return (u * s) @ v.t(), s


def timed_refresh(grad: torch.Tensor, rank: int, side: str, method: str, repeats: int):
    """(Timing, the last (P, Q) returned) of ``repeats`` refreshes, no warm-up (an SVD is 10-40 s)."""
    last = {}

    def refresh():
        last["pq"] = compute_projection(grad, rank, side, method, seed=0)  # svd ignores the seed

    return time_interleaved({method: refresh}, repeats=repeats, warmup=0)[method], last["pq"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["4096x4096", "4096x11008"], help="gradient shapes, MxN")
    parser.add_argument("--rank", type=int, default=128, help="projection rank")
    parser.add_argument("--repeats", type=int, default=3, help="randomized repeats (svd runs once: it takes ~10-40 s)")
    parser.add_argument("--no-save", action="store_true", help="print only; append nothing to benchmarks/results")
    args = parser.parse_args()
    stamp = machine_stamp()

    rows, entries = [], []
    for shape in args.shapes:
        m, n = (int(x) for x in shape.split("x"))
        grad, s = decaying_gradient(m, n)
        side = "left" if m < n else "right"  # proj_type="std"
        best = float((s[: args.rank] ** 2).sum())

        def energy(pq):
            p, q = pq
            low = p.t() @ grad if side == "left" else grad @ q.t()
            return float(low.square().sum()) / best

        rand, pq_rand = timed_refresh(grad, args.rank, side, "randomized", args.repeats)
        svd, pq_svd = timed_refresh(grad, args.rank, side, "svd", 1)
        t_rand, t_svd = rand.median / 1e3, svd.median / 1e3
        entries += [benchmark_entry(f"refresh {m}x{n} r={args.rank}", method, timing, params={"shape": shape})
                    for method, timing in (("svd", svd), ("randomized", rand))]
        rows.append(dict(shape=f"{m}x{n}", rank=args.rank, svd_s=t_svd, randomized_s=t_rand,
                         randomized_spread_s=(rand.max - rand.min) / 1e3, speedup=t_svd / t_rand,
                         energy_randomized=energy(pq_rand), energy_svd=energy(pq_svd),
                         randomized_samples_ms=rand.samples_ms))
        r = rows[-1]
        print(f"{m}x{n} r={args.rank}: svd {t_svd:.2f} s, randomized {t_rand:.3f} s "
              f"(spread {r['randomized_spread_s']:.3f}), {r['speedup']:.0f}x faster, "
              f"energy {r['energy_randomized']:.4f} of exact")

    table = markdown_table(
        ["shape", "rank", "svd (s)", "randomized (s, median)", "spread (s)", "speed-up", "energy kept (randomized)",
         "energy kept (svd)"],
        [[r["shape"], r["rank"], f"{r['svd_s']:.2f}", f"{r['randomized_s']:.3f}", f"{r['randomized_spread_s']:.3f}",
          f"{r['speedup']:.0f}x", f"{r['energy_randomized']:.4f}", f"{r['energy_svd']:.4f}"] for r in rows])
    print(table)
    if not args.no_save:
        command = f"python benchmarks/bench_refresh.py --shapes {' '.join(args.shapes)} --rank {args.rank} " \
                  f"--repeats {args.repeats}"
        append_results(RESULTS, "refresh", rows=rows, stamp=stamp, table=table, command=command,
                       notes=f"{torch.get_num_threads()} torch threads.", benchmarks=entries)


if __name__ == "__main__":
    main()
