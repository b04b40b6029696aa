"""Does compiling OwLoreAdamW.step pay, and does it stay compiled?

One OwLore step at SmolLM2-135M's shapes (random init: the step's cost does not depend on the
values): 30 decoder blocks (hidden 576, MLP 1536, 9 query and 3 key/value heads), 5 of them
active with their 7 linears in a GaLore group (rank 128, std projection), the tied 49152 x 576
embedding and the final norm plain AdamW, the other blocks frozen (no gradient). Gradients are
fixed random tensors, so only the optimizer is timed.

Candidates, interleaved repeat by repeat: ``opt.step()`` eagerly and ``torch.compile(opt.step)``
(inductor), each on its own copy of the model. Reported: the first compiled call (the
compile), the median step time of both, and how many times dynamo compiled over the timed
steps, which cross subspace refreshes (``update_proj_gap`` 3) and move the gradients to 5
other blocks halfway, as the sampler does. Results go to benchmarks/results/compile_bench.md.

    python benchmarks/bench_compile.py [--repeats 10] [--warmup 3] [--no-save]
"""
from __future__ import annotations

import argparse
import copy
import os
import time

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
ACTIVE = ([0, 6, 12, 18, 24], [3, 9, 15, 21, 27])  # the first half of the steps, then the second


def build(seed: int = 0):
    """SmolLM2-135M's architecture, random init, fp32."""
    import torch
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                                   max_position_embeddings=2048)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg)


def optimizer_for(model):
    from owlore_kernels import OwLoreAdamW

    linears = [p for name, p in model.named_parameters() if ".layers." in name and p.dim() == 2]
    rest = [p for name, p in model.named_parameters() if ".layers." not in name]
    norms = [p for name, p in model.named_parameters() if ".layers." in name and p.dim() == 1]
    return OwLoreAdamW([{"params": rest + norms}, {"params": linears, "rank": 128, "update_proj_gap": 3,
                                                    "scale": 0.25, "proj_type": "std"}],
                       lr=1e-4, proj_method="randomized")


def gradients(model, blocks, seed):
    """Fixed gradients for the always-trained params and the given blocks; None elsewhere."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    grads = {}
    for name, p in model.named_parameters():
        in_block = ".layers." in name
        if not in_block or int(name.split(".layers.")[1].split(".")[0]) in blocks:
            grads[name] = torch.randn(p.shape, generator=gen) * 1e-3
    return grads


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per candidate (split over 2 block sets)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per block set first")
    parser.add_argument("--no-save", action="store_true", help="print only; append nothing to benchmarks/results")
    args = parser.parse_args(argv)
    if args.repeats < 2 or args.warmup < 0:
        parser.error(f"--repeats must be >= 2 and --warmup >= 0, got {args.repeats} and {args.warmup}")

    import torch
    import torch._dynamo.testing

    from owlore_kernels.bench.harness import (Timing, append_results, benchmark_entry, machine_stamp, markdown_table,
                                              stamp_line, time_interleaved)

    stamp = machine_stamp()
    print(stamp_line(stamp))
    eager_model = build()
    compiled_model = copy.deepcopy(eager_model)
    eager_opt, compiled_opt = optimizer_for(eager_model), optimizer_for(compiled_model)
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled_step = torch.compile(compiled_opt.step, backend=counter)

    def set_grads(model, grads):
        for name, p in model.named_parameters():
            p.grad = grads.get(name)

    timings, compile_s, frames = {}, None, []
    for half, blocks in enumerate(ACTIVE):
        grads = gradients(eager_model, blocks, seed=half)
        set_grads(eager_model, grads)
        set_grads(compiled_model, grads)
        if half == 0:
            t0 = time.perf_counter()
            compiled_step()  # the compile
            compile_s = time.perf_counter() - t0
            eager_opt.step()
        frames.append(counter.frame_count)
        part = time_interleaved({"eager": eager_opt.step, "compiled": compiled_step},
                                repeats=args.repeats // 2, warmup=args.warmup)
        frames.append(counter.frame_count)
        for name, timing in part.items():
            timings.setdefault(name, Timing()).samples_ms.extend(timing.samples_ms)
    drift = max((a - b).abs().max().item() for a, b in zip(eager_model.parameters(), compiled_model.parameters()))

    rows = [{"candidate": name, **t.summary(), "speedup_vs_eager": timings["eager"].median / t.median}
            for name, t in timings.items()]
    table = markdown_table(
        ["candidate", "median ms", "p10–p90 ms", "min–max ms", "speedup vs eager"],
        [[r["candidate"], f"{r['median']:.1f}", f"{r['p10']:.1f}–{r['p90']:.1f}", f"{r['min']:.1f}–{r['max']:.1f}",
          f"{r['speedup_vs_eager']:.2f}×"] for r in rows])
    notes = (f"First compiled call (the compile): {compile_s:.1f} s. Dynamo frame compiles, before and after the "
             f"timed steps of each block set: {frames} (one graph for the whole run if they never grow). "
             f"Largest |W_compiled - W_eager| after all steps: {drift:.2e}.")
    print(table)
    print(notes)
    if not args.no_save:
        paths = append_results(RESULTS, "compile_bench", rows=rows, stamp=stamp, table=table, notes=notes,
                               command="python benchmarks/bench_compile.py",
                               benchmarks=[benchmark_entry("OwLoreAdamW.step SmolLM2-135M", name, t)
                                           for name, t in timings.items()])
        print("appended to", ", ".join(paths))


if __name__ == "__main__":
    main()
