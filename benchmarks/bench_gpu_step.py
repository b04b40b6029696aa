"""GPU: one optimizer step of LLaMA-2-7B, OwLoreAdamW against galore-torch and fused torch AdamW.

A random-init LLaMA-2-7B (``transformers.LlamaConfig``, built on the device in bf16, nothing
downloaded; 32 blocks of 7 linears, 6.7 B parameters) with fixed random bf16 gradients, so only
the optimizer is timed. Two scenarios:

* ``all-layer``: GaLore on all 224 block linears (rank 256, ``proj_type="std"``, scale 0.25),
  the embedding, head and norms plain AdamW; every parameter has a gradient.
* ``owlore``: OwLore's active subset, ``gamma`` = 5 blocks (drawn with a seeded generator: the
  step's cost does not depend on which) with gradients, their 35 linears in the GaLore group,
  plus the always-trained embedding, head and norms; the other blocks have no gradient.

Candidates, one after another on the same weights (values do not change the cost; lr 1e-6):
OwLoreAdamW (``proj_method="randomized"``, backend auto: Triton on CUDA), galore-torch's
``GaLoreAdamW`` (same groups; its first step's exact SVD replaced by a random orthonormal basis,
``harness.frozen_galore_refresh``, else 224 SVDs take minutes) and ``torch.optim.AdamW(fused=True)``
full rank on the same parameters. ``update_proj_gap`` is 10**9, so only the first step refreshes.

Reported per candidate: the first step (state allocation, the refresh, Triton's compile) in
seconds by the wall clock after ``torch.cuda.synchronize()``; the steady step's median and
p10-p90 over ``--steps`` steps (CUDA events via ``harness.time_interleaved``; perf_counter on
CPU); the peak memory (``torch.cuda.max_memory_allocated``, from the optimizer's construction
to its last step) and that peak above the weights and gradients. Results are printed and
appended with the machine stamp to ``benchmarks/results/gpu_step.md`` (``gpu_step_tiny`` with
``--tiny``) and a pytest-benchmark saved run beside it.

    python benchmarks/bench_gpu_step.py                        # one H200: ~2-3 minutes
    python benchmarks/bench_gpu_step.py --tiny --device cpu    # the same code, a tiny LLaMA, seconds
"""
from __future__ import annotations

import argparse
import gc
import os
import time

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
OPTIMIZERS = ("owlore", "galore-torch", "adamw-fused")
SCENARIOS = ("all-layer", "owlore")
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
LR = 1e-6  # small, so repeated steps leave the weights in range
# LLaMA-2-7B (meta-llama/Llama-2-7b-hf's config.json) and a tiny LLaMA of the same layout
LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=128)
LINEARS_PER_BLOCK = 7  # q, k, v, o, gate, up, down


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda or cpu (cpu: only sensible with --tiny)")
    p.add_argument("--tiny", action="store_true", help="a tiny LLaMA (hidden 64, 4 blocks) instead of LLaMA-2-7B")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="weights and gradients")
    p.add_argument("--rank", type=int, default=None, help="GaLore rank (default 256; 8 with --tiny)")
    p.add_argument("--gamma", type=int, default=None, help="active blocks in the owlore scenario (default 5; 2 with --tiny)")
    p.add_argument("--steps", type=int, default=10, help="timed steady steps per candidate")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after the first, per candidate")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma list of {SCENARIOS}")
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS), help=f"comma list of {OPTIMIZERS}")
    p.add_argument("--seed", type=int, default=0, help="seeds the weights, gradients and the active blocks")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--no-save", action="store_true", help="print only; append nothing")
    args = p.parse_args(argv)
    args.rank = args.rank or (8 if args.tiny else 256)
    args.gamma = args.gamma or (2 if args.tiny else 5)
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    args.optimizers = [s.strip() for s in args.optimizers.split(",") if s.strip()]
    for name, given, allowed in (("--scenarios", args.scenarios, SCENARIOS), ("--optimizers", args.optimizers,
                                                                              OPTIMIZERS)):
        bad = [x for x in given if x not in allowed]
        if bad or not given:
            p.error(f"{name} must be a comma list of {allowed}, got {bad or given}")
    if args.steps < 1 or args.warmup < 0:
        p.error(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
    return args


def build_model(tiny: bool, device, dtype, seed: int):
    """LLaMA-2-7B's (or the tiny) architecture, random init, built directly on ``device`` in ``dtype``."""
    import torch
    import transformers

    cfg = transformers.LlamaConfig(**(TINY if tiny else LLAMA2_7B))
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # no fp32 copy of 6.7 B parameters on the way
    try:
        with torch.device(device):
            model = transformers.LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    return model


def block_of(name: str):
    """The decoder block index of a parameter name, or None outside the blocks."""
    return int(name.split(".layers.")[1].split(".")[0]) if ".layers." in name else None


def scenario_params(model, scenario: str, gamma: int, seed: int):
    """(GaLore linears, other params, names with a gradient) for ``scenario``."""
    import torch

    named = list(model.named_parameters())
    blocks = model.config.num_hidden_layers
    if scenario == "all-layer":
        active = set(range(blocks))
    else:
        order = torch.randperm(blocks, generator=torch.Generator().manual_seed(seed)).tolist()
        active = set(order[:gamma])
    linears = [p for name, p in named if block_of(name) is not None and p.dim() == 2]
    rest = [p for name, p in named if not (block_of(name) is not None and p.dim() == 2)]
    with_grad = {name for name, _ in named if block_of(name) is None or block_of(name) in active}
    if scenario == "all-layer" and len(linears) != LINEARS_PER_BLOCK * blocks:
        raise RuntimeError(f"expected {LINEARS_PER_BLOCK * blocks} block linears, found {len(linears)}")
    return linears, rest, with_grad, sorted(active)


def make_optimizer(kind: str, linears, rest, rank: int):
    import torch

    groups = [{"params": rest}, {"params": linears, "rank": rank, "update_proj_gap": 10**9, "scale": 0.25,
                                 "proj_type": "std"}]
    if kind == "owlore":
        from owlore_kernels import OwLoreAdamW

        return OwLoreAdamW(groups, lr=LR, proj_method="randomized")
    if kind == "galore-torch":
        from galore_torch import GaLoreAdamW

        return GaLoreAdamW(groups, lr=LR, no_deprecation_warning=True)
    return torch.optim.AdamW(rest + linears, lr=LR, fused=True)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_candidate(kind: str, model, grads, scenario: str, args, device) -> dict:
    """First step, steady steps and peak memory of one optimizer in one scenario."""
    import torch

    from owlore_kernels.bench.harness import frozen_galore_refresh, time_interleaved

    linears, rest, with_grad, active = scenario_params(model, scenario, args.gamma, args.seed)
    for name, p in model.named_parameters():
        p.grad = grads[name] if name in with_grad else None
    on_cuda = device.type == "cuda"
    gc.collect()
    if on_cuda:
        torch.cuda.empty_cache()
        sync(device)
        resident = torch.cuda.memory_allocated(device)  # weights + gradients
        torch.cuda.reset_peak_memory_stats(device)
    opt = make_optimizer(kind, linears, rest, args.rank)
    with frozen_galore_refresh(seed=args.seed):
        t0 = time.perf_counter()
        opt.step()
        sync(device)
        first_s = time.perf_counter() - t0
    timing = time_interleaved({kind: opt.step}, repeats=args.steps, warmup=args.warmup, device=device)[kind]
    peak = torch.cuda.max_memory_allocated(device) if on_cuda else None
    del opt
    for p in model.parameters():
        p.grad = None
    gc.collect()
    trained = sum(p.numel() for name, p in model.named_parameters() if name in with_grad)
    return dict(scenario=scenario, optimizer=kind, active_blocks=active, trained_params=trained,
                galore_weights=sum(1 for name, p in model.named_parameters()
                                   if name in with_grad and block_of(name) is not None and p.dim() == 2),
                first_step_s=first_s, **timing.summary(), peak_bytes=peak,
                peak_above_weights_grads_bytes=None if peak is None else peak - resident, timing=timing)


def table(rows) -> str:
    from owlore_kernels.bench.harness import markdown_table

    def gib(x):
        return "n/a" if x is None else f"{x / 2**30:.1f}"

    base = {r["scenario"]: r["median"] for r in rows if r["optimizer"] == "galore-torch"}
    return markdown_table(
        ["scenario", "optimizer", "GaLore weights", "trained params", "first step s", "step median ms",
         "p10–p90 ms", "speed-up vs galore-torch", "peak GiB", "peak above W+G GiB"],
        [[r["scenario"], r["optimizer"], r["galore_weights"], f"{r['trained_params'] / 1e6:.1f} M",
          f"{r['first_step_s']:.2f}", f"{r['median']:.2f}", f"{r['p10']:.2f}–{r['p90']:.2f}",
          f"{base[r['scenario']] / r['median']:.2f}×" if r["scenario"] in base else "-",
          gib(r["peak_bytes"]), gib(r["peak_above_weights_grads_bytes"])] for r in rows])


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from owlore_kernels.bench.harness import append_results, benchmark_entry, machine_stamp, stamp_line

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_gpu_step: no CUDA device; use --tiny --device cpu to run the same code on CPU")
    dtype = getattr(torch, DTYPES[args.dtype])
    skipped = ""
    if "galore-torch" in args.optimizers:
        try:
            import galore_torch  # noqa: F401
        except Exception as exc:  # not installed on every GPU machine: say so, time the others
            skipped = f"galore-torch skipped: galore_torch does not import ({type(exc).__name__}: {exc}). "
            args.optimizers = [o for o in args.optimizers if o != "galore-torch"]
            print(skipped, flush=True)
            if not args.optimizers:
                raise SystemExit("bench_gpu_step: " + skipped + "and no other optimizer was asked for")
    stamp = machine_stamp()
    print(stamp_line(stamp), flush=True)
    t0 = time.perf_counter()
    model = build_model(args.tiny, device, dtype, args.seed)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    grads = {name: (torch.randn(p.shape, generator=gen, device=device, dtype=dtype) * 1e-3)
             for name, p in model.named_parameters()}
    sync(device)
    print(f"model {'tiny' if args.tiny else 'LLaMA-2-7B'}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B "
          f"params, {args.dtype}, on {device}, built with gradients in {time.perf_counter() - t0:.1f} s", flush=True)

    rows = []
    for scenario in args.scenarios:
        for kind in args.optimizers:
            rows.append(run_candidate(kind, model, grads, scenario, args, device))
            r = rows[-1]
            print(f"{scenario:>9} {kind:<12} first {r['first_step_s']:.2f} s, median {r['median']:.2f} ms "
                  f"(p10-p90 {r['p10']:.2f}-{r['p90']:.2f})", flush=True)
    print(table(rows))
    if not args.no_save:
        name = "gpu_step_tiny" if args.tiny else "gpu_step"
        command = ("python benchmarks/bench_gpu_step.py" + (" --tiny" if args.tiny else "")
                   + f" --device {args.device} --dtype {args.dtype} --rank {args.rank} --gamma {args.gamma}"
                   f" --steps {args.steps} --warmup {args.warmup}")
        notes = skipped + ("galore-torch's first step uses a random orthonormal basis in place of its exact SVD; "
                 "OwLore's first step runs its randomized range finder. Peak memory from each optimizer's "
                 "construction to its last step.")
        paths = append_results(
            args.out or RESULTS, name, rows=[{k: v for k, v in r.items() if k != "timing"} for r in rows],
            stamp=stamp, table=table(rows), command=command, notes=notes,
            benchmarks=[benchmark_entry(f"step {r['scenario']}", r["optimizer"], r["timing"],
                                        params={"rank": args.rank, "dtype": args.dtype}) for r in rows])
        print("appended to", ", ".join(paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
