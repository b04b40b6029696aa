"""pytest-benchmark settings for ``benchmarks/test_microbench.py``.

* Saved runs carry what pytest-benchmark's machine info leaves out (cores, memory, torch threads,
  GPU, library versions: ``harness.extra_machine_info``), the load average at the end of the run
  and which backend each op dispatches to.
* ``--benchmark-compare-fail`` (``make microbench`` passes ``median:10%``) is enforced only on
  the benchmarks marked ``extra_info["regression_gate"]`` (OwLoreAdamW's step), and only when
  the compared run is from the same hardware (``harness.same_machine``: CPU model, cores,
  memory, GPU): another machine's timings are shown beside this run's, not held against it. With
  no earlier run to compare with (the first ``make microbench``) this run is only saved.
"""
from __future__ import annotations

import os

from owlore_kernels.bench import harness


def pytest_addoption(parser):
    parser.addoption("--microbench-rounds", type=int, default=None,
                     help="timed rounds per microbenchmark (default: 20 on CPU, 50 on CUDA)")


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info.update(harness.extra_machine_info())


def pytest_benchmark_update_json(config, benchmarks, output_json):
    from owlore_kernels.ops import backend_report

    try:  # other work on the machine makes timings noisy: record how busy it was
        output_json["load_average_1_5_15m"] = [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        pass
    output_json["backends"] = backend_report()


class _GatedCheck:
    """One of pytest-benchmark's ``--benchmark-compare-fail`` checks, applied to gated benchmarks only."""

    def __init__(self, check):
        self.check = check

    def fails(self, current, compared):
        if not current.extra_info.get("regression_gate"):
            return None
        return self.check.fails(current, compared)


def pytest_benchmark_compare_machine_info(config, benchmarksession, machine_info, compared_benchmark):
    if not benchmarksession.compare_fail:
        return
    if harness.same_machine(machine_info, compared_benchmark["machine_info"]):
        benchmarksession.compare_fail = [_GatedCheck(c) for c in benchmarksession.compare_fail]
        return
    benchmarksession.logger.warning(
        "the compared run is from other hardware (CPU model, cores, memory or GPU differ): its timings are shown, "
        "--benchmark-compare-fail is not enforced")
    benchmarksession.compare_fail = []


def pytest_sessionstart(session):
    bs = getattr(session.config, "_benchmarksession", None)
    if bs is not None and bs.compare_fail and not bs.compared_mapping:
        bs.logger.warning("no earlier saved run to compare with: this run is saved, --benchmark-compare-fail "
                          "is not enforced")
        bs.compare_fail = []
