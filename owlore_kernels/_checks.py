"""Argument checks of the fused ops, in one place.

Each op's checks run in its public function (eager, before any tensor is modified) and in
its fake implementation (``torch.compile`` tracing, ``opcheck``), so a bad argument is
reported the same way on every path. The Triton launchers run them too, since
``torch.ops.owlore.*`` and direct launcher calls reach a kernel without the public function.
The module sits beside, not inside, ``ops``: importing ``ops`` loads the backends, which
import the kernels, which import these checks. ``torch._check_value`` / ``torch._check_type`` raise
``ValueError`` / ``TypeError`` in eager mode and become guards or runtime asserts on
symbolic shapes while tracing.
"""
from __future__ import annotations

import torch

SIDES = ("left", "right")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Adam moments: fp32, or bf16 (half the state memory; math still in fp32, stored back
# rounded to nearest even)
STATE_DTYPES = (torch.float32, torch.bfloat16)
# Rows per chunk in the reference paths: about 1M elements, so a bf16 weight's
# fp32 upcast costs a few MB of temporary instead of a full-size copy.
CHUNK_ELEMENTS = 1 << 20


def row_chunks(rows: int, cols: int):
    """Yield ``slice`` objects that cover ``rows`` in chunks of about CHUNK_ELEMENTS elements."""
    step = max(1, CHUNK_ELEMENTS // max(cols, 1))
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


def check_side(side: str) -> None:
    torch._check_value(side in SIDES, lambda: f"side must be one of {SIDES}, got {side!r}")


def check_float(name: str, t: torch.Tensor, dtypes=FLOAT_DTYPES) -> None:
    torch._check_type(isinstance(t, torch.Tensor), lambda: f"{name} must be a torch.Tensor, got {type(t).__name__}")
    torch._check_value(t.dtype in dtypes, lambda: f"{name} must have dtype in {dtypes}, got {t.dtype}")


def check_projection_shapes(side: str, full: torch.Tensor, proj: torch.Tensor, low: torch.Tensor, what: str) -> None:
    """``full`` is m x n; ``proj`` is P (m x r, side='left') or Q (r x n, side='right');
    ``low`` is the subspace tensor: r x n (left) or m x r (right)."""
    torch._check_value(
        full.dim() == 2 and proj.dim() == 2 and low.dim() == 2,
        lambda: f"{what}: expected 2-D tensors, got {tuple(full.shape)}, {tuple(proj.shape)}, {tuple(low.shape)}",
    )
    m, n = full.shape
    if side == "left":
        r = proj.shape[1]
        ok = proj.shape[0] == m and low.shape[0] == r and low.shape[1] == n
        want = f"proj (m, r)=({m}, r) and subspace (r, n)=(r, {n})"
    else:
        r = proj.shape[0]
        ok = proj.shape[1] == n and low.shape[0] == m and low.shape[1] == r
        want = f"proj (r, n)=(r, {n}) and subspace (m, r)=({m}, r)"
    torch._check_value(
        ok,
        lambda: f"{what} side={side!r}: weight {tuple(full.shape)} needs {want}, "
        f"got proj {tuple(proj.shape)} and subspace {tuple(low.shape)}",
    )


def check_same_shape(name: str, t: torch.Tensor, like_name: str, like: torch.Tensor) -> None:
    torch._check_value(
        t.shape == like.shape,
        lambda: f"{name} shape {tuple(t.shape)} != {like_name} shape {tuple(like.shape)}",
    )


def check_same_device(*named: tuple[str, torch.Tensor]) -> None:
    devices = {t.device for _, t in named}
    torch._check_value(
        len(devices) == 1,
        lambda: "all tensors must be on one device, got " + ", ".join(f"{n} on {t.device}" for n, t in named),
    )


def check_unit_interval(name: str, value: float, meaning: str) -> None:
    """``value`` in (0, 1]. Two checks, not a chained comparison: a symbolic value (a traced
    ``tensor.item()``) becomes two runtime asserts instead of a data-dependent guard."""
    torch._check_value(value > 0.0, lambda: f"{name} must be in (0, 1] ({meaning}), got {value}")
    torch._check_value(value <= 1.0, lambda: f"{name} must be in (0, 1] ({meaning}), got {value}")


def check_tensor_scalar(name: str, t: torch.Tensor) -> None:
    """A hyperparameter passed as a tensor (the ops' ``.tensor`` overloads): a 0-dim floating
    CPU tensor, whose value the kernel reads on the host without a device sync."""
    torch._check_type(isinstance(t, torch.Tensor), lambda: f"{name} must be a torch.Tensor, got {type(t).__name__}")
    torch._check_value(
        t.dim() == 0 and t.is_floating_point() and t.device.type == "cpu",
        lambda: f"{name} must be a 0-dim floating CPU tensor, got shape {tuple(t.shape)}, {t.dtype} on {t.device}",
    )


def check_bias_corrections(bias_correction1, bias_correction2) -> None:
    """Each bias correction in (0, 1]: a number by value; a tensor (the ``.tensor`` overload)
    is a 0-dim floating CPU tensor, whose value the kernel checks when it reads it."""
    for k, value in enumerate((bias_correction1, bias_correction2), start=1):
        if isinstance(value, torch.Tensor):
            check_tensor_scalar(f"bias_correction{k}", value)
        else:
            check_unit_interval(f"bias_correction{k}", value, f"1 - beta{k}**t, or 1 for none")


def proj_dtypes(full_dtype: torch.dtype) -> tuple[torch.dtype, ...]:
    """The dtypes a projection matrix may have next to a grad/param of ``full_dtype``: fp32, or
    that 16-bit dtype itself (a 16-bit copy of P lets both GEMM operands reach the tensor cores
    in their storage dtype; the math is then that of the rounded P)."""
    return (torch.float32,) if full_dtype == torch.float32 else (torch.float32, full_dtype)


def check_project_adam_args(grad, proj, exp_avg, exp_avg_sq, out, side, bias_correction1, bias_correction2) -> None:
    """``out`` may be None (the public function allocates it after the checks). The bias
    corrections are numbers, or 0-dim CPU tensors whose values only the kernel reads.
    ``proj``: fp32 or grad's 16-bit dtype; moments: fp32 or bf16 (both the same); ``out``: fp32."""
    check_side(side)
    check_float("grad", grad)
    check_float("proj", proj, proj_dtypes(grad.dtype))
    check_float("exp_avg", exp_avg, STATE_DTYPES)
    check_float("exp_avg_sq", exp_avg_sq, (exp_avg.dtype,))
    written = [("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)] + ([("out", out)] if out is not None else [])
    if out is not None:
        check_float("out", out, (torch.float32,))
    check_projection_shapes(side, grad, proj, exp_avg, "project_adam_")
    for name, t in written[1:]:
        check_same_shape(name, t, "exp_avg", exp_avg)
    check_bias_corrections(bias_correction1, bias_correction2)
    check_same_device(("grad", grad), ("proj", proj), *written)


def check_back_project_update_args(param, proj, norm_update, side, beta=None, alpha=None) -> None:
    """``beta`` and ``alpha`` are checked only when they are tensors (numbers are free).
    ``proj``: fp32 or param's 16-bit dtype; ``norm_update``: fp32."""
    check_side(side)
    for name, value in (("beta", beta), ("alpha", alpha)):
        if isinstance(value, torch.Tensor):
            check_tensor_scalar(name, value)
    check_float("param", param)
    check_float("proj", proj, proj_dtypes(param.dtype))
    check_float("norm_update", norm_update, (torch.float32,))
    check_projection_shapes(side, param, proj, norm_update, "back_project_update_")
    check_same_device(("param", param), ("proj", proj), ("norm_update", norm_update))



# --------------------------------------------------------------------------- multi-tensor ("foreach") ops
#
# One call of a foreach op updates a list of weights, so its checks run once per weight on every
# step and must be cheap: plain comparisons that build a message only on failure. (A
# torch._check_value call costs ~4 us on an AMD EPYC, so 20 of them per weight would cost more
# than the update of a small weight.) Under tracing, comparisons of symbolic sizes become guards,
# as any Python comparison does.


def check_tensor_lists(op: str, named_lists) -> int:
    """Every ``(name, tensors)`` is a list or tuple of tensors, all of the same length; returns it."""
    count, first = None, None
    for name, tensors in named_lists:
        if not isinstance(tensors, (list, tuple)):
            raise TypeError(f"{op}: {name} must be a list of tensors, got {type(tensors).__name__}")
        for i, t in enumerate(tensors):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{op}: {name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
        if count is None:
            count, first = len(tensors), name
        elif len(tensors) != count:
            raise ValueError(f"{op}: {name} has {len(tensors)} tensors but {first} has {count}; "
                             "expected one per weight")
    return count


def check_foreach_scalars(op: str, name: str, values, count: int, columns: tuple[int, ...]) -> None:
    """``values``: the per-weight numbers of one call, a float64 CPU tensor of shape
    (count, c) with c in ``columns``, read on the host by the kernel (no device sync)."""
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(values).__name__}")
    if values.dtype != torch.float64 or values.device.type != "cpu":
        raise ValueError(f"{op}: {name} must be a float64 CPU tensor (read on the host, no device sync), "
                         f"got {values.dtype} on {values.device}")
    if values.dim() != 2 or values.shape[0] != count or values.shape[1] not in columns:
        want = " or ".join(f"({count}, {c})" for c in columns)
        raise ValueError(f"{op}: {name} must have shape {want}, one row per weight, got {tuple(values.shape)}")


def check_foreach_bias_correction_values(op: str, rows) -> None:
    """Each bias correction in (0, 1]; ``rows`` is ``bias_corrections.tolist()``."""
    for i, row in enumerate(rows):
        for k, value in enumerate(row):
            if not 0.0 < value <= 1.0:  # NaN fails too
                raise ValueError(f"{op}: bias_corrections[{i}, {k}] must be in (0, 1] (1 - beta{k + 1}**t, "
                                 f"or 1 for none), got {value}")


def check_amp_scalar(op: str, name: str, value, device) -> None:
    """``grad_scale`` / ``found_inf`` of a foreach op (``torch.amp.GradScaler``'s scale and its
    overflow flag): None, or a floating tensor with exactly one element on ``device`` (the
    weights'; None for an empty call), which the kernels read on their device (no host sync).
    Only metadata is looked at: the value may be a fake tensor (memory traces) or on a GPU."""
    if value is None:
        return
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be None or a torch.Tensor with one element, got "
                        f"{type(value).__name__} {value!r}")
    if value.numel() != 1 or not value.is_floating_point():
        raise ValueError(f"{op}: {name} must be a floating tensor with exactly one element, got shape "
                         f"{tuple(value.shape)} of {value.dtype}")
    if device is not None and value.device != device:
        raise ValueError(f"{op}: {name} is on {value.device}; expected {device}, the device of the weights "
                         "(read inside the kernels, no host sync)")


def _first_dtype(op: str, name: str, tensors, dtypes) -> tuple[torch.dtype, str]:
    """The dtype of ``tensors[0]``, which every tensor of the list must have, and why (for messages)."""
    dtype = tensors[0].dtype
    if dtype not in dtypes:
        raise ValueError(f"{op}: {name}[0] has dtype {dtype}; expected one of {dtypes}")
    return dtype, f"the dtype of {name}[0]: one dtype per list"


def _mismatch(op: str, name: str, i: int, t: torch.Tensor, dtype, why_dtype: str, device, shape=None,
              why_shape=None) -> None:
    """Raise for the first of dtype, device, shape in which ``name[i]`` is not as expected."""
    if t.dtype != dtype:
        raise ValueError(f"{op}: {name}[{i}] has dtype {t.dtype}; expected {dtype} ({why_dtype})")
    if t.device != device:
        raise ValueError(f"{op}: {name}[{i}] is on {t.device}; expected {device} (all tensors of a call on one device)")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name}[{i}] has shape {tuple(t.shape)}; {why_shape()}")
    raise AssertionError(f"{op}: {name}[{i}] was reported as wrong but matches")  # unreachable


def _check_foreach_projection(op: str, side: str, lists, dtypes) -> None:
    """Per weight i. ``lists`` = [(name, tensors)]: the full tensors (m x n), the projections (P
    m x r for side="left", Q r x n for "right"), then the subspace tensors (r x n or m x r);
    ``dtypes`` = [(dtype, why)], one per list. All on the device of the first full tensor."""
    (full_name, fulls), (proj_name, projs), lows = lists[0], lists[1], lists[2:]
    device = fulls[0].device
    left = side == "left"
    (full_dtype, full_why), (proj_dtype, proj_why) = dtypes[0], dtypes[1]
    for i in range(len(fulls)):
        full, proj = fulls[i], projs[i]
        fs, ps = full.shape, proj.shape
        if len(fs) != 2 or len(ps) != 2:
            raise ValueError(f"{op}: {full_name}[{i}] and {proj_name}[{i}] must be 2-D, got shapes "
                             f"{tuple(fs)} and {tuple(ps)}")
        m, n = fs
        if full.dtype != full_dtype or full.device != device:
            _mismatch(op, full_name, i, full, full_dtype, full_why, device)
        if proj.dtype != proj_dtype or proj.device != device or (ps[0] != m if left else ps[1] != n):
            _mismatch(op, proj_name, i, proj, proj_dtype, proj_why, device, (m, ps[1]) if left else (ps[0], n),
                      lambda: f"{full_name}[{i}] {tuple(fs)} with side={side!r} needs "
                              + (f"({m}, r)" if left else f"(r, {n})"))
        low = (ps[1], n) if left else (m, ps[0])
        for (name, tensors), (dtype, why) in zip(lows, dtypes[2:]):
            t = tensors[i]
            if t.dtype != dtype or t.device != device or t.shape != low:
                _mismatch(op, name, i, t, dtype, why, device, low, lambda: (
                    f"{full_name}[{i}] {tuple(fs)} with side={side!r} needs "
                    + (f"(r, {n}) with r = {proj_name}[{i}].shape[1] = {ps[1]}" if left
                       else f"({m}, r) with r = {proj_name}[{i}].shape[0] = {ps[0]}")))


def check_project_adam_foreach_args(grads, projs, exp_avgs, exp_avg_sqs, outs, side, bias_corrections,
                                    grad_scale=None, found_inf=None) -> None:
    """Arguments of ``project_adam_foreach_``: per weight i, those of ``project_adam_`` (grads[i]
    m x n; projs[i] m x r (left) or r x n (right); the moments and outs[i] r x n or m x r); one
    dtype per list (grads fp32/bf16/fp16; projs fp32 or the grads' dtype; moments fp32 or bf16,
    both the same; outs fp32); one device; ``bias_corrections`` a float64 CPU (len, 2) tensor;
    ``grad_scale`` and ``found_inf`` None or one-element floating tensors on that device."""
    op = "project_adam_foreach_"
    lists = [("grads", grads), ("projs", projs), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs),
             ("outs", outs)]
    count = check_tensor_lists(op, lists)
    check_side(side)
    check_foreach_scalars(op, "bias_corrections", bias_corrections, count, (2,))
    device = grads[0].device if count else None
    check_amp_scalar(op, "grad_scale", grad_scale, device)
    check_amp_scalar(op, "found_inf", found_inf, device)
    if count == 0:
        return
    grad_dtype = _first_dtype(op, "grads", grads, FLOAT_DTYPES)
    proj_dtype = _first_dtype(op, "projs", projs, proj_dtypes(grad_dtype[0]))
    state_dtype = _first_dtype(op, "exp_avgs", exp_avgs, STATE_DTYPES)
    _check_foreach_projection(op, side, lists, (grad_dtype, proj_dtype, state_dtype, state_dtype,
                                                (torch.float32, "N is fp32")))


def check_back_project_update_foreach_args(params, projs, norm_updates, side, coefficients, found_inf=None) -> None:
    """Arguments of ``back_project_update_foreach_``: per weight i, those of ``back_project_update_``
    (params[i] m x n; projs[i] m x r or r x n; norm_updates[i] r x n or m x r); one dtype per list
    (params fp32/bf16/fp16; projs fp32 or the params' dtype; norm_updates fp32); one device;
    ``coefficients`` a float64 CPU (len, 2) tensor of (beta, alpha) rows; ``found_inf`` None or a
    one-element floating tensor on that device."""
    op = "back_project_update_foreach_"
    lists = [("params", params), ("projs", projs), ("norm_updates", norm_updates)]
    count = check_tensor_lists(op, lists)
    check_side(side)
    check_foreach_scalars(op, "coefficients", coefficients, count, (2,))
    check_amp_scalar(op, "found_inf", found_inf, params[0].device if count else None)
    if count == 0:
        return
    param_dtype = _first_dtype(op, "params", params, FLOAT_DTYPES)
    proj_dtype = _first_dtype(op, "projs", projs, proj_dtypes(param_dtype[0]))
    _check_foreach_projection(op, side, lists, (param_dtype, proj_dtype, (torch.float32, "N is fp32")))


ADAMW_VARIANTS = ("galore", "torch")


def check_adamw_foreach_args(params, grads, exp_avgs, exp_avg_sqs, variant, coefficients, grad_scale=None,
                             found_inf=None) -> None:
    """Arguments of ``adamw_foreach_``: per weight i, grads[i] and the moments have params[i]'s
    shape (any shape and layout); one dtype per list (params fp32/bf16/fp16 with fp32 or bf16
    moments, or fp64 with fp64 moments; grads the params' dtype); one device; ``coefficients`` a
    float64 CPU (len, 2) or (len, 3) tensor, (len, 3) for variant "torch"; ``grad_scale`` and
    ``found_inf`` None or one-element floating tensors on that device."""
    op = "adamw_foreach_"
    lists = [("params", params), ("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs)]
    count = check_tensor_lists(op, lists)
    if variant not in ADAMW_VARIANTS:
        raise ValueError(f"{op}: variant must be one of {ADAMW_VARIANTS}, got {variant!r}")
    check_foreach_scalars(op, "coefficients", coefficients, count, (3,) if variant == "torch" else (2, 3))
    device = params[0].device if count else None
    check_amp_scalar(op, "grad_scale", grad_scale, device)
    check_amp_scalar(op, "found_inf", found_inf, device)
    if count == 0:
        return
    param_dtype, param_why = _first_dtype(op, "params", params, FLOAT_DTYPES + (torch.float64,))
    state_dtype, state_why = _first_dtype(op, "exp_avgs", exp_avgs,
                                          (torch.float64,) if param_dtype == torch.float64 else STATE_DTYPES)
    grad_why = "the params' dtype"
    device = params[0].device
    for i in range(count):
        param, grad, m, v = params[i], grads[i], exp_avgs[i], exp_avg_sqs[i]
        shape = param.shape
        if param.dtype != param_dtype or param.device != device:
            _mismatch(op, "params", i, param, param_dtype, param_why, device)
        for name, t, dtype, why in (("grads", grad, param_dtype, grad_why), ("exp_avgs", m, state_dtype, state_why),
                                    ("exp_avg_sqs", v, state_dtype, state_why)):
            if t.dtype != dtype or t.device != device or t.shape != shape:
                _mismatch(op, name, i, t, dtype, why, device, shape, lambda: f"expected {tuple(shape)}, as params[{i}]")
