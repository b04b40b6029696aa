"""Test set-up: the Triton interpreter on CPU-only machines, a seed per test, a device list."""
import os

import torch

if not torch.cuda.is_available():
    # must be set before any Triton kernel module is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)
