"""`make microbench`'s regression gate (benchmarks/conftest.py), on a two-benchmark stand-in for
benchmarks/test_microbench.py: `--benchmark-compare-fail` fails a run only on a slower
*gated* benchmark (OwLoreAdamW's step there), only against a run from the same hardware, and
the first run, with nothing to compare with, is saved without failing.

Each run is a pytest subprocess timing `time.sleep` of chosen lengths: 10x apart, so the machine's
noise cannot decide a verdict."""
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAND_IN = '''
import os
import time

import pytest


@pytest.mark.parametrize("which", ["gated", "free"])
def test_sleep(benchmark, which):
    benchmark.extra_info["regression_gate"] = which == "gated"
    benchmark.pedantic(time.sleep, args=(float(os.environ["SLEEP_" + which.upper()]),), rounds=3)
'''
GATE = ["--benchmark-compare", "--benchmark-compare-fail=median:10%"]


def _run(folder, gated_s, free_s, *flags):
    env = dict(os.environ, SLEEP_GATED=str(gated_s), SLEEP_FREE=str(free_s),
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--rootdir={folder}",
           f"--benchmark-storage=file://{folder / 'runs'}", str(folder / "test_stand_in.py"), *flags]
    return subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=300)


def test_compare_fail_gates_only_the_marked_benchmark_on_the_same_hardware(tmp_path):
    pytest.importorskip("pytest_benchmark")
    shutil.copy(os.path.join(ROOT, "benchmarks", "conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_stand_in.py").write_text(STAND_IN)

    first = _run(tmp_path, 0.03, 0.003, "--benchmark-autosave", *GATE)  # nothing saved yet: saved, not failed
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    (saved,) = [os.path.join(d, f) for d, _, files in os.walk(tmp_path / "runs") for f in files]

    free_slower = _run(tmp_path, 0.003, 0.03, *GATE)  # the ungated one 10x slower: passes
    assert free_slower.returncode == 0, free_slower.stdout[-2000:] + free_slower.stderr[-2000:]

    gated_slower = _run(tmp_path, 0.1, 0.003, *GATE)  # the gated one 3x slower: fails
    assert gated_slower.returncode != 0 and "Performance has regressed" in gated_slower.stdout + gated_slower.stderr

    with open(saved) as f:  # the same run, as if saved on another GPU: shown, not enforced
        run = json.load(f)
    run["machine_info"]["gpu"] = "another GPU"
    with open(saved, "w") as f:
        json.dump(run, f)
    other_machine = _run(tmp_path, 0.1, 0.003, *GATE)
    assert other_machine.returncode == 0, other_machine.stdout[-2000:] + other_machine.stderr[-2000:]
