"""GPU check of the Triton kernels at real shapes: correct against the torch reference, and how fast.

One command, about 2-4 minutes on one H200 (most of it galore-torch's first-step SVDs and
Triton compiles)::

    PYTHONPATH=. python benchmarks/gpu_check.py                 # real shapes, CUDA
    PYTHONPATH=. python benchmarks/gpu_check.py --small         # tiny shapes; on a CPU-only
                                                                # machine under TRITON_INTERPRET=1

Per case (weight shape m x n, rank r, weight dtype) it runs one GaLore step's two fused
kernels (``project_adam`` then ``back_project_update``), checks moments, N and W against
the torch reference ops, and prints:

* the median time of the fused step, with min and max over the timed runs (L2 flushed
  before each run, CUDA-event timing after warm-up);
* achieved GB/s on the minimum bytes a step must move (REFERENCE.md)::

      bytes = m n (b_G + 2 b_W) + 4 max(m, n) r 4 + min(m, n) r 4

* the ratio of the time to that floor at ``--peak-gbps`` (4300: the device-to-device
  bandwidth measured on an H200);
* the speedup over the unfused torch path (the torch reference ops, same math) and over
  galore-torch's ``GaLoreAdamW.step()`` at the same rank without a refresh (skipped with a
  note when ``galore_torch`` is not importable).

It also checks and times ``outlier_count`` (two passes) per shape and dtype. The tensor
core trade-off is measured by timing each ``--precision`` (ieee, tf32x3, tf32). Results
are printed and appended to ``benchmarks/results/gpu_check_<date>.txt`` with the machine,
the versions and the date. Nothing is asserted: failed checks are printed as FAIL and
counted in the exit status (1 if any failed).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true",
                   help="tiny ragged shapes (same code path); runs on CPU under TRITON_INTERPRET=1 when there is no GPU")
    p.add_argument("--precision", default="ieee,tf32x3,tf32",
                   help="comma list of tl.dot input precisions to time (default: all three)")
    p.add_argument("--peak-gbps", type=float, default=4300.0,
                   help="bandwidth for the floor, GB/s (default 4300: H200 D2D measured)")
    p.add_argument("--iters", type=int, default=None, help="timed runs per measurement (default 50; 3 with --small)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up runs (default 10; 1 with --small)")
    p.add_argument("--no-galore", action="store_true", help="skip the galore-torch baseline (saves its SVDs)")
    p.add_argument("--no-flush", action="store_true", help="do not flush L2 before each timed run")
    p.add_argument("--out", default=None, help="results file (default benchmarks/results/gpu_check_<date>[_small].txt)")
    return p.parse_args(argv)


ARGS = parse_args()

import torch  # noqa: E402

if not torch.cuda.is_available():
    if not ARGS.small:
        sys.exit("gpu_check: no CUDA device. Use --small to run the same code path on tiny shapes "
                 "in Triton's interpreter (CPU).")
    os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported

import triton  # noqa: E402

from owlore_kernels.kernels import DOT_PRECISIONS, back_project_update_launch, outlier_count_launch, project_adam_launch  # noqa: E402
from owlore_kernels.ops.back_project_update import back_project_update_reference  # noqa: E402
from owlore_kernels.ops.outlier_count import outlier_count_reference  # noqa: E402
from owlore_kernels.ops.project_adam import project_adam_reference  # noqa: E402

try:
    from galore_torch import GaLoreAdamW
    GALORE_NOTE = None
except Exception as exc:  # not installed on every GPU machine
    GaLoreAdamW = None
    GALORE_NOTE = f"galore_torch not importable ({type(exc).__name__}: {exc}); galore column skipped"

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if ARGS.small:
    SHAPES = [(67, 131), (131, 67)]
    RANKS = [5, 16]
else:
    SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]
    RANKS = [128, 256, 512]
DTYPES = [torch.float32, torch.bfloat16]
ITERS = ARGS.iters or (3 if ARGS.small else 50)
WARMUP = ARGS.warmup or (1 if ARGS.small else 10)
PRECISIONS = [p.strip() for p in ARGS.precision.split(",") if p.strip()]
for prec in PRECISIONS:
    if prec not in DOT_PRECISIONS:
        sys.exit(f"--precision: {prec!r} is not one of {DOT_PRECISIONS}")
BETA1, BETA2, EPS, LR, WD, SCALE = 0.9, 0.999, 1e-6, 1e-3, 0.01, 0.25

# Accuracy bounds, as max |got - want| / (atol + rtol |want|) <= 1. "ieee" is exact fp32
# products; only the summation order differs, over K = 4096-11008 terms, hence 1e-4 rather
# than the 1e-5 of the small-shape tests. TF32 rounds products' inputs to 10 mantissa bits
# (~5e-4 relative each), so R and everything after it carries ~1e-3 relative error.
TOL = {"ieee": (1e-4, 1e-5), "tf32x3": (1e-4, 1e-5), "tf32": (2e-2, 2e-3)}

_FLUSH = None
LINES: list[str] = []
FAILURES = 0


def emit(line: str = "") -> None:
    print(line, flush=True)
    LINES.append(line)


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def flush_l2() -> None:
    """Overwrite a 256 MB buffer so the next run starts with a cold 50 MB L2 (H200)."""
    global _FLUSH
    if DEVICE.type != "cuda" or ARGS.no_flush:
        return
    if _FLUSH is None:
        _FLUSH = torch.empty(64 * 2**20, dtype=torch.float32, device=DEVICE)
    _FLUSH.zero_()


def time_ms(fn) -> tuple[float, float, float]:
    """(median, min, max) milliseconds of ``fn()`` over ITERS runs after WARMUP runs."""
    for _ in range(WARMUP):
        fn()
    sync()
    times = []
    for _ in range(ITERS):
        flush_l2()
        if DEVICE.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times), max(times)


def floor_bytes(m: int, n: int, r: int, dtype: torch.dtype) -> int:
    b = torch.empty((), dtype=dtype).element_size()
    return m * n * (b + 2 * b) + 4 * max(m, n) * r * 4 + min(m, n) * r * 4


def closeness(got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float) -> float:
    """max |got - want| / (atol + rtol |want|): <= 1 passes, like torch.testing.assert_close."""
    return ((got.float() - want.float()).abs() / (atol + rtol * want.float().abs())).max().item()


def bf16_ulps(got: torch.Tensor, want: torch.Tensor) -> int:
    """Largest distance in bf16 units in the last place (same-sign values)."""
    return (got.view(torch.int16).int() - want.view(torch.int16).int()).abs().max().item()


def verdict(ok: bool) -> str:
    global FAILURES
    FAILURES += not ok
    return "ok" if ok else "FAIL"


def orthonormal(rows: int, cols: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(max(rows, cols), min(rows, cols), device=DEVICE))
    return (q if rows >= cols else q.t()).contiguous()


def galore_step_ms(w0: torch.Tensor, grad: torch.Tensor, r: int):
    """galore-torch GaLoreAdamW.step() on one weight, rank r, no projection refresh."""
    if GaLoreAdamW is None or ARGS.no_galore:
        return None
    w = torch.nn.Parameter(w0.clone())
    w.grad = grad
    opt = GaLoreAdamW([{"params": [w], "rank": r, "update_proj_gap": 10**9, "scale": SCALE, "proj_type": "std"}],
                      lr=LR, weight_decay=WD)
    opt.step()  # the first step computes the SVD; the timed ones reuse it
    result = time_ms(opt.step)
    del opt, w
    return result


def check_step(m: int, n: int, r: int, dtype: torch.dtype) -> None:
    side = "right" if m >= n else "left"  # galore-torch "std": project the shorter side
    grad = torch.randn(m, n, device=DEVICE).to(dtype)
    grad_prev = torch.randn(m, n, device=DEVICE).to(dtype)
    weight0 = torch.randn(m, n, device=DEVICE).to(dtype)
    proj = orthonormal(m, r) if side == "left" else orthonormal(r, n)
    low = (r, n) if side == "left" else (m, r)
    # warm moments (one reference step): N then divides by a realistic sqrt(v), not ~|R|
    avg0, avg_sq0 = torch.zeros(low, device=DEVICE), torch.zeros(low, device=DEVICE)
    project_adam_reference(grad_prev, proj, avg0, avg_sq0, torch.empty(low, device=DEVICE), side, BETA1, BETA2, EPS, 1)

    ref_avg, ref_avg_sq, ref_n, ref_w = avg0.clone(), avg_sq0.clone(), torch.empty(low, device=DEVICE), weight0.clone()
    project_adam_reference(grad, proj, ref_avg, ref_avg_sq, ref_n, side, BETA1, BETA2, EPS, 2)
    back_project_update_reference(ref_w, proj, ref_n, side, LR, WD, SCALE)
    # snapshot: timing the unfused path below keeps updating ref_* in place
    want = {"avg": ref_avg.clone(), "avg_sq": ref_avg_sq.clone(), "n": ref_n.clone(), "w": ref_w.clone()}
    n_in = ref_n.clone()  # the N both back-projections consume in the check

    def unfused():
        project_adam_reference(grad, proj, ref_avg, ref_avg_sq, ref_n, side, BETA1, BETA2, EPS, 2)
        back_project_update_reference(ref_w, proj, ref_n, side, LR, WD, SCALE)

    t_unfused = time_ms(unfused)
    t_galore = galore_step_ms(weight0, grad, r)
    nbytes = floor_bytes(m, n, r, dtype)
    floor_ms = nbytes / (ARGS.peak_gbps * 1e9) * 1e3
    dname = str(dtype).replace("torch.", "")
    for prec in PRECISIONS:
        avg, avg_sq, out, w = avg0.clone(), avg_sq0.clone(), torch.empty(low, device=DEVICE), weight0.clone()
        project_adam_launch(grad, proj, avg, avg_sq, out, side, BETA1, BETA2, EPS, 2, dot_precision=prec)
        # the reference's N, so the W check sees only back_project_update's own error
        back_project_update_launch(w, proj, n_in, side, LR, WD, SCALE, dot_precision=prec)
        rtol, atol = TOL[prec]
        c_avg = closeness(avg, want["avg"], rtol, atol)
        c_sq = closeness(avg_sq, want["avg_sq"], rtol, atol)
        c_n = closeness(out, want["n"], rtol, atol)
        if dtype == torch.float32:
            c_w = closeness(w, want["w"], rtol, atol)
            w_ok, w_note = c_w <= 1, f"W {c_w:.2f}"
        else:
            ulps = bf16_ulps(w, want["w"])  # fp32 math identical up to order: at most 1 ulp apart
            w_ok, w_note = ulps <= (1 if prec != "tf32" else 2), f"W {ulps} ulp"
        ok = max(c_avg, c_sq, c_n) <= 1 and w_ok
        check = f"m {c_avg:.2f} v {c_sq:.2f} N {c_n:.2f} {w_note} {verdict(ok)}"

        def fused():
            project_adam_launch(grad, proj, avg, avg_sq, out, side, BETA1, BETA2, EPS, 2, dot_precision=prec)
            back_project_update_launch(w, proj, out, side, LR, WD, SCALE, dot_precision=prec)

        med, lo, hi = time_ms(fused)
        gbps = nbytes / (med * 1e-3) / 1e9
        galore = f"{t_galore[0] / med:6.2f}x" if t_galore else "   n/a"
        emit(f"{m:>5}x{n:<5} r={r:<3} {dname:<8} {side:<5} {prec:<6} | {med:8.3f} ms [{lo:.3f}-{hi:.3f}] "
             f"{gbps:7.0f} GB/s  {med / floor_ms:5.2f}x floor | vs unfused {t_unfused[0] / med:6.2f}x "
             f"({t_unfused[0]:.3f} ms) vs galore {galore}"
             + (f" ({t_galore[0]:.3f} ms)" if t_galore else "") + f" | {check}")


def check_outliers(m: int, n: int, dtype: torch.dtype) -> None:
    w = torch.randn(m, n, device=DEVICE).to(dtype)
    scale = torch.rand(n, device=DEVICE) + 0.5
    threshold = 5.0
    mean_t, count_t = outlier_count_launch([w], threshold, [scale])
    mean, count = mean_t.item(), count_t.item()
    ref_mean, ref_count = outlier_count_reference([w.clone()], threshold, [scale])  # the reference scores in place
    rel = abs(mean - ref_mean) / abs(ref_mean)
    # count may differ only by entries within 1e-5 of the cut (the means' last bits)
    score = w.float().abs_().mul_(scale)
    cut = threshold * ref_mean
    lo, hi = int((score > cut * (1 + 1e-5)).sum()), int((score > cut * (1 - 1e-5)).sum())
    del score
    ok = rel <= 1e-5 and lo <= count <= hi
    med, mn, mx = time_ms(lambda: outlier_count_launch([w], threshold, [scale]))
    ref_med = time_ms(lambda: outlier_count_reference([w.clone()], threshold, [scale]))[0]
    nbytes = 2 * m * n * w.element_size()  # two passes over w; the scale vector is noise
    floor_ms = nbytes / (ARGS.peak_gbps * 1e9) * 1e3
    dname = str(dtype).replace("torch.", "")
    emit(f"{m:>5}x{n:<5} {dname:<8} outlier_count | {med:8.3f} ms [{mn:.3f}-{mx:.3f}] "
         f"{nbytes / (med * 1e-3) / 1e9:7.0f} GB/s {med / floor_ms:5.2f}x floor(2 passes) | vs torch ref "
         f"{ref_med / med:6.2f}x ({ref_med:.3f} ms; includes a clone) | mean rel {rel:.1e} count {count} "
         f"(ref {ref_count}, allowed {lo}-{hi}) {verdict(ok)}")


def header() -> None:
    now = datetime.datetime.now().astimezone()
    gpu = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}), Triton interpreter"
    try:
        import galore_torch
        gver = getattr(galore_torch, "__version__", "installed")
    except Exception:
        gver = "not installed"
    emit(f"# gpu_check {now.isoformat(timespec='seconds')}  {'--small' if ARGS.small else 'real shapes'}")
    emit(f"# device: {gpu}; {platform.platform()}; python {platform.python_version()}")
    emit(f"# torch {torch.__version__}, triton {triton.__version__}, galore_torch {gver}; "
         f"peak {ARGS.peak_gbps:.0f} GB/s; {ITERS} runs after {WARMUP} warm-up, median [min-max]; "
         f"L2 flush {'off' if ARGS.no_flush or DEVICE.type != 'cuda' else 'on'}")
    emit("# step = project_adam + back_project_update (2 kernels); floor bytes = m n (b_G + 2 b_W) + 16 max(m,n) r "
         "+ 4 min(m,n) r; 'x floor' = time / floor time; 'vs X' = X's time / this time; checks: max err / (atol + rtol |ref|)")
    if GALORE_NOTE:
        emit(f"# note: {GALORE_NOTE}")
    elif ARGS.no_galore:
        emit("# note: galore baseline skipped (--no-galore)")


def main() -> int:
    header()
    t0 = time.time()
    for dtype in DTYPES:
        for m, n in SHAPES:
            check_outliers(m, n, dtype)
    for m, n in SHAPES:
        for r in RANKS:
            for dtype in DTYPES:
                check_step(m, n, r, dtype)
                if DEVICE.type == "cuda":
                    torch.cuda.empty_cache()
    emit(f"# {FAILURES} check(s) failed; wall {time.time() - t0:.0f} s")
    date = datetime.date.today().isoformat()
    path = ARGS.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                    f"gpu_check_{date}{'_small' if ARGS.small else ''}.txt")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        f.write("\n".join(LINES) + "\n\n")
    print(f"appended to {path}")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
