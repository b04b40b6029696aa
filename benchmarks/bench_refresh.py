"""Refresh cost: exact SVD (galore-torch's) against the randomized range finder.

One question: how much faster is proj_method="randomized" than "svd" on CPU,
and how much of the top-r spectral energy does it keep? Both run side by side
in one process on the same gradient (power-law spectrum, as LLM gradients
have). Prints a table and appends it, with machine, versions and date, to
benchmarks/results/refresh.md.

    python benchmarks/bench_refresh.py [--shapes 4096x4096 4096x11008] [--rank 128] [--repeats 3]
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import torch

from owlore_kernels.projector import compute_projection


def decaying_gradient(m: int, n: int, seed: int = 0) -> torch.Tensor:
    """m x n matrix with singular values (1 + i)^-1; returns G."""
    gen = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u = torch.linalg.qr(torch.randn(m, k, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=gen)).Q
    s = (1.0 + torch.arange(k, dtype=torch.float32)) ** -1.0
    return (u * s) @ v.t(), s


def timed(fn, repeats: int) -> tuple[float, float, object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), (max(times) - min(times)), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["4096x4096", "4096x11008"])
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="randomized repeats (svd runs once: it takes ~10-40 s)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "refresh.md"))
    args = parser.parse_args()

    rows = []
    for shape in args.shapes:
        m, n = (int(x) for x in shape.split("x"))
        grad, s = decaying_gradient(m, n)
        side = "left" if m < n else "right"  # proj_type="std"
        best = float((s[: args.rank] ** 2).sum())

        def energy(p, q):
            low = p.t() @ grad if side == "left" else grad @ q.t()
            return float(low.square().sum()) / best

        t_rand, spread, (p, q) = timed(
            lambda: compute_projection(grad, args.rank, side, "randomized", seed=0), args.repeats)
        t_svd, _, (ps, qs) = timed(lambda: compute_projection(grad, args.rank, side, "svd"), 1)
        rows.append((f"{m}x{n}", args.rank, t_svd, t_rand, spread, t_svd / t_rand, energy(p, q), energy(ps, qs)))
        print(f"{m}x{n} r={args.rank}: svd {t_svd:.2f} s, randomized {t_rand:.3f} s "
              f"(spread {spread:.3f}), {t_svd / t_rand:.0f}x faster, energy {energy(p, q):.4f} of exact")

    header = ("| shape | rank | svd (s) | randomized (s, median) | spread (s) | speed-up | energy kept (randomized) "
              "| energy kept (svd) |\n|---|---|---|---|---|---|---|---|\n")
    table = "".join(f"| {r[0]} | {r[1]} | {r[2]:.2f} | {r[3]:.3f} | {r[4]:.3f} | {r[5]:.0f}x | {r[6]:.4f} | {r[7]:.4f} |\n"
                    for r in rows)
    stamp = (f"\n## {datetime.datetime.now().isoformat(timespec='seconds')} on {platform.node()} "
             f"({os.cpu_count()} cores, {platform.processor() or platform.machine()}), torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads\n\n")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "a") as f:
        f.write(stamp + header + table)
    print(header + table, end="")


if __name__ == "__main__":
    main()
