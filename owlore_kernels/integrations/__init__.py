"""Optional integrations with training frameworks.

* ``owlore_kernels.integrations.transformers.OwLoreCallback`` -- a
  ``transformers.TrainerCallback`` that calls ``OwLoreSampler.step()`` at the
  start of every optimizer step (needs ``pip install transformers``).

Nothing here is imported by ``import owlore_kernels``; ``OwLoreCallback`` is
also reachable as ``owlore_kernels.integrations.OwLoreCallback`` (imported on
first use, so a missing transformers only fails there).
"""
from __future__ import annotations

import importlib
from typing import Any

__all__ = ["OwLoreCallback"]


def __getattr__(name: str) -> Any:
    if name == "OwLoreCallback":
        return importlib.import_module(".transformers", __name__).OwLoreCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
