"""The one benchmark harness: a timer, a machine/version stamp, an append-only results writer,
and a way to keep galore-torch from refreshing its projection while it is being timed.

Every benchmark script imports these instead of keeping its own copy::

    from owlore_kernels.bench.harness import (append_results, frozen_galore_refresh, machine_stamp,
                                              markdown_table, time_fn, time_interleaved)

    stamp = machine_stamp()
    with frozen_galore_refresh():
        timings = time_interleaved({"a": step_a, "b": step_b}, repeats=15, warmup=3)
    rows = [{"candidate": k, **t.summary()} for k, t in timings.items()]
    append_results(RESULTS, "my_bench", rows=rows, stamp=stamp, command="python benchmarks/my_bench.py",
                   table=markdown_table(["candidate", "median ms"], [[r["candidate"], f"{r['median']:.2f}"]
                                                                   for r in rows]))

* **Timer.** ``time_fn(fn, repeats=, warmup=, device=)`` runs ``fn`` ``warmup`` times untimed,
  then ``repeats`` timed runs, and returns a :class:`Timing` (samples in milliseconds; median,
  p10/p90, min/max). On CUDA each run is bracketed by CUDA events (optionally after flushing
  the L2 cache, ``flush_l2=True``); elsewhere by ``time.perf_counter``. ``time_interleaved``
  times several candidates round-robin, rotating the order every round, so a noisy neighbour
  on a shared machine slows them all alike and their ratios stay meaningful.
* **Stamp.** ``machine_stamp()``: date, git commit (``+dirty`` when the package or csrc/ differ
  from it), CPU model, cores, torch threads, memory, GPU, load average, and the versions of
  torch, triton, transformers, peft, galore-torch, bitsandbytes, numpy and owlore-kernels.
* **Results.** ``append_results(folder, name, ...)`` appends one JSON line to
  ``<folder>/<name>.jsonl`` and one dated markdown section to ``<folder>/<name>.md``; files are
  only ever opened for appending. ``unique_stem`` picks a file name that does not exist yet,
  for outputs that are whole files (figures, per-run reports).
* **Frozen refresh.** ``frozen_galore_refresh()`` replaces galore-torch's exact-SVD
  ``get_orthogonal_matrix`` by a seeded random orthonormal basis of the same shape for the
  duration of a ``with`` block: the first step (which refreshes) then costs milliseconds
  instead of seconds, and with ``update_proj_gap`` larger than the steps run the timed steps
  never refresh. What is timed -- the projected Adam step -- does not depend on which
  orthonormal basis it projects onto.
"""
from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

__all__ = [
    "Timing", "quantile", "time_fn", "time_interleaved", "machine_info", "versions", "git_commit",
    "machine_stamp", "stamp_line", "markdown_table", "append_results", "unique_stem", "frozen_galore_refresh",
]

# the distributions named in the stamp; None where not installed
VERSIONED = ("torch", "triton", "transformers", "peft", "galore-torch", "bitsandbytes", "numpy", "owlore-kernels")
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ----------------------------------------------------------------------------- timer
def quantile(samples: Sequence[float], q: float) -> float:
    """The ``q``-quantile of ``samples`` as the sample at rank ``round(q (n - 1))`` of the sorted list.

    A nearest-rank rule: the result is always a measured value. With the 5-50 samples a
    benchmark takes, interpolating between two neighbours would only pretend to more precision.
    """
    if not samples:
        raise ValueError("quantile of an empty list of samples")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


@dataclass
class Timing:
    """Timed samples of one candidate, in milliseconds, in the order they were taken."""

    samples_ms: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def p10(self) -> float:
        return quantile(self.samples_ms, 0.1)

    @property
    def p90(self) -> float:
        return quantile(self.samples_ms, 0.9)

    @property
    def min(self) -> float:
        return min(self.samples_ms)

    @property
    def max(self) -> float:
        return max(self.samples_ms)

    def summary(self) -> dict[str, Any]:
        """median, p10, p90, min, max (ms), the number of samples and the samples themselves."""
        return {"median": self.median, "p10": self.p10, "p90": self.p90, "min": self.min, "max": self.max,
                "repeats": len(self.samples_ms), "samples_ms": list(self.samples_ms)}


class _L2Flusher:
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
    ``time.perf_counter``. ``flush_l2`` (CUDA only) clears the L2 cache before every timed run.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if not candidates:
        raise ValueError("no candidates to time")
    import torch

    device = torch.device(device)
    on_cuda = device.type == "cuda"
    if flush_l2 and not on_cuda:
        raise ValueError(f"flush_l2=True needs a CUDA device, got device={device}")
    flush = _L2Flusher(device) if flush_l2 else None
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
                t0 = time.perf_counter()
                fn()
                timings[name].samples_ms.append((time.perf_counter() - t0) * 1e3)
    return timings


def time_fn(fn: Callable[[], object], *, repeats: int, warmup: int = 1, device: Any = "cpu",
            flush_l2: bool = False) -> Timing:
    """Time one callable: ``warmup`` untimed runs, then ``repeats`` timed ones (see ``time_interleaved``)."""
    return time_interleaved({"fn": fn}, repeats=repeats, warmup=warmup, device=device, flush_l2=flush_l2)["fn"]


# ----------------------------------------------------------------------------- stamp
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, platform, python, torch threads, GPU and the load average now."""
    mem = None
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    info: dict[str, Any] = dict(platform=platform.platform(), python=platform.python_version(), cpu=_cpu_model(),
                                cpu_count=os.cpu_count(), memory_bytes=mem)
    try:  # other work on the machine makes timings noisy: record how busy it was
        info["load_average_1_5_15m"] = [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        pass
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
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
    if out["owlore-kernels"] is None:
        import owlore_kernels

        out["owlore-kernels"] = owlore_kernels.__version__ + " (source tree)"
    return out


def git_commit() -> str:
    """The checkout's short commit, ``+dirty`` if the package or csrc/ differ from it; "unknown" outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=_ROOT, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "csrc", "owlore_kernels"], cwd=_ROOT,
                               capture_output=True, timeout=10).returncode
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_stamp() -> dict[str, Any]:
    """Where, when and with what a benchmark ran: date, commit, machine and versions."""
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
                   extra: Optional[Mapping[str, Any]] = None) -> tuple[str, str]:
    """Append one run to ``<folder>/<name>.jsonl`` (stamp, command, rows, extra) and ``<folder>/<name>.md``.

    The markdown section is a heading from ``stamp_line``, the command, the load average at the
    start (from the stamp) and now, ``notes``, then ``table``. Earlier runs are never rewritten.
    Returns the two paths.
    """
    os.makedirs(folder, exist_ok=True)
    jsonl, md = os.path.join(folder, name + ".jsonl"), os.path.join(folder, name + ".md")
    record = dict(stamp=dict(stamp), command=command, rows=list(rows))
    if extra:
        record.update(extra)
    with open(jsonl, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")  # str: dtypes, devices, paths
    head = " ".join(x for x in ((f"`{command}`;" if command else ""), _load_text(stamp), notes) if x)
    with open(md, "a") as f:
        f.write(f"\n## {stamp_line(stamp)}\n\n" + (head + "\n\n" if head else "") + table.rstrip("\n") + "\n")
    return jsonl, md


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
