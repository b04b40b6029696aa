"""The static GPU check in CI: every Triton specialization the launchers produce at 4096x11008 and
4096x4096, r = 64/128/512, compiled for sm_80 and sm_90 with the ptxas bundled in Triton (no GPU
needed), must build without spills, within the shared-memory limit, with HMMA/HGMMA for every
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
