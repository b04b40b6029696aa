"""Helpers shared by the Triton kernels: tile order, rounding stores, pointer tables, launches.

The GEMM kernels load every tensor in its storage dtype (bf16 loads straight into the dot)
and store with ``.to(dtype)``, which is round to nearest even on the GPU (``cvt.rn``). Two
things differ under ``TRITON_INTERPRET=1``, and only there (the ``EMULATE`` constexpr of each
kernel): its fp32 -> bf16 cast truncates, so stores first round the fp32 value to the nearest
bf16 value with integer operations on its bits (``round_fp32_to_bf16_values``, after which the
truncating cast is exact); and its ``tl.dot`` of two bf16 tensors multiplies their raw bit
patterns, so emulated dots upcast both operands to fp32 first (exact) and multiply in fp32.

``outlier_count`` still reads bf16 as an ``int16`` view (``as_kernel_arg``, ``bf16_bits_to_fp32``).
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


def interpreter_problem(triton_version: str, numpy_version: str) -> Optional[str]:
    """Why the interpreter of this Triton cannot run the kernels with this numpy, or None.

    Triton before 3.7 turns a loop bound computed in the kernel into a Python int with
    ``int()`` of a 1-element array, which numpy 2.4 and later refuse ("only 0-dimensional
    arrays can be converted to Python scalars"); every GEMM kernel has such a loop. Compiled
    kernels on a GPU are not affected.
    """
    from torch.torch_version import TorchVersion  # compares version strings with tuples

    if TorchVersion(triton_version) < (3, 7) and TorchVersion(numpy_version) >= (2, 4):
        return (f"the Triton interpreter (TRITON_INTERPRET=1) of triton {triton_version} cannot run loops with "
                f"bounds computed in the kernel under numpy {numpy_version}: use triton >= 3.7 or numpy < 2.4")
    return None


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


@triton.jit
def grouped_tile(pid, num_rows, num_cols, GROUP: tl.constexpr):
    """(row, col) of tile ``pid`` in grouped order: GROUP consecutive programs walk down one
    column of tiles before moving right, so programs that run together share the column's
    operand panel and GROUP row panels in L2 (triton tutorial 03's GROUP_SIZE_M)."""
    per_group = GROUP * num_cols
    first_row = (pid // per_group) * GROUP
    rows_here = tl.minimum(num_rows - first_row, GROUP)
    row = first_row + (pid % per_group) % rows_here
    col = (pid % per_group) // rows_here
    return row, col


@triton.jit
def wrapped_offsets(tile, size, BLOCK: tl.constexpr, VEC: tl.constexpr):
    """``tile * BLOCK + arange(BLOCK)`` wrapped into [0, size): loads of an edge tile re-read
    valid rows instead of needing a mask (the stores mask with the unwrapped offsets). VEC
    (a power of two dividing ``size``, from the launcher) tells the compiler that runs of VEC
    offsets are contiguous and start at a multiple of VEC, which stays true after the wrap."""
    offs = (tile * BLOCK + tl.arange(0, BLOCK)) % size
    return tl.max_contiguous(tl.multiple_of(offs, VEC), VEC)


def vector_width(size: int, limit: int = 16) -> int:
    """Largest power of two <= limit dividing ``size`` (the VEC of ``wrapped_offsets``)."""
    vec = 1
    while vec < limit and size % (2 * vec) == 0:
        vec *= 2
    return vec


@triton.jit
def store_rounded(ptrs, x, mask, EMULATE: tl.constexpr):
    """Store fp32 ``x`` in the pointers' dtype, rounded to nearest even on every target."""
    if EMULATE and ptrs.dtype.element_ty == tl.bfloat16:
        x = round_fp32_to_bf16_values(x)  # the interpreter's cast truncates; this value is exact in bf16
    tl.store(ptrs, x.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def unless_found_inf(mask, found_inf_ptr):
    """``mask`` where ``torch.amp.GradScaler``'s one-element found_inf is 0, else all False (NaN
    is not 0: skipped too). Loaded by every program: no host sync. A select, not ``mask & flag``:
    the interpreter cannot AND a scalar i1 with a block."""
    return tl.where(tl.load(found_inf_ptr) == 0, mask, False)


@triton.jit
def table_pointer(row_ptr, column: tl.constexpr, like):
    """Column ``column`` of an int64 pointer-table row, as a pointer of ``like``'s type, 16-byte
    aligned (``check_aligned`` on the host): without the hint every load would be scalar."""
    return tl.multiple_of(tl.load(row_ptr + column).to(like.dtype), 16)


@triton.jit
def table_scalar(row_ptr, column: tl.constexpr):
    """Column ``column`` of an int64 table row holding an fp64 bit pattern, as fp32."""
    return tl.load(row_ptr + column).to(tl.float64, bitcast=True).to(tl.float32)


def pointer_table(rows: list, scalars, device: torch.device) -> torch.Tensor:
    """One int64 row per weight: its tensors' addresses, then its per-weight scalars (float64
    bit patterns), uploaded in one small host-to-device copy. ``non_blocking`` from pageable
    memory: CUDA stages the bytes before returning, so the host list may die, and there is no
    device sync."""
    table = torch.tensor(rows, dtype=torch.int64)
    if scalars is not None:
        table = torch.cat([table, torch.as_tensor(scalars, dtype=torch.float64).reshape(len(rows), -1)
                           .view(torch.int64)], dim=1)
    return table.to(device, non_blocking=True) if device.type == "cuda" else table


def span_elements(t: torch.Tensor) -> int:
    """Largest element offset a kernel reaches in ``t`` from its data pointer (its strided extent)."""
    return sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))


def signature(t: torch.Tensor) -> tuple:
    """What a kernel specialization and a launch plan depend on: shape, strides, dtype."""
    return (tuple(t.shape), t.stride(), t.dtype)


def group_by(keys) -> dict:
    """{key: [indices with that key]}, in order of first appearance."""
    groups: dict = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return groups


def stream_key(device: torch.device) -> tuple:
    """(device, current stream): cached buffers that kernels write are per stream."""
    return (str(device), torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0)


def check_aligned(tensors) -> None:
    """Addresses read from a pointer table carry a 16-byte alignment hint (vector loads);
    torch's allocators give 256+ bytes, so only an offset view can miss it."""
    for t in tensors:
        if t.data_ptr() % 16:
            raise ValueError(f"a {t.dtype} tensor of shape {tuple(t.shape)} starts at an address that is not "
                             f"16-byte aligned (a view with a storage offset?); the multi-tensor kernels need it")


def run_foreach(plans: dict, tensors: list, rows: list, key: tuple, make_plan, columns: int, pointer_args: tuple,
                scalar_args: dict) -> None:
    """Launch a multi-tensor op: one launch per group of weights whose tensors have equal shapes,
    strides and dtypes.

    ``tensors[i]``: weight i's tensors in the kernel's table-column order; ``rows[i]``: its
    scalars (table columns after the addresses); ``scalar_args``: the arguments every group of
    the call shares (numbers, and GradScaler's one-element tensors when given), passed per call,
    never kept in a plan; ``key`` must say which of those tensors are given (the plans'
    constexpr flags). ``make_plan(first weight's tensors, count,
    stand-in table)`` returns a group's launches; they are cached in ``plans`` by the lists'
    signatures, ``key`` (the call's options), the stream and the interpreter flag, and keep no
    reference to a call's tensors. Per call: one address table and one upload per group; the
    kernel gets the group's first tensors as its typed pointer arguments (``pointer_args``).
    """
    device = tensors[0][0].device
    signatures = tuple(tuple(signature(t) for t in ts) for ts in tensors)
    full_key = (signatures, key, stream_key(device), interpreting())
    groups = plans.get(full_key)
    if groups is None:
        groups = []
        for indices in group_by(signatures).values():
            stand_in = torch.empty((len(indices), columns), dtype=torch.int64, device=device)
            plan = make_plan(tensors[indices[0]], len(indices), stand_in)
            groups.append((indices, [launch.without_tensors() for launch in plan]))
        plans[full_key] = groups
    for ts in tensors:
        check_aligned(ts)  # the kernels assume 16-byte aligned addresses from the table
    with device_ctx(tensors[0][0]):
        for indices, plan in groups:
            table = pointer_table([[t.data_ptr() for t in tensors[i]] for i in indices], [rows[i] for i in indices],
                                  device)
            call = dict(zip(pointer_args, tensors[indices[0]]), table_ptr=table, **scalar_args)
            for launch in plan:
                unused = {k: table for k, v in launch.args.items() if v is None and k not in call}  # never read
                launch.run_with(**unused, **call)


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

    def run_with(self, **args) -> None:
        """Run with some runtime arguments replaced (a cached plan, this call's tensors)."""
        self.kernel[self.grid](*{**self.args, **args}.values(), **self.constexprs,
                               num_warps=self.num_warps, num_stages=self.num_stages)

    def without_tensors(self) -> "Launch":
        """A copy that keeps only the plan's own buffers (workspace, counters): a cached plan must
        not keep a call's gradients alive. ``run_with`` supplies the call's tensors."""
        own = {id(v) for k, v in self.args.items() if k in ("ws_ptr", "sem_ptr")}
        call = {id(v) for k, v in self.args.items() if k not in ("ws_ptr", "sem_ptr") and isinstance(v, torch.Tensor)}
        args = {k: (None if isinstance(v, torch.Tensor) and (id(v) in call or id(v) not in own) else v)
                for k, v in self.args.items()}
        return Launch(self.kernel, self.grid, args, self.constexprs, self.num_warps, self.num_stages)


@triton.jit
def dot_values(x, DOT: tl.constexpr):
    """Interpreter only: ``x`` as the fp32 values a ``DOT`` tensor-core dot multiplies (bf16 /
    fp16 operands rounded to nearest even; a 16-bit ``x`` is already such values, exactly)."""
    x = x.to(tl.float32)
    if DOT == "bf16":
        x = round_fp32_to_bf16_values(x)
    elif DOT == "fp16":
        x = x.to(tl.float16).to(tl.float32)  # numpy's cast: round to nearest even
    return x


@triton.jit
def mma(a, b, acc, DOT: tl.constexpr, EMULATE: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation, multiplied as ``DOT`` says.

    On the GPU a 16-bit operand that is already in the dot's type goes from its load straight
    into the tensor cores (the ``.to`` is no instruction); an fp32 operand of a 16-bit dot is
    rounded in registers (cvt.rn), once per K-step. Under the interpreter (EMULATE), whose
    bf16 dot multiplies bit patterns, both operands become their exact fp32 values and the
    products are formed in fp32 -- exact for 16-bit values, so the result equals the tensor
    cores' up to the order of the fp32 sums.
    """
    if EMULATE:
        acc = tl.dot(dot_values(a, DOT), dot_values(b, DOT), acc, input_precision="ieee")
    elif DOT == "bf16":
        acc = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
    elif DOT == "fp16":
        acc = tl.dot(a.to(tl.float16), b.to(tl.float16), acc)
    else:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=DOT)
    return acc


@triton.jit
def round_fp32_to_bf16_values(x):
    """fp32 -> the nearest bf16 value, kept in fp32 (ties to even). Emulates ``.to(tl.bfloat16)``
    in the interpreter, whose cast truncates; products of two such values are exact in fp32,
    so an fp32 dot of them equals a bf16 tensor-core dot with fp32 accumulation up to order."""
    return bf16_bits_to_fp32(fp32_to_bf16_bits_rne(x))
