"""One method's run, in its own process (``python -m owlore_kernels bench --_worker SPEC``).

A separate process per method makes the peak RSS (``ru_maxrss``) that method's alone. The
worker prints ``@@step <i> <loss>`` lines for the parent's progress bar and writes its result
as JSON to ``spec["result_path"]``; a failure is a result too (``status: "failed"``).
"""
from __future__ import annotations

import json
import math
import os
import resource
import statistics
import sys
import time
import traceback
from typing import Any

import torch

from . import methods
from .data import answer_accuracy
from .harness import quantile


def _rss_now() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux
        return 0


def _peak_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes


def lr_factor(step: int, steps: int) -> float:
    """Linear warm-up over the first 10% of steps (at least one), then cosine decay to 10%."""
    warmup = max(1, steps // 10)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model, split: dict[str, torch.Tensor], batch: int, device: torch.device) -> tuple[float, float]:
    """(mean answer-token loss, exact-answer accuracy) on the held-out split, teacher forced."""
    was_training = model.training
    model.eval()
    total_loss = total_tokens = correct = examples = 0
    for start in range(0, split["input_ids"].shape[0], batch):
        ids = split["input_ids"][start:start + batch].to(device)
        labels = split["labels"][start:start + batch].to(device)
        out = model(input_ids=ids, labels=labels)
        tokens = int((labels[:, 1:] != -100).sum())
        total_loss += float(out.loss) * tokens
        total_tokens += tokens
        c, n = answer_accuracy(out.logits.float().cpu(), ids.cpu(), split["example_ids"][start:start + batch])
        correct += c
        examples += n
    model.train(was_training)
    return total_loss / max(1, total_tokens), correct / max(1, examples)


def train(spec: dict[str, Any]) -> dict[str, Any]:
    cfg = spec["cfg"]
    method = spec["method"]
    device = torch.device(cfg["device"])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg["dtype"]]
    torch.manual_seed(cfg["seed"])
    from transformers import AutoConfig, AutoModelForCausalLM

    if spec.get("config") is not None:  # random init of a config (e.g. llama2-7b), built on the device in dtype
        config = dict(spec["config"])
        config = AutoConfig.for_model(config.pop("model_type", "llama"), **config)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=dtype).to(device)
    methods.prepare_model(model, cfg)
    data = torch.load(spec["data_path"], weights_only=True)
    train_ids, train_labels = data["train_input_ids"], data["train_labels"]
    held = {k[len("eval_"):]: v for k, v in data.items() if k.startswith("eval_")}
    rss_after_load = _rss_now()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    eval_loss_before, eval_acc_before = evaluate(model, held, cfg["batch"], device)
    setup = methods.build(method, model, cfg)
    if cfg.get("in_backward"):
        methods.enable_in_backward(setup)
    model, opt, sampler = setup.model, setup.optimizer, setup.sampler
    model.train()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg["steps"]))
    p_bytes = methods.param_bytes(model)
    steps, batch = cfg["steps"], cfg["batch"]
    tokens_per_step = batch * cfg["seq_len"]
    losses, step_times, active = [], [], []
    peak = dict(trainable=0, grads=0, state=0, projection=0, accounted=0)
    last: dict[str, int] = {}
    for step in range(steps):
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        ids = train_ids[step * batch:(step + 1) * batch].to(device)
        labels = train_labels[step * batch:(step + 1) * batch].to(device)
        loss = methods.train_step(setup, ids, labels, cfg)
        sched.step()
        sync()
        t1 = time.perf_counter()
        # Accounting at the moment of the step's peak: gradients still alive, state just grown.
        g = methods.grad_bytes(model)
        per_optimizer = [methods.state_bytes(o) for o in setup.optimizers()]  # (moments, projections)
        moments, proj = sum(s[0] for s in per_optimizer), sum(s[1] for s in per_optimizer)
        last = dict(trainable=methods.trainable_params(model), grads=g, state=moments, projection=proj,
                    accounted=p_bytes + g + moments + proj)
        for k, v in last.items():
            peak[k] = max(peak[k], v)
        if sampler is not None:
            active.append(list(sampler.active_layers))
        t2 = time.perf_counter()
        for o in setup.optimizers():
            o.zero_grad(set_to_none=True)
        step_times.append(t1 - t0 + (time.perf_counter() - t2))
        losses.append(float(loss))
        print(f"@@step {step} {losses[-1]:.6f}", flush=True)

    eval_loss, eval_acc = evaluate(model, held, batch, device)
    measured = step_times[1:] if len(step_times) > 1 else step_times  # step 0 is the warm-up
    tps = [tokens_per_step / t for t in measured]
    result = dict(
        library=setup.library,
        trainable_params=peak["trainable"],
        trainable_params_last=last.get("trainable", 0),
        param_bytes=p_bytes,
        grad_bytes=peak["grads"],
        optimizer_state_bytes=peak["state"] + peak["projection"],
        optimizer_moment_bytes=peak["state"],
        projection_bytes=peak["projection"],
        grad_bytes_last=last.get("grads", 0),
        optimizer_state_bytes_last=last.get("state", 0) + last.get("projection", 0),
        accounted_peak_bytes=peak["accounted"],
        rss_after_load_bytes=rss_after_load,
        tokens_per_step=tokens_per_step,
        tokens_per_s=statistics.median(tps),
        tokens_per_s_p10=quantile(tps, 0.1),
        tokens_per_s_p90=quantile(tps, 0.9),
        step_time_s_median=statistics.median(measured),
        final_train_loss=losses[-1],
        final_train_loss_avg5=sum(losses[-5:]) / len(losses[-5:]),
        eval_loss_before=eval_loss_before,
        eval_accuracy_before=eval_acc_before,
        eval_loss=eval_loss,
        eval_accuracy=eval_acc,
        losses=losses,
        step_times_s=step_times,
        active_layers=active,
    )
    if device.type == "cuda":
        result["cuda_max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    return result


def run_worker(spec_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    t0 = time.perf_counter()
    result: dict[str, Any] = {"method": spec["method"], "status": "ok"}
    try:
        result.update(train(spec))
    except methods.MethodUnavailable as exc:
        result.update(status="failed", error=str(exc), install=exc.install)
    except Exception as exc:  # any failure is reported in the method's row; the others still run
        result.update(status="failed", error=f"{type(exc).__name__}: {exc}",
                      traceback=traceback.format_exc(limit=8)[-3000:])
        if isinstance(exc, ImportError):
            result["install"] = f"pip install {getattr(exc, 'name', None) or 'the missing module'}"
    result["wall_s"] = time.perf_counter() - t0
    result["peak_rss_bytes"] = _peak_rss()
    with open(spec["result_path"], "w") as f:
        json.dump(result, f)
    return 0
