"""Warnings that point at the user's line, not at this package's or torch's internals."""
from __future__ import annotations

import os
import sys
import warnings

import torch

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))


def warn_at_caller(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` with the stacklevel of the first frame outside owlore_kernels and torch.

    A fixed stacklevel is wrong as soon as the same check is reached by two paths (a param group
    passed to the constructor goes through ``torch.optim.Optimizer.__init__``; one passed to
    ``add_param_group`` does not), so the frames are counted instead.
    """
    frame, level = sys._getframe(1), 1
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if not (path.startswith(_PACKAGE_DIR) or path.startswith(_TORCH_DIR)):
            break
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level + 1)
