"""Helpers shared by the Triton kernels: bf16 bit conversions and launch plumbing.

bf16 is handled as raw 16-bit patterns (an ``int16`` view of the tensor), not via
``.to(tl.bfloat16)``: under ``TRITON_INTERPRET=1`` that cast truncates, while the GPU
and ``torch`` round to nearest even. Doing the rounding with integer operations on
the fp32 bits gives the same bits on both, and costs about 5 integer ops per stored
element on a GPU -- nothing next to the memory traffic of the store itself.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Optional

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


# --------------------------------------------------------------------------- dot precision

# How tl.dot multiplies. The first three keep fp32 operands (tl.dot's input_precision);
# "bf16"/"fp16" round both operands to that type and accumulate in fp32 on tensor cores.
DOT_PRECISIONS = ("ieee", "tf32x3", "tf32", "bf16", "fp16")
# what an explicit dot_precision may be, per G (or W) dtype: a 16-bit operand is multiplied
# in its own type or exactly ("ieee"); rounding it to tf32 or the other 16-bit type buys nothing
ALLOWED_DOT_PRECISIONS = {
    torch.float32: ("ieee", "tf32x3", "tf32"),
    torch.bfloat16: ("bf16", "ieee"),
    torch.float16: ("fp16", "ieee"),
}
_FP32_MATMUL_TO_DOT = {"highest": "ieee", "high": "tf32x3", "medium": "tf32"}


def resolve_dot_precision(operand_dtype: torch.dtype, dot_precision: Optional[str]) -> str:
    """The dot precision for one call (read at every call, like cuBLAS reads torch's setting).

    * explicit ``dot_precision`` wins;
    * bf16 / fp16 operand (G, or W for the back-projection): that type's tensor-core dot with
      fp32 accumulation -- what galore-torch's cuBLAS matmul does with its bf16 P, except that
      R stays fp32 here instead of being rounded to bf16 on output;
    * fp32: ``torch.get_float32_matmul_precision()`` as cuBLAS reads it: "highest" -> exact
      fp32 products (FFMA, no tensor cores), "high" -> tf32x3 (three tf32 passes, ~fp32
      accuracy), "medium" -> tf32.
    """
    if dot_precision is not None:
        allowed = ALLOWED_DOT_PRECISIONS.get(operand_dtype, DOT_PRECISIONS)
        if dot_precision not in allowed:
            raise ValueError(f"dot_precision must be one of {allowed} or None for {operand_dtype} operands, "
                             f"got {dot_precision!r}")
        return dot_precision
    if operand_dtype == torch.bfloat16:
        return "bf16"
    if operand_dtype == torch.float16:
        return "fp16"
    return _FP32_MATMUL_TO_DOT[torch.get_float32_matmul_precision()]


def interpreting() -> bool:
    """True under Triton's CPU interpreter, read per launch (the env var is set before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def target_arch(t: torch.Tensor) -> int:
    """Compute capability as 80 / 90 for config choice; 90 under the interpreter (one config)."""
    if t.is_cuda:
        major, minor = torch.cuda.get_device_capability(t.device)
        return 10 * major + minor
    return 90


_SM_COUNTS: dict = {}


def sm_count(t: torch.Tensor) -> int:
    """Streaming multiprocessors of t's GPU (132 on H100/H200 SXM) -- sizes split-K grids."""
    if not t.is_cuda:
        return 132
    idx = t.device.index if t.device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNTS:
        _SM_COUNTS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNTS[idx]


@dataclass
class Launch:
    """One kernel launch, fully decided: what the launcher runs and what the static check compiles."""
    kernel: object
    grid: tuple
    args: dict  # runtime arguments by name (tensors, ints, floats), in the kernel's order
    constexprs: dict
    num_warps: int
    num_stages: int

    def run(self) -> None:
        self.kernel[self.grid](*self.args.values(), **self.constexprs,
                               num_warps=self.num_warps, num_stages=self.num_stages)


@triton.jit
def round_fp32_to_bf16_values(x):
    """fp32 -> the nearest bf16 value, kept in fp32 (ties to even). Emulates ``.to(tl.bfloat16)``
    in the interpreter, whose cast truncates; products of two such values are exact in fp32,
    so an fp32 dot of them equals a bf16 tensor-core dot with fp32 accumulation up to order."""
    return bf16_bits_to_fp32(fp32_to_bf16_bits_rne(x))
