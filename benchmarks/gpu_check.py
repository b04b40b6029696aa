"""GPU check of the Triton kernels at real shapes: correct against the torch reference and an
fp64 oracle, and how fast against the HBM floor, galore-torch and fused torch.optim.AdamW.

One command, a few minutes on one H200 (torch 2.11 / triton 3.6, no network)::

    PYTHONPATH=. python benchmarks/gpu_check.py             # real shapes, CUDA
    PYTHONPATH=. python benchmarks/gpu_check.py --small     # tiny shapes; without a GPU it runs
                                                            # the same code in Triton's interpreter

Per case (weight m x n, rank r, dtype, dot precision; "default" = what the launcher picks per
call: bf16/fp16 tensor-core dots, fp32 following torch.get_float32_matmul_precision()):

* correctness: R (through m = (1 - b1) R from zero moments), v, N and W against an fp64
  oracle, within the worst-case bound of the precision's rounding,
  ``|dR| <= 2 (u_dot + K 2^-24) (|P|^T |G|)`` (u_dot: 2^-9 bf16 P, 2^-11 fp16, 2^-10 x 2 tf32
  truncation, 0 ieee); N against the fp64 formula on the kernel's own m, v; a bf16/fp16 W
  within one unit in the last place of the fp64 update plus the dot's rounding bound on
  |alpha| |A| |B| (which only matters where |W| is as small as the update). The torch reference's own error
  against the oracle is printed beside it.
* timings (CUDA events, L2 flushed before each run, candidates interleaved): the fused step
  (project_adam + back_project_update), the same math as torch ops, galore-torch's
  ``GaLoreAdamW.step()`` (projection refresh frozen) and full-rank fused ``torch.optim.AdamW``;
  the step's ratio to the HBM floor (read W and G, write W, read+write the fp32 moments,
  read P, at ``--peak-gbps``) and the extra peak memory of the fused step.
* ``outlier_count``: mean and count against the reference, time vs one read of W.
* kernels alone (bf16, P in bf16): ``project_adam`` against cuBLAS's bare R = P^T G, and
  ``back_project_update`` against cuBLAS's in-place ``W.addmm_(P, N, beta, alpha)``, with the
  ratios (``--sections kernels`` runs only these: 9 cases, well under a minute on an H200).

Results are printed and appended to ``benchmarks/results/gpu_check[_small].{md,jsonl}`` with
the machine stamp. Exit status 1 if any check failed.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Optional

# Nothing here imports torch or the kernels: main() decides first whether Triton must run in its
# interpreter (TRITON_INTERPRET=1 has to be set before any kernel module is imported).

DTYPE_NAMES = ("bfloat16", "float16", "float32")
SMALL_SHAPES, SMALL_RANKS = ((67, 131), (131, 67)), (16,)
REAL_SHAPES, REAL_RANKS = ((4096, 4096), (4096, 11008), (11008, 4096)), (128, 256, 512)
BETA1, BETA2, EPS, LR, WD, SCALE = 0.9, 0.999, 1e-8, 1e-3, 0.01, 0.25
EPS32 = 2.0 ** -24
UNIT = {"ieee": 0.0, "tf32": 2 * 2.0 ** -10, "tf32x3": 2 * 2.0 ** -22, "bf16": 2.0 ** -9, "fp16": 2.0 ** -11}
ULP = {"bfloat16": 2.0 ** -8, "float16": 2.0 ** -10}  # by dtype name
NO_CUDA = ("gpu_check: no CUDA device. Use --small to run the same code path on tiny shapes "
           "in Triton's interpreter (CPU).")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true",
                   help="tiny ragged shapes (same code path); runs on CPU under TRITON_INTERPRET=1 without a GPU")
    p.add_argument("--precision", default="default,ieee",
                   help="comma list: 'default' (the per-call choice) and/or explicit dot precisions; "
                        "those a dtype does not allow are skipped for it (default: default,ieee)")
    p.add_argument("--peak-gbps", type=float, default=4800.0,
                   help="HBM bandwidth for the floor, GB/s (default 4800: H200 datasheet)")
    p.add_argument("--iters", type=int, default=None, help="timed runs per candidate (default 30; 1 with --small)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 5; 1 with --small)")
    p.add_argument("--no-galore", action="store_true", help="skip the galore-torch baseline")
    p.add_argument("--seed", type=int, default=0, help="seeds the random inputs (default 0)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--sweep", action="store_true",
                   help="in the kernels section, also time a few other tile configs of each kernel (4096x11008 "
                        "and 11008x4096, r = 128)")
    p.add_argument("--sections", default="outliers,steps,kernels",
                   help="comma list of what to run: 'outliers', 'steps' (fused step checks and timings), "
                        "'kernels' (each bf16 kernel alone against cuBLAS); default: all three")
    return p.parse_args(argv)


@dataclass(frozen=True)
class Options:
    """What one run checks and how, from the command line and the machine."""

    small: bool
    precisions: tuple  # "default" and/or explicit dot precisions, in the order given
    peak_gbps: float
    iters: int
    warmup: int
    seed: int
    out: Optional[str]
    device: Any  # torch.device
    cuda: bool
    shapes: tuple
    ranks: tuple
    galore: Any = None  # galore_torch.GaLoreAdamW, or None: that baseline is skipped
    sections: tuple = ("outliers", "steps", "kernels")
    sweep: bool = False

    @classmethod
    def from_args(cls, args, device, galore=None) -> "Options":
        return cls(small=args.small,
                   precisions=tuple(p.strip() for p in args.precision.split(",") if p.strip()),
                   peak_gbps=args.peak_gbps,
                   iters=args.iters or (1 if args.small else 30),
                   warmup=args.warmup if args.warmup is not None else (1 if args.small else 5),
                   seed=args.seed, out=args.out, device=device, cuda=device.type == "cuda",
                   shapes=SMALL_SHAPES if args.small else REAL_SHAPES,
                   ranks=SMALL_RANKS if args.small else REAL_RANKS,
                   galore=None if args.no_galore else galore,
                   sections=tuple(x.strip() for x in args.sections.split(",") if x.strip()), sweep=args.sweep)


@dataclass
class Tally:
    """The result rows and the number of failed checks so far."""

    rows: list = field(default_factory=list)
    failures: int = 0

    def verdict(self, ok: bool) -> str:
        self.failures += not ok
        return "ok" if ok else "FAIL"


def emit(line: str = "") -> None:
    print(line, flush=True)


def dname(dtype) -> str:
    return str(dtype).replace("torch.", "")


def import_galore():
    """(GaLoreAdamW, None), or (None, why it is skipped) where galore_torch does not import."""
    try:
        from galore_torch import GaLoreAdamW
        return GaLoreAdamW, None
    except Exception as exc:  # not installed on every GPU machine
        return None, f"galore_torch not importable ({type(exc).__name__}: {exc}); galore column skipped"


def time_all(opts: Options, candidates: dict) -> dict:
    """Median ms per candidate (interleaved; L2 flushed before each run on CUDA)."""
    from owlore_kernels.bench.harness import time_interleaved

    t = time_interleaved(candidates, repeats=opts.iters, warmup=opts.warmup, device=opts.device,
                         flush_l2=opts.cuda)
    return {k: v.summary()["median"] for k, v in t.items()}


def floor_bytes(m: int, n: int, r: int, dtype) -> int:
    import torch

    b = torch.empty((), dtype=dtype).element_size()
    return 3 * m * n * b + 4 * max(m, n) * r * 4 + min(m, n) * r * 4


def orthonormal(rows: int, cols: int, device):
    import torch

    q, _ = torch.linalg.qr(torch.randn(max(rows, cols), min(rows, cols), device=device))
    return (q if rows >= cols else q.t()).contiguous()


def galore_step(opts: Options, weight0, grad, r: int):
    if opts.galore is None:
        return None
    import torch
    from owlore_kernels.bench.harness import frozen_galore_refresh

    w = torch.nn.Parameter(weight0.clone())
    w.grad = grad
    with frozen_galore_refresh():
        opt = opts.galore([{"params": [w], "rank": r, "update_proj_gap": 10 ** 9, "scale": SCALE,
                            "proj_type": "std"}], lr=LR, weight_decay=WD)
        opt.step()  # the first step builds the projector; the timed ones reuse it
    return opt.step


def adamw_step(weight0, grad):
    import torch

    w = torch.nn.Parameter(weight0.clone())
    w.grad = grad
    opt = torch.optim.AdamW([w], lr=LR, weight_decay=WD, fused=True)
    opt.step()
    return opt.step


def check_step(opts: Options, tally: Tally, m: int, n: int, r: int, dtype, precisions) -> None:
    import torch
    from owlore_kernels.kernels import back_project_update_launch, project_adam_launch, resolve_dot_precision
    from owlore_kernels.ops.back_project_update import back_project_update_reference
    from owlore_kernels.ops.project_adam import project_adam_reference

    device = opts.device
    side = "right" if m >= n else "left"  # galore-torch "std": project onto the shorter side
    k = m if side == "left" else n
    grad = torch.randn(m, n, device=device).to(dtype)
    weight0 = torch.randn(m, n, device=device).to(dtype)
    proj = orthonormal(m, r, device) if side == "left" else orthonormal(r, n, device)
    if dtype != torch.float32:  # the optimizer keeps P in G's 16-bit type on CUDA: both operands reach the MMA as is
        proj = proj.to(dtype)
    low = (r, n) if side == "left" else (m, r)
    bias1, bias2 = 1 - BETA1, 1 - BETA2  # step 1
    beta, alpha = 1 - LR * WD, -LR * SCALE
    # fp64 oracle, and |P|^T |G| for the rounding bound
    g64, p64 = grad.double(), proj.double()
    r64 = p64.t() @ g64 if side == "left" else g64 @ p64.t()
    absprod = (p64.abs().t() @ g64.abs()) if side == "left" else (g64.abs() @ p64.abs().t())
    del g64
    # torch reference (fp32 math), and its error against the oracle
    ref_m, ref_v, ref_n = (torch.zeros(low, device=device) for _ in range(3))
    project_adam_reference(grad, proj, ref_m, ref_v, ref_n, side, BETA1, BETA2, EPS, bias1, bias2)
    ref_err = ((ref_m.double() / (1 - BETA1) - r64).abs().max() / r64.abs().max()).item()
    n_in = ref_n.clone()  # the N both back-projections consume
    a64, b64 = (p64, n_in.double()) if side == "left" else (n_in.double(), p64)
    w64 = beta * weight0.double() + alpha * (a64 @ b64)
    wabs = abs(alpha) * (a64.abs() @ b64.abs())
    del a64, b64
    nbytes = floor_bytes(m, n, r, dtype)
    floor_ms = nbytes / (opts.peak_gbps * 1e9) * 1e3
    ref_w = weight0.clone()

    def unfused():
        project_adam_reference(grad, proj, ref_m, ref_v, ref_n, side, BETA1, BETA2, EPS, bias1, bias2)
        back_project_update_reference(ref_w, proj, ref_n, side, beta, alpha)

    baselines = {"torch ops": unfused}
    step = galore_step(opts, weight0, grad, r)
    if step is not None:
        baselines["galore-torch"] = step
    if opts.cuda:
        baselines["AdamW fused"] = adamw_step(weight0, grad)
    for choice in precisions:
        prec = resolve_dot_precision(dtype, None if choice == "default" else choice)
        mom, sq, out, w = (torch.zeros(low, device=device), torch.zeros(low, device=device),
                           torch.empty(low, device=device), weight0.clone())
        project_adam_launch(grad, proj, mom, sq, out, side, BETA1, BETA2, EPS, bias1, bias2, dot_precision=prec)
        back_project_update_launch(w, proj, n_in, side, beta, alpha, dot_precision=prec)
        # R through m = (1 - b1) R (zero moments): error / bound, <= 1 passes
        bound_r = 2 * (UNIT[prec] + k * EPS32) * absprod + 1e-30
        err_r = (mom.double() / (1 - BETA1) - r64).abs()
        c_r = ((err_r - 2 * EPS32 * r64.abs()).clamp_min(0) / bound_r).max().item()  # the 0.1 scaling's rounding
        kern_err = (err_r.max() / r64.abs().max()).item()
        c_v = ((sq.double() - (1 - BETA2) * r64 ** 2).abs()
               / ((1 - BETA2) * (2 * r64.abs() * bound_r + bound_r ** 2) + 4 * EPS32 * (1 - BETA2) * r64 ** 2
                  + 1e-30)).max().item()
        want_n = (mom.double() / bias1) / ((sq.double() / bias2).sqrt() + EPS)
        c_n = ((out.double() - want_n).abs() / (8 * EPS32 * want_n.abs() + 1e-30)).max().item()
        if dtype == torch.float32:
            bound_w = 2 * ((UNIT[prec] + r * EPS32) * wabs + 2 * EPS32 * w64.abs()) + 1e-30
            c_w = ((w.double() - w64).abs() / bound_w).max().item()
            w_note = f"W {c_w:.2f}"
        else:  # one ulp of W's dtype (the rounding of the fp32 result) + the dot's own rounding bound
            u_ops = 2 * UNIT[prec] if prec in ("bf16", "fp16") else UNIT[prec]
            # below the smallest normal (fp16: 6.1e-5, hit by a few of randn's entries) the
            # spacing is absolute, smallest_normal * eps, not relative to |W|
            subnormal = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
            bound_w = (ULP[dname(dtype)] * w64.abs() + subnormal
                       + 2 * ((u_ops + r * EPS32) * wabs + 2 * EPS32 * w64.abs()) + 1e-30)
            c_w = ((w.double() - w64).abs() / bound_w).max().item()
            w_note = f"W {c_w:.2f}"
        ok = max(c_r, c_v, c_n, c_w) <= 1
        check = f"R {c_r:.2f} v {c_v:.2f} N {c_n:.2f} {w_note} (err/bound) {tally.verdict(ok)}"

        def fused():
            project_adam_launch(grad, proj, mom, sq, out, side, BETA1, BETA2, EPS, bias1, bias2, dot_precision=prec)
            back_project_update_launch(w, proj, out, side, beta, alpha, dot_precision=prec)

        peak_note = ""
        if opts.cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fused()
            torch.cuda.synchronize()
            peak_note = f" +{(torch.cuda.max_memory_allocated() - base) / 2**20:.1f} MiB peak"
        times = time_all(opts, {"fused": fused, **baselines})
        med = times["fused"]
        vs = "  ".join(f"{name} {t:.3f} ms ({t / med:.2f}x)" for name, t in times.items() if name != "fused")
        emit(f"{m:>5}x{n:<5} r={r:<3} {dname(dtype):<8} {side:<5} {choice}={prec:<6} | fused {med:8.3f} ms "
             f"{med / floor_ms:5.2f}x floor{peak_note} | {vs} | R err {kern_err:.1e} (torch {ref_err:.1e}) | {check}")
        tally.rows.append(dict(m=m, n=n, r=r, dtype=dname(dtype), side=side, precision=prec, choice=choice,
                               fused_ms=med, floor_ms=floor_ms,
                               **{f"{k}_ms": v for k, v in times.items() if k != "fused"},
                               r_rel_err=kern_err, torch_r_rel_err=ref_err, ok=ok))


def time_kernels(opts: Options, tally: Tally, m: int, n: int, r: int) -> None:
    """Each bf16 kernel alone against the cuBLAS call doing its GEMM (same L2 flush, interleaved):
    project_adam vs the bare R = P^T G (or G Q^T), back_project_update vs the in-place
    ``W.addmm_(P, N, beta, alpha)`` (N in bf16 for cuBLAS; the kernel reads the fp32 N that
    project_adam writes). P is bf16 in both. Ratios above 1: the kernel is slower."""
    import torch
    from owlore_kernels.kernels import back_project_update_launch, project_adam_launch

    device, dtype = opts.device, torch.bfloat16
    side = "right" if m >= n else "left"
    grad = torch.randn(m, n, device=device).to(dtype)
    weight = torch.randn(m, n, device=device).to(dtype)
    proj = (orthonormal(m, r, device) if side == "left" else orthonormal(r, n, device)).to(dtype)
    low = (r, n) if side == "left" else (m, r)
    mom, sq, out = (torch.zeros(low, device=device) for _ in range(3))
    norm = torch.randn(low, device=device)
    norm16 = norm.to(dtype)
    beta, alpha = 1 - LR * WD, -LR * SCALE
    a16, b16 = (proj, norm16) if side == "left" else (norm16, proj)
    candidates = {
        "project_adam": lambda: project_adam_launch(grad, proj, mom, sq, out, side, BETA1, BETA2, EPS, 0.1, 0.001),
        "cuBLAS GEMM": (lambda: torch.mm(proj.t(), grad)) if side == "left" else (lambda: torch.mm(grad, proj.t())),
        "back_project_update": lambda: back_project_update_launch(weight, proj, norm, side, beta, alpha),
        "cuBLAS addmm_": lambda: weight.addmm_(a16, b16, beta=beta, alpha=alpha),
    }
    if opts.sweep and (opts.small or (r == 128 and max(m, n) >= 11008)):  # small: the same code path, tiny
        # the alternatives worth measuring: 128 x 128 tiles (86 of them: one wave, 46 SMs idle) against the
        # default 128 x 64 (172: one block per SM by registers, so 40 SMs run two); fewer / more stages
        for name, tiles in (("BLOCK_L=128 w8 s3", dict(BLOCK_L=128, num_warps=8, num_stages=3)),
                            ("BLOCK_L=64 w4 s4", dict(BLOCK_L=64, num_warps=4, num_stages=4)),
                            ("BLOCK_L=64 w8 s3", dict(BLOCK_L=64, num_warps=8, num_stages=3)),
                            ("BLOCK_K=128 s2", dict(BLOCK_K=128, num_stages=2))):
            candidates[f"project_adam {name}"] = (
                lambda t=tiles: project_adam_launch(grad, proj, mom, sq, out, side, BETA1, BETA2, EPS, 0.1, 0.001,
                                                    tiles=t))
        for name, tiles in (("128x64", dict(BLOCK_M=128, BLOCK_N=64)), ("64x128", dict(BLOCK_M=64, BLOCK_N=128)),
                            ("128x128 K32", dict(BLOCK_K=32)), ("128x256 s2", dict(BLOCK_N=256, num_stages=2))):
            candidates[f"back_project_update {name}"] = (
                lambda t=tiles: back_project_update_launch(weight, proj, norm, side, beta, alpha, tiles=t))
    times = time_all(opts, candidates)
    pa, bp = times["project_adam"] / times["cuBLAS GEMM"], times["back_project_update"] / times["cuBLAS addmm_"]
    emit(f"{m:>5}x{n:<5} r={r:<3} bfloat16 {side:<5} kernels alone | project_adam {times['project_adam'] * 1e3:7.1f} us"
         f" / cuBLAS P^T G {times['cuBLAS GEMM'] * 1e3:7.1f} us = {pa:4.2f}x | back_project_update "
         f"{times['back_project_update'] * 1e3:7.1f} us / cuBLAS addmm_ {times['cuBLAS addmm_'] * 1e3:7.1f} us = "
         f"{bp:4.2f}x")
    for name, t in times.items():  # the --sweep configs, under their kernel's line
        if " " in name and name.split()[0] in ("project_adam", "back_project_update"):
            base = times["cuBLAS GEMM"] if name.startswith("project_adam") else times["cuBLAS addmm_"]
            emit(f"    sweep: {name:<40} {t * 1e3:7.1f} us = {t / base:4.2f}x cuBLAS")
    tally.rows.append(dict(m=m, n=n, r=r, dtype="bfloat16", side=side, op="kernels vs cuBLAS",
                           **{f"{k}_ms": v for k, v in times.items()}, project_adam_vs_cublas=pa,
                           back_project_vs_cublas=bp))


def check_outliers(opts: Options, tally: Tally, m: int, n: int, dtype) -> None:
    import torch
    from owlore_kernels.kernels import outlier_count_launch
    from owlore_kernels.ops.outlier_count import outlier_count_reference

    w = torch.randn(m, n, device=opts.device).to(dtype)
    scale = torch.rand(n, device=opts.device) + 0.5
    threshold = 5.0
    mean_t, count_t = outlier_count_launch([w], threshold, [scale])
    mean, count = mean_t.item(), count_t.item()
    ref_count = outlier_count_reference([w], threshold, [scale])[1].item()
    mean64 = (w.double().abs() * scale.double()).mean().item()
    rel = abs(mean - mean64) / mean64
    # count may differ only by entries within 1e-5 of the cut (the means' last bits)
    score = w.float().abs() * scale
    cut = threshold * mean64
    lo, hi = int((score > cut * (1 + 1e-5)).sum()), int((score > cut * (1 - 1e-5)).sum())
    del score
    ok = rel <= 1e-5 and lo <= count <= hi
    times = time_all(opts, {"triton": lambda: outlier_count_launch([w], threshold, [scale]),
                            "torch ref": lambda: outlier_count_reference([w], threshold, [scale])})
    one_read_ms = m * n * w.element_size() / (opts.peak_gbps * 1e9) * 1e3
    emit(f"{m:>5}x{n:<5} {dname(dtype):<8} outlier_count | {times['triton']:8.3f} ms "
         f"{times['triton'] / one_read_ms:5.2f}x one read of W | torch ref {times['torch ref']:.3f} ms | mean rel err "
         f"{rel:.1e} count {count} (ref {ref_count}, allowed {lo}-{hi}) {tally.verdict(ok)}")
    tally.rows.append(dict(m=m, n=n, dtype=dname(dtype), op="outlier_count", triton_ms=times["triton"],
                           torch_ms=times["torch ref"], one_read_ms=one_read_ms, ok=ok))


def run(opts: Options, galore_note: Optional[str] = None) -> int:
    """Every check of ``opts``, printed and appended to the results; 1 if any failed, else 0."""
    import torch
    from owlore_kernels.bench.harness import append_results, machine_stamp, markdown_table, stamp_line
    from owlore_kernels.kernels._common import ALLOWED_DOT_PRECISIONS

    tally = Tally()
    dtypes = [getattr(torch, name) for name in DTYPE_NAMES]
    torch.manual_seed(opts.seed)
    stamp = machine_stamp()
    emit(f"# gpu_check {'--small' if opts.small else 'real shapes'}: {stamp_line(stamp)}")
    emit(f"# device {opts.device}{' (Triton interpreter)' if not opts.cuda else ''}; floor at "
         f"{opts.peak_gbps:.0f} GB/s; {opts.iters} runs after {opts.warmup} warm-up, median; "
         f"L2 flush {'on' if opts.cuda else 'off'}")
    if galore_note:
        emit(f"# note: {galore_note}")
    t0 = time.time()
    if "outliers" in opts.sections:
        for dtype in dtypes:
            for m, n in opts.shapes:
                check_outliers(opts, tally, m, n, dtype)
    if "steps" in opts.sections:
        for m, n in opts.shapes:
            for r in opts.ranks:
                for dtype in dtypes:
                    allowed = ALLOWED_DOT_PRECISIONS[dtype]
                    precisions = [p for p in opts.precisions if p == "default" or p in allowed]
                    check_step(opts, tally, m, n, r, dtype, precisions)
                    if opts.cuda:
                        torch.cuda.empty_cache()
    if "kernels" in opts.sections:
        for m, n in opts.shapes:
            for r in opts.ranks:
                time_kernels(opts, tally, m, n, r)
    emit(f"# {tally.failures} check(s) failed; wall {time.time() - t0:.0f} s")
    folder = opts.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    steps = [r for r in tally.rows if "fused_ms" in r]
    table = markdown_table(
        ["shape", "r", "dtype", "dot", "fused ms", "x floor", "galore-torch ms", "AdamW fused ms", "R rel err", "ok"],
        [[f"{r['m']}x{r['n']}", r["r"], r["dtype"], r["precision"], f"{r['fused_ms']:.3f}",
          f"{r['fused_ms'] / r['floor_ms']:.2f}", f"{r.get('galore-torch_ms', float('nan')):.3f}",
          f"{r.get('AdamW fused_ms', float('nan')):.3f}", f"{r['r_rel_err']:.1e}", r["ok"]] for r in steps])
    paths = append_results(folder, "gpu_check" + ("_small" if opts.small else ""), rows=tally.rows, stamp=stamp,
                           table=table, command="PYTHONPATH=. python benchmarks/gpu_check.py"
                           + (" --small" if opts.small else ""), notes=f"{tally.failures} failed check(s).")
    print(f"appended to {paths[1]}")
    return 1 if tally.failures else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        if not args.small:
            sys.exit(NO_CUDA)
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
    galore, galore_note = import_galore()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return run(Options.from_args(args, device, galore), galore_note)


if __name__ == "__main__":
    sys.exit(main())
