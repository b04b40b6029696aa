"""DTensor (FSDP2) helpers that cost nothing where no DTensor exists.

``torch.distributed.tensor`` takes about half a second to import, so it is looked up in
``sys.modules`` instead of imported: a DTensor can exist only once its module is loaded.
"""
from __future__ import annotations

import sys
from typing import Any

import torch

DTENSOR_MODULE = "torch.distributed.tensor"


# A DTensor param keeps its class (``nn.Parameter(dtensor)`` marks the instance instead), so a tensor of
# exactly one of these classes is not one: answered without an isinstance check on the hot paths
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def is_dtensor(t: Any) -> bool:
    """True for a ``torch.distributed.tensor.DTensor``; never imports the module."""
    if type(t) in _PLAIN_TYPES:
        return False
    module = sys.modules.get(DTENSOR_MODULE)
    return module is not None and isinstance(t, module.DTensor)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (no copy), or ``t`` itself."""
    return t.to_local() if is_dtensor(t) else t
