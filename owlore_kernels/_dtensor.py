"""DTensor (FSDP2) helpers that cost nothing where no DTensor exists.

``torch.distributed.tensor`` takes about half a second to import, so it is looked up in
``sys.modules`` instead of imported: a DTensor can exist only once its module is loaded.
"""
from __future__ import annotations

import sys
from typing import Any

import torch

DTENSOR_MODULE = "torch.distributed.tensor"


def is_dtensor(t: Any) -> bool:
    """True for a ``torch.distributed.tensor.DTensor``; never imports the module."""
    module = sys.modules.get(DTENSOR_MODULE)
    return module is not None and isinstance(t, module.DTensor)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (no copy), or ``t`` itself."""
    return t.to_local() if is_dtensor(t) else t
