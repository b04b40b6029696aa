"""Command line: ``python -m owlore_kernels bench ...`` and ``python -m owlore_kernels estimate ...``.

``bench`` runs the end-to-end benchmark (see ``owlore_kernels.bench``); ``estimate`` traces a
training step of one or all methods on fake tensors and prints its memory peak and breakdown
(see ``owlore_kernels.estimate``). Bad flags are
argparse errors that name the flag and the value.
"""
from __future__ import annotations

import argparse
import inspect
import json
import sys
from typing import Optional, Sequence

from owlore_kernels.estimate import METHODS

# One spelling per option across the subcommands: --methods (comma-separated, or "all"),
# --seq-len, --rank, --lora-rank, --gamma, --batch, --dtype, --model.
FORMATTER = argparse.ArgumentDefaultsHelpFormatter


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {value}")
    return value


def _method_list(text: str) -> list[str]:
    names = [m.strip().lower() for m in text.split(",") if m.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected a comma-separated list of methods")
    if names == ["all"]:
        return list(METHODS)
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown method {unknown[0]!r} (choose from {', '.join(METHODS)})")
    return list(dict.fromkeys(names))


def _add_shared(p: argparse.ArgumentParser, d: dict) -> None:
    """The options both subcommands take, with the same names, types and meaning."""
    p.add_argument("--methods", type=_method_list, default=d["methods"],
                   help=f"comma-separated subset of {','.join(METHODS)}, or all")
    p.add_argument("--gamma", type=_positive_int, default=d["gamma"], help="blocks sampled by LISA/OwLore")
    p.add_argument("--rank", type=_positive_int, default=d["rank"], help="GaLore/OwLore projection rank")
    p.add_argument("--lora-rank", type=_positive_int, default=d["lora_rank"], help="LoRA rank")
    p.add_argument("--batch", type=_positive_int, default=d["batch"], help="sequences per step")
    p.add_argument("--seq-len", type=_positive_int, default=d["seq_len"], help="tokens per sequence")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute each block in backward")
    p.add_argument("--offload-checkpoints", action="store_true",
                   help="with --grad-checkpointing: hold each checkpointed block's inputs in pinned host memory "
                        "until its recompute (transformers' activation_checkpointing_enable(offload=True); GPU "
                        "only, the estimate counts them as host memory)")
    p.add_argument("--chunked-loss", action="store_true",
                   help="owlore_kernels.losses: the loss a chunk of tokens at a time, never full-vocabulary logits "
                        "for the whole batch")
    p.add_argument("--chunk-size", type=_positive_int, default=None,
                   help="tokens per chunk of --chunked-loss (default: owlore_kernels.losses.DEFAULT_CHUNK_SIZE)")
    p.add_argument("--in-backward", action="store_true",
                   help="step each parameter inside backward and free its gradient at once")


def _bench_parser(sub) -> argparse.ArgumentParser:
    from owlore_kernels.bench.driver import DEFAULTS as D

    p = sub.add_parser("bench", help="run the end-to-end fine-tuning benchmark", formatter_class=FORMATTER,
                       description="Fine-tune with full AdamW, LoRA, GaLore, LISA and OwLore on the same data; "
                                   "report memory, throughput and loss.")
    p.add_argument("--model", default=D["model"],
                   help="smollm2 (SmolLM2-135M-Instruct), tiny (random-init, for tests), a built-in config "
                        "(llama2-7b, llama3-8b, mistral-7b: random-init, built in each worker on the device), a "
                        "config.json file (the same) or a path to an HF model folder")
    _add_shared(p, D)
    p.add_argument("--steps", type=_positive_int, default=D["steps"], help="optimizer steps per method (>= 2)")
    p.add_argument("--eval-seqs", type=_positive_int, default=D["eval_seqs"], help="held-out sequences")
    p.add_argument("--lr", type=_positive_float, default=D["lr"], help="peak learning rate (all methods)")
    p.add_argument("--interval", type=_positive_int, default=D["interval"], help="steps between resamples")
    p.add_argument("--update-proj-gap", type=_positive_int, default=D["update_proj_gap"],
                   help="steps between projection refreshes (GaLore, OwLore)")
    p.add_argument("--galore-scale", type=_positive_float, default=D["galore_scale"],
                   help="scale of the galore method (galore-torch's default)")
    p.add_argument("--owlore-scale", type=_positive_float, default=D["owlore_scale"],
                   help="GaLore scale inside the owlore method (the OwLore paper's reference run)")
    p.add_argument("--proj-method", choices=("svd", "randomized"), default=D["proj_method"],
                   help="OwLore's projection refresh")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=D["device"],
                   help="auto: cuda when available")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=D["dtype"], help="weight dtype")
    p.add_argument("--seed", type=int, default=D["seed"], help="model init, data and sampling seed")
    p.add_argument("--no-trace", dest="trace", action="store_false",
                   help="skip the traced peak (owlore_kernels.estimate) printed beside the measured one")
    p.add_argument("--out", default=D["out"], help="folder for bench_<model>_<date>.json/.md/.png; a later run on "
                                                   "the same day writes bench_<model>_<date>_2.* and so on")
    p.add_argument("--_worker", metavar="SPEC", default=None, help=argparse.SUPPRESS)
    return p


def _estimate_parser(sub) -> argparse.ArgumentParser:
    from owlore_kernels.estimate import estimate_memory

    # the command line's defaults are estimate_memory's own
    D = {name: p.default for name, p in inspect.signature(estimate_memory).parameters.items()}
    D["methods"] = D["method"]
    p = sub.add_parser("estimate", help="trace a training step on fake tensors and print its memory peak",
                       formatter_class=FORMATTER,
                       description="Trace two training steps of the model (the bench's methods, on fake tensors: "
                                   "nothing is allocated) and print the peak, its phase and the bytes of weights, "
                                   "gradients, optimizer state, projections, activations and temporaries there.")
    p.add_argument("--model", default=D["model"],
                   help="llama2-7b, llama3-8b, mistral-7b, smollm2-135m or a path to an HF config.json (or folder)")
    _add_shared(p, D)
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=D["dtype"], help="weight dtype")
    p.add_argument("--state-dtype", choices=("bf16", "fp16", "fp32"), default=None,
                   help="OwLoreAdamW's moment dtype (lisa, owlore); None: fp32")
    p.add_argument("--proj-method", choices=("svd", "randomized"), default=D["proj_method"],
                   help="OwLore's projection refresh")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def _run_estimate(args, parser) -> int:
    from owlore_kernels.estimate import config_name, estimate_memory, model_config, num_blocks

    try:
        config = model_config(args.model)
    except (ValueError, OSError) as exc:
        parser.error(f"argument --model: {exc}")
    name, blocks = config_name(config), num_blocks(config)
    if args.gamma > blocks and {"lisa", "owlore"} & set(args.methods):
        parser.error(f"argument --gamma: must be <= {blocks} (blocks of {name}), got {args.gamma}")
    hidden = config.get_text_config().hidden_size
    if args.rank > hidden and {"galore", "owlore"} & set(args.methods):
        parser.error(f"argument --rank: must be in [1, {hidden}] (the hidden size of {name}), got {args.rank}")
    if args.offload_checkpoints and not args.grad_checkpointing:
        parser.error("argument --offload-checkpoints: offloads the inputs of checkpointed blocks; add "
                     "--grad-checkpointing")
    if args.state_dtype and set(args.methods) - {"lisa", "owlore"}:
        parser.error(f"argument --state-dtype: {args.state_dtype} is an OwLoreAdamW option: use it with "
                     "--methods lisa,owlore")
    estimates = [estimate_memory(config, m, gamma=args.gamma, rank=args.rank, lora_rank=args.lora_rank,
                                 batch=args.batch, seq_len=args.seq_len, dtype=args.dtype,
                                 grad_checkpointing=args.grad_checkpointing,
                                 offload_checkpoints=args.offload_checkpoints, chunked_loss=args.chunked_loss,
                                 chunk_size=args.chunk_size, in_backward=args.in_backward,
                                 state_dtype=args.state_dtype, proj_method=args.proj_method) for m in args.methods]
    if args.json:
        print(json.dumps([e.to_dict() for e in estimates], indent=1))
    else:
        print("\n\n".join(e.table() for e in estimates))
    return 0


def _run_bench(args, parser) -> int:
    if args._worker:
        from owlore_kernels.bench.worker import run_worker

        return run_worker(args._worker)
    from owlore_kernels.bench.driver import model_config_dict, run_bench

    if args.steps < 2:
        parser.error(f"argument --steps: must be >= 2 (one warm-up step, then measured steps), got {args.steps}")
    try:
        config = model_config_dict(args.model)
    except ValueError as exc:
        parser.error(f"argument --model: {exc}")
    if config is None:
        parser.error(f"argument --model: unknown model {args.model!r} (expected smollm2, tiny or a path to an "
                     "HF model folder with a config.json)")
    layers, hidden = config.get("num_hidden_layers"), config.get("hidden_size")
    if layers and args.gamma > layers:
        parser.error(f"argument --gamma: must be in [1, {layers}] (blocks of model {args.model!r}), got {args.gamma}")
    if hidden and args.rank > hidden:
        parser.error(f"argument --rank: must be in [1, {hidden}] (hidden size of model {args.model!r}), got {args.rank}")
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: 'cuda' requested but torch.cuda.is_available() is False")
    if args.offload_checkpoints and not args.grad_checkpointing:
        parser.error("argument --offload-checkpoints: offloads the inputs of checkpointed blocks; add "
                     "--grad-checkpointing")
    if args.offload_checkpoints and args.device != "cuda":
        parser.error(f"argument --offload-checkpoints: moves activations from the GPU to pinned host memory; with "
                     f"--device {args.device} they are in host memory already")
    cfg = {k: v for k, v in vars(args).items() if k not in ("command", "_worker")}
    report = run_bench(cfg, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    from owlore_kernels.bench.report import text_table

    print(f"\n{report['meta']['model_name']}: {report['meta']['model_source']}")
    print(text_table(report["results"]))
    print(f"\nwall time {report['meta']['wall_s']:.0f} s; wrote " + ", ".join(v for v in report["files"].values() if v))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m owlore_kernels", formatter_class=FORMATTER,
                                     description="owlore-kernels: benchmark and memory estimator")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = _bench_parser(sub)
    estimate = _estimate_parser(sub)
    from owlore_kernels import study as study_cli

    study = study_cli.add_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "study":
        return study_cli.run_cli(args, study)
    if args.command == "bench":
        return _run_bench(args, bench)
    return _run_estimate(args, estimate)


if __name__ == "__main__":
    sys.exit(main())
