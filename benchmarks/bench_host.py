"""Host cost per weight of a GaLore update on CPU: single-weight op calls, one foreach call, galore-torch.

One question: what does each small GaLore weight cost on the host when its math is negligible?
224 weights of 64 x 96 at rank 16 (side="left", 98K multiply-adds per GEMM), CPU, timed per step
and divided by 224:

* loop:           ``project_adam_`` then ``back_project_update_`` per weight, through the public
                  functions (their argument checks included), as a per-weight optimizer step makes them;
* foreach:        one ``project_adam_foreach_`` and one ``back_project_update_foreach_`` call for all 224
                  (the dispatcher's kernel: C++ where the extension is built);
* foreach-torch:  the same two calls forced to the pure-PyTorch reference;
* galore-torch:   ``GaLoreAdamW.step()`` over the same 224 weights (projection frozen, no refresh):
                  its per-weight step math and its Python loop;
* adamw-foreach / torch-adamw-foreach: the plain-param path for the same 224 weights,
                  ``adamw_foreach_`` against ``torch.optim.AdamW(foreach=True).step()``.

Medians of interleaved repeats (``time_interleaved``: the order rotates every round, so a noisy
neighbour slows all candidates alike). A second table times one single-weight ``project_adam_``
kernel call (no Python checks) at three sizes on 1 and 2 threads: the C++ kernels run a call
on one thread below ~1M multiply-adds per thread, so only the larger sizes split.
Prints the tables and appends them, with machine, versions and date, to
benchmarks/results/host_cost.md (samples in host_cost.jsonl).

    python benchmarks/bench_host.py [--weights 224] [--shape 64x96] [--rank 16] [--repeats 30] [--no-save]
"""
from __future__ import annotations

import argparse
import os

import torch

from owlore_kernels.bench.harness import append_results, machine_stamp, markdown_table, time_interleaved
from owlore_kernels.ops.adamw import adamw_foreach_
from owlore_kernels.ops.back_project_update import back_project_update_, back_project_update_foreach_
from owlore_kernels.ops.project_adam import project_adam_, project_adam_foreach_

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
BETAS = dict(beta1=0.9, beta2=0.999, eps=1e-6)


def galore_candidates(count: int, m: int, n: int, rank: int) -> dict:
    """The owlore-kernels candidates, each one step over ``count`` weights of m x n (left side)."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(m, n, generator=gen) for _ in range(count)]
    grads = [torch.randn(m, n, generator=gen) for _ in range(count)]
    projs = [torch.linalg.qr(torch.randn(m, rank, generator=gen)).Q for _ in range(count)]
    exp_avgs = [torch.zeros(rank, n) for _ in range(count)]
    exp_avg_sqs = [torch.zeros(rank, n) for _ in range(count)]
    outs = [torch.empty(rank, n) for _ in range(count)]
    bias_corrections = torch.tensor([[0.5, 0.25]] * count, dtype=torch.float64)
    coefficients = torch.tensor([[1.0 - 1e-5, -1e-4]] * count, dtype=torch.float64)

    def loop():
        for i in range(count):
            project_adam_(grads[i], projs[i], exp_avgs[i], exp_avg_sqs[i], out=outs[i], side="left",
                          bias_correction1=0.5, bias_correction2=0.25, **BETAS)
            back_project_update_(params[i], projs[i], outs[i], side="left", beta=1.0 - 1e-5, alpha=-1e-4)

    def foreach(backend=None):
        project_adam_foreach_(grads, projs, exp_avgs, exp_avg_sqs, outs, side="left",
                              bias_corrections=bias_corrections, backend=backend, **BETAS)
        back_project_update_foreach_(params, projs, outs, side="left", coefficients=coefficients, backend=backend)

    plain = [p.clone() for p in params]
    plain_m, plain_v = [torch.zeros_like(p) for p in plain], [torch.zeros_like(p) for p in plain]
    adamw_coefficients = torch.tensor([[-1e-4, 1.0 - 1e-5, 0.5]] * count, dtype=torch.float64)

    def adamw():
        adamw_foreach_(plain, grads, plain_m, plain_v, variant="torch", coefficients=adamw_coefficients, **BETAS)

    torch_plain = [torch.nn.Parameter(p.clone()) for p in params]
    for p, g in zip(torch_plain, grads):
        p.grad = g.clone()
    torch_adamw = torch.optim.AdamW(torch_plain, lr=1e-4, weight_decay=0.1, foreach=True)

    return {"loop": loop, "foreach": foreach, "foreach-torch": lambda: foreach("torch"), "adamw-foreach": adamw,
            "torch-adamw-foreach": torch_adamw.step}


def galore_torch_candidate(count: int, m: int, n: int, rank: int):
    """``GaLoreAdamW.step`` over ``count`` weights, after a first step that builds its projectors
    (with a frozen random basis instead of its SVD; update_proj_gap keeps the timed steps from refreshing)."""
    try:
        from galore_torch import GaLoreAdamW
    except ImportError:
        return None
    from owlore_kernels.bench.harness import frozen_galore_refresh

    gen = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(m, n, generator=gen)) for _ in range(count)]
    for p in params:
        p.grad = torch.randn(m, n, generator=gen)
    opt = GaLoreAdamW([{"params": params, "rank": rank, "update_proj_gap": 10**9, "scale": 0.25,
                        "proj_type": "std"}], lr=1e-4, weight_decay=0.1)
    with frozen_galore_refresh():
        opt.step()
    return opt.step


def thread_candidates(shapes) -> dict:
    """One project_adam_ kernel call (no Python checks) per shape, on 1 and on 2 threads."""
    out = {}
    for m, n, r in shapes:
        grad, proj = torch.randn(m, n), torch.linalg.qr(torch.randn(m, r)).Q
        exp_avg, exp_avg_sq, norm = torch.zeros(r, n), torch.zeros(r, n), torch.empty(r, n)
        for threads in (1, 2):
            def call(threads=threads, args=(grad, proj, exp_avg, exp_avg_sq, norm)):
                torch.set_num_threads(threads)
                torch.ops.owlore.project_adam_(*args, side="left", bias_correction1=0.5, bias_correction2=0.25,
                                               **BETAS)
            out[(m, n, r, threads)] = call
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--weights", type=int, default=224, help="GaLore weights per step")
    parser.add_argument("--shape", default="64x96", help="weight shape MxN (m <= n: side='left')")
    parser.add_argument("--rank", type=int, default=16, help="projection rank")
    parser.add_argument("--repeats", type=int, default=30, help="timed steps per candidate")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for the per-weight table (default: torch's); on a machine shared with "
                             "other jobs, 1 keeps the timings from waiting on a busy second core")
    parser.add_argument("--no-save", action="store_true", help="print only; append nothing to benchmarks/results")
    args = parser.parse_args()
    m, n = (int(x) for x in args.shape.split("x"))
    stamp = machine_stamp()
    default_threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

    candidates = galore_candidates(args.weights, m, n, args.rank)
    galore = galore_torch_candidate(args.weights, m, n, args.rank)
    if galore is not None:
        candidates["galore-torch"] = galore
    timings = time_interleaved(candidates, repeats=args.repeats, warmup=3)
    rows = [{"candidate": name, "weights": args.weights, "shape": [m, n], "rank": args.rank, "threads": threads,
             "us_per_weight": t.median * 1e3 / args.weights, **t.summary()} for name, t in timings.items()]
    loop_median = timings["loop"].median
    table = markdown_table(
        ["candidate", "us per weight (median)", "p10-p90 us", "vs loop"],
        [[r["candidate"], f"{r['us_per_weight']:.2f}",
          f"{r['p10'] * 1e3 / args.weights:.2f}-{r['p90'] * 1e3 / args.weights:.2f}",
          f"{loop_median / r['median']:.2f}x"] for r in rows])
    print(table)

    sizes = [(64, 96, 16), (256, 512, 16), (1024, 1024, 32)]
    thread_timings = time_interleaved({str(k): fn for k, fn in thread_candidates(sizes).items()},
                                      repeats=args.repeats, warmup=3)
    torch.set_num_threads(default_threads)
    thread_rows = []
    for m_, n_, r_ in sizes:
        one, two = thread_timings[str((m_, n_, r_, 1))], thread_timings[str((m_, n_, r_, 2))]
        thread_rows.append({"shape": [m_, n_], "rank": r_, "macs": m_ * n_ * r_, "one_thread": one.summary(),
                            "two_threads": two.summary()})
    thread_table = markdown_table(
        ["project_adam_ kernel", "multiply-adds", "1 thread ms", "2 threads ms", "1 / 2"],
        [[f"{r['shape'][0]}x{r['shape'][1]} r{r['rank']}", f"{r['macs'] / 1e6:.2f}M",
          f"{r['one_thread']['median']:.3f}", f"{r['two_threads']['median']:.3f}",
          f"{r['one_thread']['median'] / r['two_threads']['median']:.2f}"] for r in thread_rows])
    print(thread_table)
    if args.no_save:
        return
    command = ("python benchmarks/bench_host.py " + f"--weights {args.weights} --shape {args.shape} "
               f"--rank {args.rank} --repeats {args.repeats}"
               + (f" --threads {args.threads}" if args.threads is not None else ""))
    append_results(RESULTS, "host_cost", rows=rows + thread_rows, stamp=stamp, command=command,
                   notes=f"CPU, {threads} torch thread(s) for the first table; time per step over {args.weights} weights divided by "
                         f"{args.weights}. Ratios of candidates timed side by side are the result; absolute "
                         "times depend on the load.",
                   table=table + "\n\n" + thread_table)


if __name__ == "__main__":
    main()
