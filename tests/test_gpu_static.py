"""The static GPU check in CI: every Triton specialization the launchers produce at 4096x11008 and
4096x4096, r = 64/128/512, compiled for sm_80 and sm_90 with the ptxas bundled in Triton (no GPU
needed), must build without spills in the main loop (and at most a few registers parked outside
it), within the shared-memory limit, with HMMA/HGMMA for every
tensor-core precision, and with no conversion in a main loop whose operands are both stored in
the dot's 16-bit type (tools/gpu_static.py's rules). A few minutes of compiling on 2 free cores
(a process pool; results cached in ~/.cache/owlore_gpu_static, so a rerun takes seconds).

It runs ``benchmarks/gpu_static_check.py`` in a subprocess: the suite imports Triton under
``TRITON_INTERPRET=1``, where kernels are interpreter objects that cannot be compiled.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

try:
    import triton
except Exception as exc:
    pytest.skip(f"triton is not importable: {type(exc).__name__}: {exc}", allow_module_level=True)

# tools/gpu_static.py's tools_missing(), without importing the tool into the test process
_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
_MISSING = next((f"{t} not found in {_BIN}" for t in ("ptxas", "cuobjdump")
                 if not os.access(os.path.join(_BIN, t), os.X_OK)), None)
if _MISSING is not None:
    pytest.skip(f"Triton's nvidia backend tools are missing: {_MISSING}", allow_module_level=True)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_static")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    # two shapes and three ranks reach every code path the four shapes and four ranks of the full
    # sweep do (split-K or not, one or several r-tiles, 128- or 64-wide tiles, halves in the epilogue)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_static_check.py"),
                           "--shapes", "4096x11008,4096x4096", "--ranks", "64,128,512",
                           "--out", str(tmp / "table.md"), "--json", str(tmp / "report.json")],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    if not (tmp / "report.json").exists():
        pytest.fail(f"gpu_static_check.py did not finish (rc {proc.returncode}):\n{proc.stdout[-3000:]}"
                    f"\n{proc.stderr[-3000:]}")
    with open(tmp / "report.json") as f:
        return json.load(f), proc


def test_every_specialization_compiles_without_spills_and_uses_tensor_cores(report):
    data, proc = report
    assert not data["failures"], "\n".join(data["failures"][:20])
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert data["specializations"] > 50  # dedupe works, but the sweep is not empty


def test_the_check_sees_what_it_checks(report):
    """The parsed figures are real: 16-bit dots show HGMMA on sm_90 and HMMA on sm_80, the
    exact-fp32 dot FFMA, every GEMM's main loop was found in the SASS, and the conversion count
    sees the per-K-step rounding of an fp32 P (project_adam with fp32 P and bf16 G has some, so
    a 16-bit P's zero is a finding, not a parser that never counts)."""
    data, _ = report
    kinds = {(op, prec, arch): kind for op, prec, arch, kind in data["mma"]}
    for op in ("project_adam", "back_project_update"):
        assert kinds[(op, "bf16", 90)] == "HGMMA" and kinds[(op, "bf16", 80)] == "HMMA"
        assert kinds[(op, "fp16", 90)] == "HGMMA" and kinds[(op, "ieee", 80)] == "FFMA"
    assert all(loop is None or loop["instructions"] > 0 or (loop["hmma"] + loop["hgmma"] + loop["ffma"]) == 0
               for loop in data["loops"].values())
    assert data["fp32_proj_loop_conversions"] > 0


def test_spill_rule_fails_spills_in_the_main_loop_or_beyond_a_few_registers(monkeypatch):
    """The rule on synthetic compile results: registers parked outside the main loop (what
    triton 3.6 does in some variants: 8 bytes, one store and one load) pass; a spill inside the
    main loop, or more than MAX_SPILL_BYTES in all, fails."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_static_rules", os.path.join(ROOT, "tools", "gpu_static.py"))
    gs = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, gs)  # its dataclasses look their module up there
    spec.loader.exec_module(gs)
    case = gs.Case(op="back_project_update", shape=(4096, 4096), rank=128, dtype="fp32", side="left",
                   precision="tf32", default=True, arch=80, launches=[("k", None, None)])

    def result(stack, ldl_stl, in_loop):
        loop = dict(instructions=100, hmma=8, hgmma=0, ffma=0, ldgsts=4, ldsm=4, ldl_stl=in_loop, conversions=0,
                    hgmma_a_registers=0)
        return {"k": dict(regs=200, stack=stack, local=0, shared=1024, shared_static=0, ldl_stl=ldl_stl, hmma=8,
                          hgmma=0, ffma=0, instructions=500, loop=loop, blocks_per_sm=1)}

    assert gs.failures(case, result(0, 0, 0)) == []
    assert gs.failures(case, result(8, 2, 0)) == []
    assert gs.failures(case, result(gs.MAX_SPILL_BYTES, 16, 0)) == []
    assert "spills" in gs.failures(case, result(8, 2, 1))[0]
    assert "spills" in gs.failures(case, result(gs.MAX_SPILL_BYTES + 8, 2, 0))[0]
