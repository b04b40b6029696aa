"""pytest-benchmark set-up for ``pytest benchmarks/`` (not part of ``pytest tests``).

Each run appends one JSON line to ``benchmarks/results/bench_micro.jsonl``: the date, the
machine, the versions, the backend report, and per benchmark the median with its spread
(IQR, min, max, rounds). ``--benchmark-save=NAME`` additionally keeps pytest-benchmark's own
file under ``.benchmarks/``.
"""
from __future__ import annotations

import datetime
import json
import os

import pytest
import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "bench_micro.jsonl")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _context() -> dict:
    from owlore_kernels.bench.report import machine_info, versions
    from owlore_kernels.ops import backend_report

    return dict(date=datetime.datetime.now().isoformat(timespec="seconds"), device=str(DEVICE),
                machine=machine_info(), versions=versions(), backends=backend_report())


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["owlore"] = _context()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_sessionfinish(session, exitstatus):
    bs = getattr(session.config, "_benchmarksession", None)
    if bs is None or not bs.benchmarks:
        return
    rows = []
    for b in bs.benchmarks:
        s = b.stats
        rows.append(dict(name=b.name, group=b.group, median_ms=s.median * 1e3, iqr_ms=s.iqr * 1e3,
                         min_ms=s.min * 1e3, max_ms=s.max * 1e3, rounds=s.rounds, extra=b.extra_info))
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "a") as f:
        f.write(json.dumps(dict(_context(), benchmarks=rows)) + "\n")
