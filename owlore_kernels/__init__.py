"""owlore-kernels: OwLore fine-tuning -- outlier-weighted layer sampling plus
GaLore gradient low-rank projection -- with fused Triton (GPU) and C++ (CPU) kernels.

Public names are imported lazily, so ``import owlore_kernels`` stays cheap and
never pulls in transformers or Triton until they are used.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "OwLoreAdamW": "owlore_kernels.optim",
    "owlore_param_groups": "owlore_kernels.param_groups",
    "OwLoreSampler": "owlore_kernels.sampler",
    "find_decoder_blocks": "owlore_kernels.introspection",
    "outlier_ratio": "owlore_kernels.outliers",
    "block_outlier_ratios": "owlore_kernels.outliers",
    "estimate_memory": "owlore_kernels.estimate",
    "backend_report": "owlore_kernels.ops",
    "owlore_shard_placement": "owlore_kernels.distributed",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'owlore_kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
