"""End-to-end fine-tuning benchmark: full AdamW, LoRA, GaLore, LISA and OwLore, side by side.

Run it with ``python -m owlore_kernels bench`` (``make bench``); ``run_bench(cfg)`` is the same
from Python. Modules: ``data`` (embedded arithmetic dataset), ``methods`` (the five methods,
from their real libraries, and the exact memory accounting), ``worker`` (one method's run in
its own process), ``driver`` (the parent), ``report`` (table, JSON, markdown, PNG).
"""
from .driver import DEFAULTS, run_bench  # noqa: F401
from .methods import METHODS  # noqa: F401
