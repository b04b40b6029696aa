"""Static GPU check: compile every kernel specialization the launchers produce, for sm_80 and
sm_90, on a machine without a GPU, and read what ptxas made of it.

How: each launcher has a ``*_plan`` twin that returns its launches (kernel, grid, arguments,
constexprs, warps, stages) without running them. Called on ``meta`` tensors of the real
shapes, it gives exactly the specialization a launch would compile (Triton's own
``native_specialize_impl`` turns the arguments into the signature and the divisibility-by-16
attributes). ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` then builds
the cubin, and the ``cuobjdump`` bundled with Triton's nvidia backend reports registers,
stack/local memory (spills), shared memory and the SASS (MMA kind, LDL/STL, instruction counts
of the main loop).

Shapes mostly change runtime arguments only, so many cases share a specialization: they are
deduplicated before compiling, compiled in a process pool, and the per-specialization results
are cached on disk (keyed by the kernel source hash, the specialization and Triton's version).

A specialization fails on: a compile error; a spill in the main loop (LDL/STL there), or more
than ``MAX_SPILL_BYTES`` of stack and local memory in all (a few registers parked outside the
loop cost a store and a load per program, next to a loop of hundreds of instructions run once
per K-step: triton 3.6 parks one 8-byte pair in some variants, 3.9 none); shared memory above
the per-block limit; a tensor-core precision (everything but "ieee", which means exact fp32
products by definition) whose main loop has no HMMA/HGMMA; and,
where both GEMM operands are stored in the dot's 16-bit type (``project_adam`` with P in G's
type), any conversion instruction (F2F/F2FP/I2F/F2I) in the main loop, an HGMMA taking its A
operand from registers instead of a shared-memory descriptor (sm_90), or HMMAs fed without
LDSM (sm_80). An H200 ran kernels with per-K-step operand conversions 2.4-3.5x slower than
cuBLAS; these are the marks of that in the SASS.
"""
from __future__ import annotations

import hashlib
import math
import json
import os
import re
import subprocess
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Optional

import torch
import triton

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 28672)]
RANKS = [64, 128, 256, 512]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# GPU figures used by the check and the roofline (dense, no sparsity; public datasheets)
ARCHS = {
    80: dict(name="A100-SXM4-80GB", sms=108, smem_block=166912, smem_sm=167936, hbm=2.039e12, clock=1.41e9,
             bf16=312e12, tf32=156e12, fp32=19.5e12, l2=40 * 2**20),
    90: dict(name="H200-SXM", sms=132, smem_block=232448, smem_sm=233472, hbm=4.8e12, clock=1.98e9,
             bf16=989e12, tf32=494e12, fp32=67e12, l2=50 * 2**20),
}
# Pass two of outlier_count reads the row segments (512 entries) whose largest score is above
# the cut. For Gaussian weights at M = 5 without column scales an entry is an outlier with
# P(|z| > 5 sqrt(2/pi)) = 6.6e-5, so 3.3 % of segments hold one; real weights with clustered
# outliers read more (at most all: 2 reads of W). The roofline uses the Gaussian figure.
OUTLIER_SEGMENT_FRACTION = 1 - (1 - math.erfc(5 * math.sqrt(2 / math.pi) / math.sqrt(2))) ** 512
NVIDIA_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "owlore_gpu_static")


def tools_missing() -> Optional[str]:
    """Why the check cannot run here, or None."""
    for tool in ("ptxas", "cuobjdump"):
        if not os.access(os.path.join(NVIDIA_BIN, tool), os.X_OK):
            return f"{tool} not found in {NVIDIA_BIN} (Triton's nvidia backend tools)"
    return None


@dataclass
class Case:
    """One launcher call: what it is, and the specializations (keys) its launches compile to."""
    op: str
    shape: tuple
    rank: int
    dtype: str
    side: str
    precision: str  # as resolved
    default: bool  # the precision the launcher picks without dot_precision (for some matmul setting)
    arch: int
    launches: list = field(default_factory=list)  # [(key, grid, launch)]
    proj: str = "fp32"  # P's storage dtype: fp32, or G's 16-bit type (the optimizer's copy on CUDA)


def _spec(launch, arch: int) -> dict:
    """The compile inputs of one launch, as Triton's JIT would derive them."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    fn = launch.kernel
    sig, consts, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in launch.constexprs:
            sig[name] = "constexpr"
            consts[name] = launch.constexprs[name]
            continue
        kind, attr = native_specialize_impl(BaseBackend, launch.args[name], False, True, True)
        sig[name] = kind
        if kind == "constexpr":
            consts[name] = attr
        elif attr == "D":
            attrs[i] = True
    return dict(module=fn.fn.__module__, kernel=fn.fn.__name__, signature=sig, constexprs=consts, divisible=attrs,
                arch=arch, num_warps=launch.num_warps, num_stages=launch.num_stages)


# spilled bytes (stack + local) allowed outside the main loop: 8 registers
MAX_SPILL_BYTES = 32
# bumped when compile_spec() records something new, so that cached results are redone
RESULT_FORMAT = 2


def _key(spec: dict, source_hash: str) -> str:
    blob = json.dumps([spec, source_hash, triton.__version__, RESULT_FORMAT], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def build_cases(shapes=SHAPES, ranks=RANKS, archs=(80, 90)) -> list:
    from owlore_kernels.kernels._common import ALLOWED_DOT_PRECISIONS, resolve_dot_precision
    from owlore_kernels.kernels.back_project_update import back_project_update_plan
    from owlore_kernels.kernels.outlier_count import outlier_count_plan
    from owlore_kernels.kernels.project_adam import project_adam_plan

    meta = torch.device("meta")
    cases = []
    for arch in archs:
        sms = ARCHS[arch]["sms"]
        for (m, n) in shapes:
            for dname, dtype in DTYPES.items():
                w = torch.empty(m, n, dtype=dtype, device=meta)
                for with_scale in (False, True):
                    scale = torch.empty(n, device=meta) if with_scale else None
                    launches = outlier_count_plan([w], 5.0, [scale])[0]
                    cases.append(Case("outlier_count" + ("+scale" if with_scale else ""), (m, n), 0, dname, "-",
                                      "-", True, arch, [(None, l.grid, l) for l in launches]))
                defaults = set()
                for mm in ("highest", "high", "medium"):
                    prev = torch.get_float32_matmul_precision()
                    torch.set_float32_matmul_precision(mm)
                    defaults.add(resolve_dot_precision(dtype, None))
                    torch.set_float32_matmul_precision(prev)
                # P in G's 16-bit type with every allowed precision; an fp32 P with the default one only
                proj_dtypes = [(dname, dtype)] + ([("fp32", torch.float32)] if dtype != torch.float32 else [])
                for r in ranks:
                    for side in ("left", "right"):
                        low = (r, n) if side == "left" else (m, r)
                        mom = torch.empty(low, device=meta)
                        for pname, pdtype in proj_dtypes:
                            p = torch.empty((m, r) if side == "left" else (r, n), dtype=pdtype, device=meta)
                            for prec in ALLOWED_DOT_PRECISIONS[dtype]:
                                if pname == "fp32" and dtype != torch.float32 and prec not in defaults:
                                    continue
                                pa = project_adam_plan(w, p, mom, mom, mom, side, 0.9, 0.999, 1e-8, 0.5, 0.5, prec,
                                                       arch=arch, num_sms=sms, interpret=False)
                                cases.append(Case("project_adam", (m, n), r, dname, side, prec, prec in defaults,
                                                  arch, [(None, l.grid, l) for l in pa], pname))
                                bp = back_project_update_plan(w, p, mom, side, 1.0, -1e-3, prec, arch=arch,
                                                              interpret=False)
                                cases.append(Case("back_project_update", (m, n), r, dname, side, prec,
                                                  prec in defaults, arch, [(None, l.grid, l) for l in bp], pname))
    return cases


def _source_hash(module: str, kernel: str) -> str:
    import importlib
    return getattr(importlib.import_module(module), kernel).cache_key


def _parse_resources(text: str) -> dict:
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    reg, stack, shared, local = (int(x) for x in found.groups())
    return dict(regs=reg, stack=stack, shared_static=shared, local=local)


def _main_loop(sass: str) -> list:
    """Opcodes of the loop (backward branch) holding the most MMA/FFMA work: the K loop."""
    instrs = []
    for line in sass.splitlines():
        ins = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);", line)
        if ins:
            instrs.append((int(ins.group(1), 16), ins.group(2), ins.group(3)))
    is_work = lambda ins: ins[0].startswith(("HMMA", "HGMMA", "FFMA"))
    best = []
    for idx, (addr, op, rest) in enumerate(instrs):
        target = re.match(r"\s*(?:`\()?0x([0-9a-f]+)", rest) if op.startswith("BRA") else None
        if target and int(target.group(1), 16) <= addr:
            start = int(target.group(1), 16)
            body = [(o, r) for a, o, r in instrs if start <= a <= addr]
            if sum(map(is_work, body)) > sum(map(is_work, best)):
                best = body
    return best


# conversions between number formats: in a main loop whose operands are stored in the dot's
# 16-bit type there should be none (an H200 ran 2.4-3.5x slower than cuBLAS with them there)
CONVERSIONS = ("F2F", "F2FP", "I2F", "F2I", "I2FP")


def hgmma_a_from_registers(loop: list) -> int:
    """HGMMAs of the loop whose A operand is a register (``HGMMA.. Rd, Ra, gdesc[..]``) rather than
    a shared-memory descriptor (``HGMMA.. Rd, gdesc[..]``): A then went through registers."""
    return sum(1 for op, rest in loop if op.startswith("HGMMA") and re.match(r"\s*R\d+,\s*R\d+", rest))


def compile_spec(spec: dict) -> dict:
    """Compile one specialization and read its resources and SASS (runs in a worker process)."""
    import importlib

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    os.environ.pop("TRITON_INTERPRET", None)
    fn = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    attrs = {(int(i),): [["tt.divisibility", 16]] for i in spec["divisible"]}
    t0 = time.time()
    try:
        src = ASTSource(fn, spec["signature"], spec["constexprs"], attrs)
        kernel = triton.compile(src, target=GPUTarget("cuda", spec["arch"], 32),
                                options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]})
    except Exception as exc:  # reported as a failure, with the message
        return dict(error=f"{type(exc).__name__}: {str(exc)[:400]}", seconds=time.time() - t0)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        res = subprocess.run([os.path.join(NVIDIA_BIN, "cuobjdump"), "--dump-resource-usage", path],
                             capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([os.path.join(NVIDIA_BIN, "cuobjdump"), "-sass", path],
                              capture_output=True, text=True, check=True).stdout
    out = _parse_resources(res)
    out["shared"] = int(kernel.metadata.shared)  # dynamic shared memory Triton launches with
    ops = re.findall(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass)
    out["ldl_stl"] = sum(o in ("LDL", "STL") for o in ops)
    out["hmma"] = sum(o == "HMMA" for o in ops)
    out["hgmma"] = sum(o == "HGMMA" for o in ops)
    out["ffma"] = sum(o == "FFMA" for o in ops)
    out["instructions"] = len(ops)
    loop = _main_loop(sass)
    ops_in_loop = [o for o, _ in loop]
    out["loop"] = dict(instructions=len(loop), hmma=sum(o.startswith("HMMA") for o in ops_in_loop),
                       hgmma=sum(o.startswith("HGMMA") for o in ops_in_loop),
                       ffma=sum(o.startswith("FFMA") for o in ops_in_loop),
                       ldgsts=sum(o.startswith("LDGSTS") for o in ops_in_loop),
                       ldsm=sum(o.startswith("LDSM") for o in ops_in_loop),
                       ldl_stl=sum(o.split(".")[0] in ("LDL", "STL") for o in ops_in_loop),
                       conversions=sum(o.split(".")[0] in CONVERSIONS for o in ops_in_loop),
                       hgmma_a_registers=hgmma_a_from_registers(loop))
    # wgmma shape (N of m64nNk16) when there is one, for the MMA-rate model
    shapes = re.findall(r"HGMMA\.64x(\d+)x(\d+)", sass)
    out["hgmma_shape"] = shapes[0] if shapes else None
    out["seconds"] = time.time() - t0
    return out


def _blocks_per_sm(arch: int, regs: int, warps: int, shared: int) -> int:
    """Occupancy from registers (allocated per warp in units of 256), shared memory (1 KB
    reserved per block) and the 64-warp / 32-block limits."""
    regs_per_warp = -(-regs * 32 // 256) * 256
    by_regs = 65536 // max(1, regs_per_warp * warps)
    by_smem = ARCHS[arch]["smem_sm"] // (shared + 1024) if shared else 32
    return max(0, min(by_regs, by_smem, 64 // warps, 32))


def run(cases: list, workers: int = 2, cache_dir: Optional[str] = CACHE_DIR, log=print) -> dict:
    """Compile the deduplicated specializations of ``cases``; return {key: result}."""
    specs = {}
    hashes = {}
    for case in cases:
        filled = []
        for _, grid, launch in case.launches:
            spec = _spec(launch, case.arch)
            hk = (spec["module"], spec["kernel"])
            if hk not in hashes:
                hashes[hk] = _source_hash(*hk)
            key = _key(spec, hashes[hk])
            specs[key] = spec
            filled.append((key, grid, launch))
        case.launches = filled
    results, todo = {}, []
    for key, spec in specs.items():
        path = os.path.join(cache_dir, key + ".json") if cache_dir else None
        if path and os.path.exists(path):
            with open(path) as f:
                results[key] = json.load(f)
        else:
            todo.append(key)
    log(f"{len(cases)} cases -> {len(specs)} distinct specializations; {len(specs) - len(todo)} cached, "
        f"compiling {len(todo)} with {workers} workers")
    t0 = time.time()
    if todo:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for key, result in zip(todo, pool.map(compile_spec, [specs[k] for k in todo])):
                results[key] = result
                if cache_dir and "error" not in result:
                    os.makedirs(cache_dir, exist_ok=True)
                    with open(os.path.join(cache_dir, key + ".json"), "w") as f:
                        json.dump(result, f)
    log(f"compiled in {time.time() - t0:.0f} s")
    for key, spec in specs.items():
        res = results[key]
        if "error" in res:
            continue
        res["blocks_per_sm"] = _blocks_per_sm(spec["arch"], res["regs"], spec["num_warps"], res["shared"])
        res["spec"] = spec
    return results


def failures(case: Case, results: dict) -> list:
    out = []
    limit = ARCHS[case.arch]["smem_block"]
    for key, _, _ in case.launches:
        res = results[key]
        if "error" in res:
            out.append(f"compile error: {res['error']}")
            continue
        if res["loop"]["ldl_stl"] or res["stack"] + res["local"] > MAX_SPILL_BYTES:
            out.append(f"spills: STACK {res['stack']} LOCAL {res['local']} LDL/STL {res['ldl_stl']} "
                       f"({res['loop']['ldl_stl']} of them in the main loop)")
        if res["shared"] + res["shared_static"] > limit:
            out.append(f"shared memory {res['shared']} B > {limit} B")
        if case.precision not in ("ieee", "-") and not (res["hmma"] or res["hgmma"]):
            out.append(f"{case.precision} dot without HMMA/HGMMA")
        loop = res["loop"]
        # both operands stored in the dot's 16-bit type (project_adam with P in G's type; back_project_update's
        # N is fp32 and is converted, by design): no conversion in the main loop, operands from shared memory
        if case.precision in ("bf16", "fp16") and case.proj == case.dtype and case.op == "project_adam":
            if loop["conversions"]:
                out.append(f"{loop['conversions']} conversion instructions in a 16-bit main loop")
            if case.arch == 90 and loop["hgmma_a_registers"]:
                out.append(f"{loop['hgmma_a_registers']} HGMMAs take A from registers, not shared memory")
            if case.arch == 80 and loop["hmma"] and not loop["ldsm"]:
                out.append("HMMA operands not loaded from shared memory with LDSM")
        if res["blocks_per_sm"] < 1:
            out.append("does not fit on one SM")
    return out


def mma_kind(res: dict) -> str:
    if res.get("hgmma"):
        return "HGMMA"
    if res.get("hmma"):
        return "HMMA"
    return "FFMA" if res.get("ffma") else "-"


# --------------------------------------------------------------------------- static roofline

def _bytes(dtype: str) -> int:
    return 4 if dtype == "fp32" else 2


def hbm_floor_bytes(m: int, n: int, r: int, dtype: str) -> int:
    """What one GaLore step must move for one weight: read W and G, write W, read and write
    the fp32 moments (r x max(m, n)... the subspace is r x the longer side), read P."""
    b = _bytes(dtype)
    low = r * max(m, n)
    return 3 * m * n * b + 4 * low * 4 + min(m, n) * r * 4


def kernel_bound(case: Case, results: dict) -> dict:
    """Lower bound of one launcher call on case.arch: max(HBM bytes / bandwidth, MMA or FFMA
    work / peak, main-loop warp instructions / (SMs x 4 schedulers x clock))."""
    gpu = ARCHS[case.arch]
    m, n = case.shape
    b = _bytes(case.dtype)
    out = dict(bytes=0, flops=0, issue_s=0.0, mma_s=0.0)
    for key, grid, launch in case.launches:
        res = results[key]
        c = launch.constexprs
        if case.op.startswith("outlier_count"):
            rowmax = grid[0] * c["BLOCK_R"] * 4
            if launch.kernel.fn.__name__ == "_abs_sum_kernel":
                out["bytes"] += m * n * b + rowmax + (n * 4 if "scale" in case.op else 0)
            else:  # pass two reads only the 512-entry row segments that hold an outlier
                out["bytes"] += OUTLIER_SEGMENT_FRACTION * m * n * b + rowmax
            continue
        if case.op == "project_adam":
            rank, length, depth = launch.args["RANK"], launch.args["L"], launch.args["K"]
            tiles = grid[0]
            splits = tiles // (triton.cdiv(rank, c["BLOCK_A"]) * triton.cdiv(length, c["BLOCK_L"]))
            low = rank * length * 4
            out["bytes"] += m * n * b + depth * rank * 4 + 5 * low + (2 * splits * low if splits > 1 else 0)
            flops = 2 * depth * length * triton.cdiv(rank, c["BLOCK_A"]) * c["BLOCK_A"]
            iters = grid[0] * triton.cdiv(triton.cdiv(depth, splits), c["BLOCK_K"])
        else:
            rank = launch.args["K"]
            out["bytes"] += 2 * m * n * b + (m + n) * rank * 4
            flops = 2 * m * n * triton.cdiv(rank, c["BLOCK_K"]) * c["BLOCK_K"]
            iters = grid[0] * triton.cdiv(rank, c["BLOCK_K"])
        dot = c["DOT"]
        peak = gpu["bf16"] if dot in ("bf16", "fp16") else gpu["tf32"] / (3 if dot == "tf32x3" else 1) \
            if dot.startswith("tf32") else gpu["fp32"]
        out["flops"] += flops
        out["mma_s"] += flops / peak
        out["issue_s"] += iters * res["loop"]["instructions"] * launch.num_warps / (gpu["sms"] * 4 * gpu["clock"])
    out["hbm_s"] = out["bytes"] / gpu["hbm"]
    out["bound_s"] = max(out["hbm_s"], out["mma_s"], out["issue_s"])
    out["limit"] = max(("HBM", out["hbm_s"]), ("MMA" if case.precision != "ieee" else "FFMA", out["mma_s"]),
                       ("issue", out["issue_s"]), key=lambda kv: kv[1])[0]
    return out


def galore_torch_bound(m: int, n: int, r: int, dtype: str, arch: int, tf32: bool = False) -> dict:
    """The same model for galore-torch's GaLoreAdamW.step on one weight (std projection,
    weight decay on): its sequence of cuBLAS matmuls and elementwise kernels, each at
    max(bytes / bandwidth, flops / peak), launch gaps not counted. Its P and its moments
    are in G's dtype."""
    gpu = ARCHS[arch]
    b = _bytes(dtype)
    low = r * max(m, n) * b
    full = m * n * b
    p_bytes = min(m, n) * r * b
    peak = gpu["bf16"] if b == 2 else gpu["tf32"] if tf32 else gpu["fp32"]  # fp32 "highest": no tensor cores
    flops = 2 * m * n * r
    kernels = [
        ("project matmul", full + p_bytes + low, flops),
        ("exp_avg.mul_", 2 * low, 0), ("exp_avg.add_", 3 * low, 0),
        ("exp_avg_sq.mul_", 2 * low, 0), ("exp_avg_sq.addcmul_", 3 * low, 0),
        ("sqrt", 2 * low, 0), ("add_(eps)", 2 * low, 0), ("exp_avg / denom", 3 * low, 0),
        ("project_back matmul", p_bytes + low + full, flops),
        ("* scale", 2 * full, 0), ("p.add_(norm_grad)", 3 * full, 0), ("p.add_(p) weight decay", 2 * full, 0),
    ]
    total = sum(max(nb / gpu["hbm"], fl / peak) for _, nb, fl in kernels)
    return dict(bound_s=total, bytes=sum(nb for _, nb, _ in kernels), kernels=len(kernels))
