"""Static GPU check, no GPU needed: compile every Triton kernel specialization the launchers
produce for sm_80 (A100) and sm_90 (H100/H200), fail on spills (in the main loop, or over 32
bytes), shared memory over the limit, compile errors or a tensor-core precision without
HMMA/HGMMA; print and write a table, and a
static roofline (estimated) of each op and of the fused step against galore-torch's sequence.

    PYTHONPATH=. python benchmarks/gpu_static_check.py              # all shapes, ranks, dtypes
    PYTHONPATH=. python benchmarks/gpu_static_check.py --precision-table   # dot error vs fp64 (CPU)

The logic lives in ``tools/gpu_static.py`` (outside the runtime package); see its docstring for
how specializations are captured, deduplicated, compiled and cached, and what fails a case.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def load_gpu_static():
    """``tools/gpu_static.py`` (a developer tool: the runtime package never imports it), loaded
    by path for compiling to the GPU: the Triton environment is set first (interpreter off; fp
    fusion, Triton's default, stated, which silences 3.9's notice), so importing this script
    changes nothing."""
    import importlib.util

    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if "gpu_static" in sys.modules:
        return sys.modules["gpu_static"]
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "gpu_static.py")
    spec = importlib.util.spec_from_file_location("gpu_static", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_static"] = module  # the compile workers import it by this name
    spec.loader.exec_module(module)
    return module


def spec_table(cases, results) -> tuple[list, list]:
    """One row per distinct specialization (first case that produced it), and the failures."""
    gs = load_gpu_static()
    rows, fails, seen = [], [], {}
    for case in cases:
        bad = gs.failures(case, results)
        if bad:
            fails.append(f"{case.op} {case.shape} r={case.rank} {case.dtype} {case.side} {case.precision} "
                         f"sm_{case.arch}: {'; '.join(bad)}")
        for key, grid, launch in case.launches:
            if key in seen:
                continue
            seen[key] = True
            res = results[key]
            c = launch.constexprs
            tile = "x".join(str(c[k]) for k in ("BLOCK_A", "BLOCK_L", "BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_R",
                                                  "BLOCK_C") if k in c)
            kernel = launch.kernel.fn.__name__.strip("_").replace("_kernel", "")
            extra = " split-K" if c.get("SPLIT_K") else ""
            if "error" in res:
                rows.append(f"| {kernel}{extra} | {case.dtype} | {case.side} | {case.precision} | sm_{case.arch} | "
                            f"{tile} | {launch.num_warps}/{launch.num_stages} | ERROR | | | | | |")
                continue
            loop = res["loop"]
            dot = f"{case.precision}{' (default)' if case.default else ''}"
            rows.append(
                f"| {kernel}{extra} | {case.dtype} (P {case.proj}) | {case.side} | {dot} "
                f"| sm_{case.arch} | {tile} | {launch.num_warps}/{launch.num_stages} | {res['regs']} | "
                f"{res['stack'] + res['local']}/{res['ldl_stl']} | {res['shared'] // 1024} | {res['blocks_per_sm']} | "
                f"{gs.mma_kind(res)} | {loop['instructions']} ({loop['hmma'] + loop['hgmma']} MMA, "
                f"{loop['ffma']} FFMA, {loop.get('conversions', 0)} cvt, {loop.get('ldsm', 0)} LDSM, "
                f"{loop.get('hgmma_a_registers', 0)} HGMMA with A in registers) |")
    return rows, fails


def roofline_table(cases, results, shapes, ranks, records=None) -> list:
    gs = load_gpu_static()
    lines = ["| GPU | shape | r | dtype | side | project_adam us (limit) | back_project us (limit) | fused step us "
             "| HBM floor us | fused / floor | galore-torch us | galore / fused | outlier count us / one read of W |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    index = {}
    for c in cases:
        index.setdefault((c.op, c.shape, c.rank, c.dtype, c.side, c.precision, c.arch), c)
    for arch in (90, 80):
        gpu = gs.ARCHS[arch]
        for (m, n) in shapes:
            for r in ranks:
                for dtype in ("bf16", "fp16", "fp32"):
                    side = "right" if m >= n else "left"  # galore-torch "std": the shorter side
                    prec = {"bf16": "bf16", "fp16": "fp16", "fp32": "tf32"}[dtype]
                    pa = gs.kernel_bound(index[("project_adam", (m, n), r, dtype, side, prec, arch)], results)
                    bp = gs.kernel_bound(index[("back_project_update", (m, n), r, dtype, side, prec, arch)], results)
                    oc = gs.kernel_bound(index[("outlier_count", (m, n), 0, dtype, "-", "-", arch)], results)
                    fused = pa["bound_s"] + bp["bound_s"]
                    floor = gs.hbm_floor_bytes(m, n, r, dtype) / gpu["hbm"]
                    galore = gs.galore_torch_bound(m, n, r, dtype, arch, tf32=dtype == "fp32")["bound_s"]
                    one_read = m * n * gs._bytes(dtype) / gpu["hbm"]
                    if records is not None:
                        records.append(dict(gpu=gpu["name"], arch=arch, shape=[m, n], rank=r, dtype=dtype, side=side,
                                            project_adam_us=pa["bound_s"] * 1e6, back_project_us=bp["bound_s"] * 1e6,
                                            fused_us=fused * 1e6, floor_us=floor * 1e6, galore_us=galore * 1e6,
                                            outlier_us=oc["bound_s"] * 1e6, one_read_us=one_read * 1e6))
                    lines.append(
                        f"| {gpu['name']} | {m}x{n} | {r} | {dtype}{' (tf32)' if dtype == 'fp32' else ''} | {side} | "
                        f"{pa['bound_s'] * 1e6:.1f} ({pa['limit']}) | {bp['bound_s'] * 1e6:.1f} ({bp['limit']}) | "
                        f"{fused * 1e6:.1f} | {floor * 1e6:.1f} | {fused / floor:.2f}x | {galore * 1e6:.1f} | "
                        f"{galore / fused:.2f}x | {oc['bound_s'] * 1e6:.1f} / {one_read * 1e6:.1f} = "
                        f"{oc['bound_s'] / one_read:.2f}x |")
    return lines


def precision_table(k: int = 4096, n: int = 1024, r: int = 128, seed: int = 0) -> list:
    """Error of each dot precision against an fp64 R = P^T G, emulated in torch on CPU.

    tf32 rounds each operand to 10 mantissa bits (truncation: the worst case the hardware
    may apply to operands that were not pre-rounded); tf32x3 splits each operand into a tf32
    head and a tf32 tail and sums three products; bf16 / fp16 round P (G already is that
    type). Products of such values are exact in fp32 and the sums run in fp32, as on the
    tensor cores. galore-torch: bf16 P and G, fp32 accumulation, R rounded to bf16.
    """
    gen = torch.Generator().manual_seed(seed)
    p64, _ = torch.linalg.qr(torch.randn(k, r, generator=gen, dtype=torch.float64))
    g32 = torch.randn(k, n, generator=gen)

    def tf32(x):
        return (x.view(torch.int32) & ~0x1FFF).view(torch.float32)

    def err(r_got, r64):
        d = (r_got.double() - r64)
        return d.abs().max().item() / r64.abs().max().item(), (d.norm() / r64.norm()).item()

    rows = ["| G dtype | dot | max abs err / max abs R | relative Frobenius error |", "|---|---|---|---|"]
    p32 = p64.float()
    for gname, g in (("fp32", g32), ("bf16", g32.bfloat16().float()), ("fp16", g32.half().float())):
        r64 = p64.t() @ g.double()
        variants = {"ieee (fp32 FFMA)": p32.t() @ g,
                    "tf32": tf32(p32).t() @ tf32(g)}
        ph, gh = tf32(p32), tf32(g)
        pl, gl = tf32(p32 - ph), tf32(g - gh)
        variants["tf32x3"] = ph.t() @ gh + (ph.t() @ gl + pl.t() @ gh)
        if gname == "bf16":
            ours = p32.bfloat16().float().t() @ g
            variants = {"ieee (fp32 FFMA)": variants["ieee (fp32 FFMA)"], "bf16 (default)": ours,
                        "galore-torch (bf16 P, bf16 R)": ours.bfloat16().float()}
        elif gname == "fp16":
            variants = {"ieee (fp32 FFMA)": variants["ieee (fp32 FFMA)"],
                        "fp16 (default)": p32.half().float().t() @ g}
        for name, got in variants.items():
            e_max, e_fro = err(got, r64)
            rows.append(f"| {gname} | {name} | {e_max:.2e} | {e_fro:.2e} |")
    return rows


def main(argv=None) -> int:
    gs = load_gpu_static()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--shapes", default=",".join(f"{m}x{n}" for m, n in gs.SHAPES))
    ap.add_argument("--ranks", default=",".join(map(str, gs.RANKS)))
    ap.add_argument("--no-cache", action="store_true", help="recompile everything")
    ap.add_argument("--out", default=os.path.join(RESULTS, "gpu_static_check.md"))
    ap.add_argument("--json", default=None, help="also write failures, specializations and the roofline as JSON")
    ap.add_argument("--precision-table", action="store_true", help="only the dot-precision error table (CPU, torch)")
    args = ap.parse_args(argv)
    if args.precision_table:
        lines = ["# dot precision vs an fp64 R = P^T G (K = 4096, n = 1024, r = 128, Gaussian G, orthonormal P)",
                 ""] + precision_table()
        print("\n".join(lines))
        with open(os.path.join(RESULTS, "gpu_static_precision.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
        return 0
    missing = gs.tools_missing()
    if missing:
        print(f"gpu_static_check: cannot run: {missing}")
        return 2
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    ranks = [int(x) for x in args.ranks.split(",")]
    cases = gs.build_cases(shapes=shapes, ranks=ranks)
    results = gs.run(cases, workers=args.workers, cache_dir=None if args.no_cache else gs.CACHE_DIR)
    rows, fails = spec_table(cases, results)
    import triton
    lines = [f"# Static GPU check ({datetime.date.today().isoformat()}, triton {triton.__version__}, "
             f"torch {torch.__version__}; compiled, not run)", "",
             f"{len(cases)} launcher calls ({len(shapes)} shapes x ranks {ranks} x fp32/bf16/fp16 x both sides x "
             f"every allowed precision x sm_80/sm_90) -> {len(rows)} distinct specializations. \"(default)\": what "
             f"the launcher picks without dot_precision= (for fp32 G, under the matching "
             f"torch.get_float32_matmul_precision()); spill column: stack+local bytes / LDL+STL count.", "",
             "| kernel | G/W dtype (P dtype) | side | dot | arch | tile (A x L x K / M x N x K / R x C) | warps/stages | regs "
             "| spill bytes/LDL+STL | smem KB | blocks/SM | MMA | main loop SASS instrs (conversions, LDSM, A from registers) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"] + rows
    lines += ["", f"## Failures: {len(fails)}", ""] + [f"- {f}" for f in fails]
    lines += ["", "## Static roofline (estimated, not measured; an H200 ran the earlier kernels ~5x above it)", "",
              "This bound is a guard against regressions in what compiles, not a speed: the same model put the "
              "first kernels at 1.12x the HBM floor where an H200 measured 5.4-16.5x. Only "
              "`benchmarks/gpu_check.py` on a GPU says how fast a kernel is.", "",
              "Lower bound per kernel = max(HBM bytes / bandwidth, MMA (or FFMA) FLOPs / peak, main-loop warp "
              "instructions from the SASS x iterations / (SMs x 4 schedulers x clock)); the step is the sum of its two "
              "kernels. Bytes: compulsory traffic of each kernel (G or W once, P once, moments read+write, N, split-K "
              "partials written and read back, all counted as HBM). Floor: read W and G, write W, read+write the fp32 "
              "moments, read P. galore-torch: its 12 kernels per weight (2 cuBLAS matmuls with P in G's dtype -- tf32 "
              "for fp32 under the same 'medium' setting --, 7 small Adam kernels, scale, add, weight decay), each at "
              "max(bytes/BW, FLOPs/peak). Launch gaps are not counted "
              "(they would add ~2 us per kernel: 2 here, 12 for galore-torch). fp32 rows use tf32 "
              "(float32_matmul_precision 'medium'). GPUs: " + "; ".join(
                  f"{g['name']}: {g['hbm'] / 1e12:.2f} TB/s, {g['bf16'] / 1e12:.0f} TFLOP/s bf16, "
                  f"{g['tf32'] / 1e12:.0f} tf32, {g['fp32'] / 1e12:.1f} fp32, {g['sms']} SMs at "
                  f"{g['clock'] / 1e9:.2f} GHz"
                  for g in gs.ARCHS.values()), ""]
    records: list = []
    lines += roofline_table(cases, results, shapes, ranks, records)
    text = "\n".join(lines)
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text + "\n")
    if args.json:
        mma = sorted({(c.op, c.precision, c.arch, gs.mma_kind(results[key])) for c in cases
                      for key, _, _ in c.launches if "error" not in results[key]})
        with open(args.json, "w") as f:
            fp32_proj = [results[key]["loop"]["conversions"] for c in cases for key, _, _ in c.launches
                         if c.op == "project_adam" and c.proj == "fp32" and c.dtype != "fp32"
                         and "error" not in results[key]]
            json.dump(dict(failures=fails, specializations=len(rows), cases=len(cases), mma=mma, roofline=records,
                           loops={key: res.get("loop") for key, res in results.items()},
                           fp32_proj_loop_conversions=max(fp32_proj, default=0)), f, indent=1)
    print(f"\nwritten to {args.out}; {len(fails)} failure(s)")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
