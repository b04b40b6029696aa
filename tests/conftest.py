"""Test set-up: the Triton interpreter on CPU-only machines, a seed per test, a device list."""
import os

import torch

if not torch.cuda.is_available():
    # must be set before any Triton kernel module is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

# torch.compile's on-disk cache (inductor's FX graph cache) is not keyed on the vector ISA that
# ATEN_CPU_CAPABILITY selects: code generated for AVX-512 in one run is reused in a run with
# ATEN_CPU_CAPABILITY=default and fails to compile there. Runs on another CPU code path get
# their own cache (spawned workers inherit it).
if os.environ.get("ATEN_CPU_CAPABILITY"):
    import tempfile

    os.environ.setdefault(
        "TORCHINDUCTOR_CACHE_DIR",
        os.path.join(tempfile.gettempdir(), f"torchinductor_owlore_{os.environ['ATEN_CPU_CAPABILITY']}"),
    )

import pytest  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)
