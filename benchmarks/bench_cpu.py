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
randomized range finder, and for galore-torch a patched
``get_orthogonal_matrix`` returning a random orthonormal basis of the same
shape (its exact SVD takes ~37 s at 4096x11008 on 2 cores and changes nothing
about the timed steps).

Reports median, min and max per candidate (ms), prints a table with ratios, and
appends it with machine, versions, load average and date to
benchmarks/results/cpu_bench.md (raw samples to cpu_bench.jsonl).

    python benchmarks/bench_cpu.py [--shapes 4096x4096 4096x11008] [--ranks 128 256] [--repeats 15]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from typing import Callable

import torch

import owlore_kernels
from owlore_kernels import ops
from owlore_kernels.ops.back_project_update import back_project_update_reference
from owlore_kernels.ops.project_adam import project_adam_reference

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
OUTLIER_M = 5.0  # OWL's outlier multiplier


def cpp_ops():
    """torch.ops.owlore, after loading the extension that registers it."""
    import owlore_kernels._C  # noqa: F401

    return torch.ops.owlore


def interleaved(candidates: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Time each candidate ``repeats`` times (ms), round-robin, rotating the order each round."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    names = list(candidates)
    samples: dict[str, list[float]] = {k: [] for k in names}
    for rep in range(repeats):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            start = time.perf_counter()
            candidates[name]()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return samples


def summary(ms: list[float]) -> dict[str, float]:
    return {"median": statistics.median(ms), "min": min(ms), "max": max(ms)}


def bench_outlier(shape: tuple[int, int], repeats: int) -> list[dict]:
    w = torch.randn(*shape)
    owlore = cpp_ops()
    candidates = {
        "cpp outlier_count": lambda: owlore.outlier_count([w], OUTLIER_M, [None]),
        "naive torch": lambda: (w.abs() > OUTLIER_M * w.abs().mean()).sum(),
    }
    cpp, naive = candidates["cpp outlier_count"](), candidates["naive torch"]()
    assert cpp[1] == int(naive), (cpp, naive)  # same answer before timing it
    samples = interleaved(candidates, repeats, warmup=2)
    return [row("outlier", shape, None, k, v, baseline=samples["naive torch"]) for k, v in samples.items()]


def patch_galore_refresh() -> None:
    """galore-torch's refresh -> a random orthonormal basis of the same shape (see module doc)."""
    from galore_torch.galore_projector import GaLoreProjector

    def random_basis(self, weights, rank, type):  # noqa: A002  (galore-torch's argument name)
        m, n = weights.shape
        gen = torch.Generator().manual_seed(0)
        if type == "left":
            return torch.linalg.qr(torch.randn(m, rank, generator=gen)).Q.to(weights.dtype)
        return torch.linalg.qr(torch.randn(n, rank, generator=gen)).Q.t().contiguous().to(weights.dtype)

    GaLoreProjector.get_orthogonal_matrix = random_basis


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
    samples = interleaved(candidates, repeats, warmup)
    rows = [row("step", shape, rank, k, v, baseline=samples["galore-torch"]) for k, v in samples.items()]
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
    args = (grad, proj, exp_avg, exp_avg_sq, out, side, 0.9, 0.999, 1e-6, 2)
    back = (w, proj, out, side, 1e-6, 0.01, 0.25)
    owlore = cpp_ops()
    candidates = {
        "cpp project_adam": lambda: owlore.project_adam_(*args),
        "torch project_adam": lambda: project_adam_reference(*args),
        "cpp back_project_update": lambda: owlore.back_project_update_(*back),
        "torch back_project_update": lambda: back_project_update_reference(*back),
    }
    samples = interleaved(candidates, repeats, warmup=2)
    rows = []
    for k, v in samples.items():
        base = samples["torch " + k.split(" ", 1)[1]]
        rows.append(row(f"op ({side})", shape, rank, k, v, baseline=base))
    return rows


def row(what: str, shape, rank, name: str, ms: list[float], baseline: list[float]) -> dict:
    s = summary(ms)
    return {"what": what, "shape": f"{shape[0]}x{shape[1]}", "rank": rank, "candidate": name, **s,
            "speedup_vs_baseline": statistics.median(baseline) / s["median"], "samples_ms": ms}


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import galore_torch  # noqa: F401

    from importlib.metadata import version
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "galore_torch": version("galore-torch"), "owlore_kernels": owlore_kernels.__version__,
        "backends": ops.backend_report()["cpu"],
        "commit": git_commit(),
        "loadavg_start": os.getloadavg()[0],
    }


def git_commit() -> str:
    """The checkout's commit, with "+dirty" if csrc/ or the ops differ from it (what was measured)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "csrc", "owlore_kernels/ops",
                               "owlore_kernels/optim.py", "owlore_kernels/projector.py"], cwd=root).returncode
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def table(rows: list[dict]) -> str:
    lines = ["| what | shape | rank | candidate | median ms | min–max ms | speedup vs baseline |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['what']} | {r['shape']} | {r['rank'] or '-'} | {r['candidate']} | {r['median']:.1f} | "
                     f"{r['min']:.1f}–{r['max']:.1f} | {r['speedup_vs_baseline']:.2f}× |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["4096x4096", "4096x11008"])
    parser.add_argument("--ranks", nargs="+", type=int, default=[128, 256])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3, help="optimizer steps before timing (the first refreshes)")
    parser.add_argument("--no-save", action="store_true", help="print only; append nothing to benchmarks/results")
    args = parser.parse_args()
    if ops.backend_report()["cpu"]["project_adam"] != "cpp":
        raise SystemExit(f"the C++ extension is not loaded: {ops.backend_report()['unavailable']}")
    torch.manual_seed(0)
    patch_galore_refresh()
    info = machine()
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
    info["loadavg_end"] = os.getloadavg()[0]

    baselines = ("outlier: baseline = naive torch; step: baseline = galore-torch GaLoreAdamW; "
                 "op: baseline = the torch reference of the same op")
    text = (f"\n## {info['date']} — {info['cpu']}, {info['cores']} cores, torch {info['torch']}, "
            f"galore-torch {info['galore_torch']}, owlore-kernels {info['owlore_kernels']} ({info['commit']})\n\n"
            f"`python benchmarks/bench_cpu.py --shapes {' '.join(args.shapes)} --ranks "
            f"{' '.join(map(str, args.ranks))} --repeats {args.repeats} --warmup {args.warmup}`; "
            f"load average {info['loadavg_start']:.1f} at start, {info['loadavg_end']:.1f} at end "
            f"(above {info['cores']} means other processes shared the cores). {baselines}.\n\n{table(rows)}\n")
    print(text)
    if not args.no_save:
        os.makedirs(RESULTS, exist_ok=True)
        with open(os.path.join(RESULTS, "cpu_bench.md"), "a") as f:
            f.write(text)
        with open(os.path.join(RESULTS, "cpu_bench.jsonl"), "a") as f:
            f.write(json.dumps({"machine": info, "rows": rows}) + "\n")


if __name__ == "__main__":
    main()
