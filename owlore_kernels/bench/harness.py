"""What pytest-benchmark does not do for this project's benchmarks, as a thin layer over it.

pytest-benchmark owns the timing loop, the statistics (``pytest_benchmark.stats.Stats``: min,
max, mean, stddev, median, quartiles, outliers), the machine and commit info and the JSON
storage (one file per run, ``pytest-benchmark compare`` reads them); ``benchmarks/test_microbench.py``
uses it directly (``make microbench``). This module adds only what it cannot do:

* **Interleaving.** ``time_interleaved(candidates, repeats=, warmup=, device=, flush_l2=)``
  times several candidates round-robin, the order rotating every round, so a noisy neighbour
  on a shared machine slows them all alike and their ratios stay meaningful (pytest-benchmark
  times one candidate after another). Timer: pytest-benchmark's ``default_timer``
  (``time.perf_counter``), CUDA events on CUDA. Each candidate's samples come back as a
  :class:`Timing`, whose statistics are pytest-benchmark's ``Stats`` plus p10/p90.
* **The GPU in a pytest-benchmark test.** ``run_pedantic(benchmark, fn, device=, rounds=,
  warmup_rounds=)``: on CUDA every round is ``fn`` then ``torch.cuda.synchronize()``, after an
  untimed setup that overwrites a 256 MiB buffer (flushing the L2 cache) and synchronizes;
  elsewhere the plain wall clock.
* **The machine.** ``machine_info()``: pytest-benchmark's machine info (platform, Python,
  py-cpuinfo's CPU) plus what it leaves out (GPU, memory, torch threads, library versions);
  ``benchmarks/conftest.py`` adds the same to pytest-benchmark's saved runs.
  ``machine_stamp()`` adds the date, the commit and the load average, for the scripts.
* **A readable history.** ``append_results(folder, name, ...)`` saves the run through
  pytest-benchmark's file storage (``<folder>/<name>/<machine id>/NNNN_<commit>_<time>.json``,
  with the script's own rows beside pytest-benchmark's fields) and appends a dated markdown
  section to ``<folder>/<name>.md``; nothing is rewritten. ``unique_stem`` picks a file name
  that does not exist yet, for outputs that are whole files.
* **Frozen refresh.** ``frozen_galore_refresh()`` replaces galore-torch's exact-SVD
  ``get_orthogonal_matrix`` by a seeded random orthonormal basis for the duration of a ``with``
  block, so a timed galore-torch step has no SVD in it.

Typical script::

    from owlore_kernels.bench.harness import (append_results, benchmark_entry, frozen_galore_refresh,
                                              machine_stamp, markdown_table, time_interleaved)

    stamp = machine_stamp()
    with frozen_galore_refresh():
        timings = time_interleaved({"a": step_a, "b": step_b}, repeats=15, warmup=3)
    rows = [{"candidate": k, **t.summary()} for k, t in timings.items()]
    append_results(RESULTS, "my_bench", rows=rows, stamp=stamp, command="python benchmarks/my_bench.py",
                   table=markdown_table(["candidate", "median ms"], [[r["candidate"], f"{r['median']:.2f}"]
                                                                   for r in rows]),
                   benchmarks=[benchmark_entry("my_bench", k, t) for k, t in timings.items()])
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import importlib.metadata
import os
import platform
import subprocess
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

__all__ = [
    "Timing", "quantile", "time_interleaved", "run_pedantic", "L2Flusher", "machine_info", "extra_machine_info",
    "same_machine", "versions", "git_commit", "machine_stamp", "stamp_line", "markdown_table", "benchmark_entry",
    "append_results", "unique_stem", "frozen_galore_refresh",
]

# the distributions named in the stamp; None where not installed
VERSIONED = ("torch", "triton", "transformers", "peft", "galore-torch", "bitsandbytes", "numpy", "pytest-benchmark",
             "owlore-kernels")
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ----------------------------------------------------------------------------- statistics
def quantile(samples: Sequence[float], q: float) -> float:
    """The ``q``-quantile of ``samples`` as the sample at rank ``round(q (n - 1))`` of the sorted list.

    A nearest-rank rule: the result is always a measured value. With the 5-50 samples a
    benchmark takes, interpolating between two neighbours would only pretend to more precision.
    (pytest-benchmark's ``Stats`` has the quartiles but no p10/p90.)
    """
    if not samples:
        raise ValueError("quantile of an empty list of samples")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


@dataclass
class Timing:
    """Timed samples of one candidate, in milliseconds, in the order they were taken.

    The statistics are pytest-benchmark's (``stats``, in seconds as it stores them), built
    from the samples when read, so samples added later are counted.
    """

    samples_ms: list[float] = field(default_factory=list)

    @property
    def stats(self):
        """The samples as a ``pytest_benchmark.stats.Stats`` (seconds)."""
        from pytest_benchmark.stats import Stats

        stats = Stats()
        for ms in self.samples_ms:
            stats.update(ms / 1e3)
        return stats

    @property
    def median(self) -> float:
        return self.stats.median * 1e3

    @property
    def p10(self) -> float:
        return quantile(self.samples_ms, 0.1)

    @property
    def p90(self) -> float:
        return quantile(self.samples_ms, 0.9)

    @property
    def min(self) -> float:
        return self.stats.min * 1e3

    @property
    def max(self) -> float:
        return self.stats.max * 1e3

    def summary(self) -> dict[str, Any]:
        """median, p10, p90, min, max, mean, stddev, q1, q3, iqr (ms), the number of samples and the samples."""
        stats = self.stats
        out = {"median": stats.median * 1e3, "p10": self.p10, "p90": self.p90}
        out.update({k: getattr(stats, k) * 1e3 for k in ("min", "max", "mean", "stddev", "q1", "q3", "iqr")})
        out.update(repeats=len(self.samples_ms), samples_ms=list(self.samples_ms))
        return out


# ----------------------------------------------------------------------------- timers
class L2Flusher:
    """Overwrites a 256 MiB buffer, larger than any current GPU's L2 (50 MiB on an H100/H200),
    so the next timed run reads its inputs from HBM, as a real training step does."""

    def __init__(self, device):
        import torch

        self.buffer = torch.empty(64 * 2**20, dtype=torch.float32, device=device)

    def __call__(self) -> None:
        self.buffer.zero_()


def time_interleaved(candidates: Mapping[str, Callable[[], object]], *, repeats: int, warmup: int = 1,
                     device: Any = "cpu", flush_l2: bool = False) -> dict[str, Timing]:
    """Time every candidate ``repeats`` times, round-robin, the order rotating each round.

    Each candidate first runs ``warmup`` times untimed (allocations, lazy state, compiles).
    ``device``: where the candidates run; on CUDA each run is bracketed by CUDA events recorded
    on the current stream (the device is synchronized before the first timed run), elsewhere by
    pytest-benchmark's ``default_timer``. ``flush_l2`` (CUDA only) clears the L2 cache before
    every timed run. A single candidate is timed the same way (nothing to interleave).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if not candidates:
        raise ValueError("no candidates to time")
    import torch
    from pytest_benchmark.timers import default_timer

    device = torch.device(device)
    on_cuda = device.type == "cuda"
    if flush_l2 and not on_cuda:
        raise ValueError(f"flush_l2=True needs a CUDA device, got device={device}")
    flush = L2Flusher(device) if flush_l2 else None
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    if on_cuda:
        torch.cuda.synchronize(device)
    names = list(candidates)
    timings = {name: Timing() for name in names}
    for rep in range(repeats):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            fn = candidates[name]
            if flush is not None:
                flush()
            if on_cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                timings[name].samples_ms.append(start.elapsed_time(end))
            else:
                t0 = default_timer()
                fn()
                timings[name].samples_ms.append((default_timer() - t0) * 1e3)
    return timings


def run_pedantic(benchmark, fn: Callable[[], object], *, device: Any, rounds: int, warmup_rounds: int):
    """Time ``fn`` with pytest-benchmark's ``benchmark.pedantic`` (one call per round) on ``device``.

    CPU: the wall clock around ``fn``. CUDA: an untimed setup flushes the L2 cache and
    synchronizes, then the timed round is ``fn`` followed by ``torch.cuda.synchronize()``,
    so the round ends when the GPU's work does (launch overhead included, as in training).
    Records the timer used in ``benchmark.extra_info["timer"]``; returns ``fn``'s last result.
    Under ``--benchmark-disable`` ``fn`` runs once (with the setup), untimed.
    """
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        benchmark.extra_info["timer"] = "wall clock (time.perf_counter)"
        return benchmark.pedantic(fn, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
    flush = L2Flusher(device)

    def setup():
        flush()
        torch.cuda.synchronize(device)

    def synced():
        result = fn()
        torch.cuda.synchronize(device)
        return result

    benchmark.extra_info["timer"] = "wall clock to torch.cuda.synchronize(), L2 flushed before each round"
    return benchmark.pedantic(synced, setup=setup, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)


# ----------------------------------------------------------------------------- machine
@functools.lru_cache(maxsize=1)
def _pytest_benchmark_machine_info() -> dict[str, Any]:
    # py-cpuinfo takes ~1 s; the machine does not change within a process
    from pytest_benchmark.plugin import pytest_benchmark_generate_machine_info

    return pytest_benchmark_generate_machine_info()


def extra_machine_info() -> dict[str, Any]:
    """What pytest-benchmark's machine info leaves out: cores, memory, torch threads, GPU, versions.

    ``benchmarks/conftest.py`` adds this to every saved ``make microbench`` run.
    """
    mem = None
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    info: dict[str, Any] = dict(cpu_count=os.cpu_count(), memory_bytes=mem, gpu=None)
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    info["versions"] = versions()
    return info


def same_machine(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two pytest-benchmark machine infos (with ``extra_machine_info``) describe the same
    hardware: CPU model, cores, memory in whole GiB and GPU. Clock readings, kernel and versions
    may differ (the memory the kernel reports moves by a few hundred KiB between boots of one VM)."""
    def key(info):
        cpu = info.get("cpu") or {}
        mem = info.get("memory_bytes")
        return (cpu.get("brand_raw") if isinstance(cpu, Mapping) else cpu, info.get("cpu_count"),
                None if mem is None else round(mem / 2**30), info.get("gpu"))

    return key(a) == key(b)


def machine_info() -> dict[str, Any]:
    """A flat summary of the machine now, from pytest-benchmark's machine info and
    ``extra_machine_info``: platform, python, cpu (model), cpu_count, memory_bytes,
    torch_threads, gpu and the load average. (``append_results`` saves pytest-benchmark's full
    machine info, py-cpuinfo's CPU details included, with each run.)"""
    base = _pytest_benchmark_machine_info()
    cpu = base.get("cpu") or {}
    extra = extra_machine_info()
    extra.pop("versions")
    info: dict[str, Any] = dict(platform=f"{base['system']}-{base['release']}-{base['machine']}",
                                python=base["python_version"], cpu=cpu.get("brand_raw") or platform.machine(),
                                **extra)
    try:  # other work on the machine makes timings noisy: record how busy it was
        info["load_average_1_5_15m"] = [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        pass
    return info


def versions() -> dict[str, Optional[str]]:
    """Installed versions of the libraries a benchmark depends on (None: not installed)."""
    out: dict[str, Optional[str]] = {}
    for dist in VERSIONED:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    # torch's own version keeps the build tag (2.11.0+cu130, 2.13.0+cpu) that its wheel's
    # metadata may drop: on a GPU machine it names the CUDA build
    import torch

    out["torch"] = torch.__version__
    if out["owlore-kernels"] is None:
        import owlore_kernels

        out["owlore-kernels"] = owlore_kernels.__version__ + " (source tree)"
    return out


def git_commit() -> str:
    """The checkout's short commit, ``+dirty`` if the package or csrc/ differ from it; "unknown" outside git.

    Narrower than pytest-benchmark's ``dirty`` (any tracked change): appending results to
    benchmarks/results/ does not make the next run's code look modified.
    """
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=_ROOT, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "csrc", "owlore_kernels"], cwd=_ROOT,
                               capture_output=True, timeout=10).returncode
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_stamp() -> dict[str, Any]:
    """Where, when and with what a benchmark ran: date, commit, machine (``machine_info()``) and versions."""
    return dict(date=datetime.datetime.now().isoformat(timespec="seconds"), commit=git_commit(),
                machine=machine_info(), versions=versions())


def stamp_line(stamp: Mapping[str, Any]) -> str:
    """One line for a markdown heading: date, CPU, cores, GPU, versions, commit."""
    m, v = stamp["machine"], stamp["versions"]
    libs = ", ".join(f"{k} {v[k]}" for k in ("torch", "triton", "transformers", "galore-torch", "owlore-kernels")
                     if v.get(k))
    gpu = f", {m['gpu']}" if m.get("gpu") else ""
    return f"{stamp['date']} — {m['cpu']}, {m['cpu_count']} cores{gpu}; {libs} ({stamp['commit']})"


# ----------------------------------------------------------------------------- results
def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; cells are str()-ed and their "|" escaped."""
    def cell(x: Any) -> str:
        return str(x).replace("|", "/")

    lines = ["| " + " | ".join(map(cell, headers)) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
    return "\n".join(lines)


def benchmark_entry(group: str, name: str, timing: Timing, *, params: Optional[Mapping[str, Any]] = None,
                    extra_info: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """One timed candidate as an entry of a pytest-benchmark saved run (``"benchmarks"`` list).

    ``fullname`` is ``"<group>::<name>"``: ``pytest-benchmark compare`` matches runs by it.
    """
    stats = timing.stats
    return {"group": group, "name": name, "fullname": f"{group}::{name}", "params": dict(params or {}),
            "param": None, "extra_info": dict(extra_info or {}), "options": {"timer": "time_interleaved"},
            "stats": {**stats.as_dict(), "data": list(stats.data), "iterations": 1}}


def _load_text(stamp: Mapping[str, Any]) -> str:
    start = stamp["machine"].get("load_average_1_5_15m")
    now = None
    try:
        now = round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        pass
    if start is None or now is None:
        return ""
    return (f"load average {start[0]} at the start, {now} at the end (above {stamp['machine']['cpu_count']} "
            "means other processes shared the cores).")


def append_results(folder: str, name: str, *, rows: Sequence[Mapping[str, Any]], stamp: Mapping[str, Any],
                   table: str, command: Optional[str] = None, notes: str = "",
                   extra: Optional[Mapping[str, Any]] = None,
                   benchmarks: Sequence[Mapping[str, Any]] = ()) -> tuple[str, str]:
    """Save one run with pytest-benchmark's file storage and append it to ``<folder>/<name>.md``.

    The JSON (``<folder>/<name>/<machine id>/NNNN_<tag>.json``) holds pytest-benchmark's
    fields -- ``machine_info`` (with ``extra_machine_info``), ``commit_info``, ``datetime``,
    ``version``, ``benchmarks`` (``benchmark_entry`` dicts: ``pytest-benchmark --storage
    <folder>/<name> compare`` tabulates them across runs) -- plus ``stamp``, ``command``,
    ``notes``, ``rows`` and ``extra``. The markdown section is a heading from ``stamp_line``,
    the command, the load average at the start (from the stamp) and now, ``notes``, then
    ``table``. Earlier runs are never rewritten. Returns the two paths.
    """
    from pytest_benchmark import __version__ as pytest_benchmark_version
    from pytest_benchmark.logger import Logger
    from pytest_benchmark.utils import get_commit_info, get_machine_id, get_tag
    from pytest_benchmark.storage.file import FileStorage

    os.makedirs(folder, exist_ok=True)
    machine = {**_pytest_benchmark_machine_info(), **extra_machine_info()}
    record = dict(machine_info=machine, commit_info=get_commit_info(), benchmarks=list(benchmarks),
                  datetime=datetime.datetime.now(datetime.timezone.utc).isoformat(), version=pytest_benchmark_version,
                  stamp=dict(stamp), command=command, notes=notes, rows=list(rows))
    if extra:
        record.update(extra)
    storage = FileStorage(os.path.join(folder, name), logger=Logger(Logger.QUIET), default_machine_id=get_machine_id())
    before = set(storage.query())
    storage.save(record, get_tag())
    (json_path,) = set(storage.query()) - before
    md = os.path.join(folder, name + ".md")
    head = " ".join(x for x in ((f"`{command}`;" if command else ""), _load_text(stamp), notes) if x)
    with open(md, "a") as f:
        f.write(f"\n## {stamp_line(stamp)}\n\n" + (head + "\n\n" if head else "") + table.rstrip("\n") + "\n")
    return str(json_path), md


def unique_stem(stem: str, extensions: Sequence[str]) -> str:
    """``stem``, or ``stem_2``, ``stem_3``, ...: the first for which no ``stem + ext`` exists for any ext.

    For outputs that are whole files (a figure, a per-run report): a second run writes next to
    the first instead of over it.
    """
    candidate, k = stem, 1
    while any(os.path.exists(candidate + ext) for ext in extensions):
        k += 1
        candidate = f"{stem}_{k}"
    return candidate


# ----------------------------------------------------------------------------- galore-torch
@contextlib.contextmanager
def frozen_galore_refresh(seed: int = 0) -> Iterator[None]:
    """Within the block, galore-torch's projector refresh returns a seeded random orthonormal basis.

    ``GaLoreProjector.get_orthogonal_matrix`` (an exact SVD: ~37 s at 4096 x 11008 on 2 CPU
    cores) is replaced by the Q factor of a Gaussian matrix drawn from a CPU generator seeded
    with ``seed``, of galore-torch's shape (``left``: m x k, ``right``: k x n, ``full``: both;
    k = min(rank, m, n)), moved to the weight's device and dtype. The original is restored on
    exit, also after an exception. The timed steps of a benchmark must still not refresh: give
    the group an ``update_proj_gap`` larger than the steps run.
    """
    import torch
    from galore_torch.galore_projector import GaLoreProjector

    original = GaLoreProjector.get_orthogonal_matrix

    def random_basis(self, weights, rank, type):  # noqa: A002  (galore-torch's argument name)
        m, n = weights.shape
        k = min(rank, m, n)
        gen = torch.Generator().manual_seed(seed)
        like = dict(device=weights.device, dtype=weights.dtype)
        if type == "left":
            return torch.linalg.qr(torch.randn(m, k, generator=gen)).Q.to(**like)
        if type == "right":
            return torch.linalg.qr(torch.randn(n, k, generator=gen)).Q.t().contiguous().to(**like)
        if type == "full":
            left = torch.linalg.qr(torch.randn(m, k, generator=gen)).Q.to(**like)
            right = torch.linalg.qr(torch.randn(n, k, generator=gen)).Q.t().contiguous().to(**like)
            return [left, right]
        raise ValueError(f"type should be left, right or full, got {type!r}")

    GaLoreProjector.get_orthogonal_matrix = random_basis
    try:
        yield
    finally:
        GaLoreProjector.get_orthogonal_matrix = original
