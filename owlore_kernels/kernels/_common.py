"""Helpers shared by the Triton kernels: bf16 bit conversions and launch plumbing.

bf16 is handled as raw 16-bit patterns (an ``int16`` view of the tensor), not via
``.to(tl.bfloat16)``: under ``TRITON_INTERPRET=1`` that cast truncates, while the GPU
and ``torch`` round to nearest even. Doing the rounding with integer operations on
the fp32 bits gives the same bits on both, and costs about 5 integer ops per stored
element on a GPU -- nothing next to the memory traffic of the store itself.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

# W / G dtypes, as a code-path switch the kernels see as a constexpr
KIND_FP32 = 0
KIND_BF16 = 1  # passed as an int16 view; rounded with _fp32_to_bf16_bits_rne
KIND_FP16 = 2  # ``.to(tl.float16)`` is round-to-nearest-even on GPU and in the interpreter


def dtype_kind(t: torch.Tensor) -> int:
    if t.dtype == torch.float32:
        return KIND_FP32
    if t.dtype == torch.bfloat16:
        return KIND_BF16
    if t.dtype == torch.float16:
        return KIND_FP16
    raise ValueError(f"unsupported dtype {t.dtype}; expected float32, bfloat16 or float16")


def as_kernel_arg(t: torch.Tensor) -> torch.Tensor:
    """bf16 tensors travel as an int16 view of the same memory (no copy); others as is."""
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def device_ctx(t: torch.Tensor):
    """Triton launches on the current CUDA device; make it the tensor's (cuda:1 and up)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@triton.jit
def bf16_bits_to_fp32(bits):
    """int16 bf16 pattern -> fp32 (exact: bf16 is the top half of an fp32)."""
    wide = bits.to(tl.uint16, bitcast=True).to(tl.uint32) << 16
    return wide.to(tl.float32, bitcast=True)


@triton.jit
def fp32_to_bf16_bits_rne(x):
    """fp32 -> int16 bf16 pattern, rounded to nearest, ties to even, as torch does.

    Adds 0x7FFF plus the lowest kept bit, then drops the low 16 bits. Infinities pass
    through (0x7F800000 + 0x7FFF keeps the exponent), finite values past the bf16
    maximum round up to infinity, and every NaN becomes 0x7FC0, torch's canonical NaN
    (the addition could otherwise carry a NaN payload into the sign bit).
    """
    bits = x.to(tl.uint32, bitcast=True)
    lsb = (bits >> 16) & 1
    rounded = (bits + 0x7FFF + lsb) >> 16
    rounded = tl.where(x != x, 0x7FC0, rounded)
    return rounded.to(tl.uint16).to(tl.int16, bitcast=True)
