"""7B memory from the traced training step: every figure the README gives for LLaMA-2-7B.

One question: what does one training step of LLaMA-2-7B need at its peak, per method, and what
do the chunked loss, in-backward steps and bf16 Adam moments take off OwLore's? Each row is
``owlore_kernels.estimate_memory`` (two steps traced on fake tensors; nothing is allocated), so
the figures are *traced*, not measured; the GPU measurements they are checked against are given
in the README. The CPU seconds of each trace are recorded too (the estimator's cost).

Sets (``--sets``):

* ``methods``: the five methods at the OwLore paper's reference run (gamma 5, rank 256, batch
  16 x 512 tokens, bf16, gradient checkpointing; OwLore's refresh randomized);
* ``owlore``: OwLore there with each combination of chunked loss, in-backward steps, bf16
  moments (``state_dtype="bf16"``: ``OwLoreAdamW(state_dtype=torch.bfloat16)``, traced) and the
  checkpointed blocks' inputs offloaded to host memory (``offload_checkpoints``: transformers'
  ``activation_checkpointing_enable(offload=True)``; their host bytes are a column of their own);
* ``galore-paper``: full AdamW at batch 1 x 256 tokens, bf16, no checkpointing (the GaLore
  paper's "58 GB" setting).

    python benchmarks/estimate_7b.py [--sets methods owlore galore-paper] [--no-save]
"""
from __future__ import annotations

import argparse
import itertools
import os
import time

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
GiB = 2**30
REFERENCE = dict(gamma=5, rank=256, batch=16, seq_len=512, dtype="bf16", grad_checkpointing=True,
                 proj_method="randomized")
METHODS = ("full", "lora", "galore", "lisa", "owlore")


def runs(sets):
    """(set, method, options) of every trace asked for."""
    if "methods" in sets:
        for method in METHODS:
            yield "methods", method, dict(REFERENCE)
    if "owlore" in sets:
        for offload, chunked, in_backward, bf16 in itertools.product((False, True), repeat=4):
            if offload or chunked or in_backward or bf16:  # the plain run is in "methods"
                yield "owlore", "owlore", dict(REFERENCE, chunked_loss=chunked, in_backward=in_backward,
                                               state_dtype="bf16" if bf16 else None, offload_checkpoints=offload)
    if "galore-paper" in sets:
        yield "galore-paper", "full", dict(REFERENCE, batch=1, seq_len=256, grad_checkpointing=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="+", default=["methods", "owlore", "galore-paper"],
                        choices=["methods", "owlore", "galore-paper"])
    parser.add_argument("--model", default="llama2-7b")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()

    from owlore_kernels.bench.harness import append_results, machine_stamp, markdown_table
    from owlore_kernels.estimate import estimate_memory

    stamp = machine_stamp()
    rows = []
    for which, method, options in runs(args.sets):
        cpu, wall = time.process_time(), time.perf_counter()
        est = estimate_memory(args.model, method, **options)
        row = dict(set=which, method=method, **options, peak=est.peak, phase=est.phase,
                   **{c: getattr(est, c) for c in est.COMPONENTS}, host=est.host, accounted=est.accounted,
                   phase_peaks=est.phase_peaks, notes=est.notes, cpu_s=time.process_time() - cpu,
                   wall_s=time.perf_counter() - wall)
        rows.append(row)
        print(f"{which:<13} {method:<7} chunked={options.get('chunked_loss', False)!s:<5} "
              f"in_backward={options.get('in_backward', False)!s:<5} state={options.get('state_dtype') or 'fp32':<5} "
              f"offload={options.get('offload_checkpoints', False)!s:<5} "
              f"peak {est.peak / GiB:6.2f} GiB ({est.phase}); cpu {row['cpu_s']:.0f} s", flush=True)
    headers = ["set", "method", "chunked loss", "in-backward", "moments", "offload", "batch x seq", "peak GiB",
               "phase", "weights", "grads", "state", "proj", "activations+tmp", "host GiB", "CPU s"]
    table = markdown_table(headers, [[
        r["set"], r["method"], "yes" if r.get("chunked_loss") else "", "yes" if r.get("in_backward") else "",
        r.get("state_dtype") or "fp32", "yes" if r.get("offload_checkpoints") else "", f"{r['batch']} x {r['seq_len']}",
        f"{r['peak'] / GiB:.2f}", r["phase"],
        *(f"{r[c] / GiB:.2f}" for c in ("weights", "gradients", "optimizer_state", "projection", "activations")),
        f"{r['host'] / GiB:.2f}", f"{r['cpu_s']:.0f}"] for r in rows])
    print(table)
    if not args.no_save:
        append_results(RESULTS, "estimate_7b", rows=rows, stamp=stamp, table=table,
                       command="python benchmarks/estimate_7b.py --sets " + " ".join(args.sets),
                       notes=f"{args.model}; traced on fake tensors (owlore_kernels.estimate_memory), GiB = 2^30 B, "
                             "at the peak of two training steps.")


if __name__ == "__main__":
    main()
