"""Checks and conversions for ``OwLoreAdamW.load_state_dict``: a checkpoint is validated against the
params it is loaded into before anything is loaded, and galore-torch 1.0 checkpoints are taken over."""
from __future__ import annotations

import copy
from typing import Any, Optional

import torch

from .projector import projection_side, subspace_shape

__all__ = ["is_galore_torch_state", "from_galore_torch", "check_loadable", "check_state_fits"]

# options whose saved value decides the layout of the saved state: a checkpoint whose groups differ
# from this optimizer's there describes other tensors (torch.optim would silently take the saved value)
_LAYOUT_OPTIONS = ("rank", "proj_type")


def is_galore_torch_state(state_dict: dict[str, Any]) -> bool:
    """True for a galore-torch ``GaLoreAdamW.state_dict()``: its GaLore params' state holds a
    ``projector`` object (``GaLoreProjector``) instead of tensors ``proj_left`` / ``proj_right``."""
    return any("projector" in s for s in state_dict.get("state", {}).values())


def from_galore_torch(state_dict: dict[str, Any], groups: list[dict[str, Any]]) -> dict[str, Any]:
    """An OwLoreAdamW state dict that continues a galore-torch 1.0 ``GaLoreAdamW`` run in ``groups``
    (this optimizer's param groups, which tell each param's shape and projection side).

    galore-torch keeps, per GaLore weight, ``step`` (updates done), ``exp_avg`` / ``exp_avg_sq`` in
    the subspace (in the gradient's dtype) and ``projector.ortho_matrix``: P (m x r) where it projects
    on the left, Q (r x n) on the right, in the gradient's dtype. Its side rule and its refresh rule
    (at updates done = 0, gap, 2 gap, ...) are OwLoreAdamW's, so the moments, the basis and the count
    carry over; 16-bit moments (plain params' too) and the basis become fp32 (exact: every bf16/fp16 value is an fp32 value). Its
    two-sided ``full`` projector raises. The input is not modified; shapes are checked afterwards by
    ``check_loadable``.
    """
    out = {"state": {}, "param_groups": copy.deepcopy(state_dict["param_groups"])}
    where = {key: (p, group) for saved_group, group in zip(state_dict["param_groups"], groups)
             for key, p in zip(saved_group["params"], group["params"])}
    for key, saved in state_dict["state"].items():
        state = {name: value for name, value in saved.items() if name != "projector"}
        projector = saved.get("projector")
        if projector is not None:
            basis = getattr(projector, "ortho_matrix", None)
            proj_type = getattr(projector, "proj_type", None)
            if basis is None or proj_type not in ("std", "reverse_std", "left", "right") or key not in where:
                raise ValueError(
                    f"galore-torch checkpoint: param {key} has a projector with proj_type={proj_type!r} and "
                    f"{'no' if basis is None else 'a'} basis; only std / reverse_std / left / right projectors "
                    "with a computed basis, of params this optimizer holds, can be taken over"
                )
            p, _ = where[key]
            side = projection_side(p.shape, proj_type)
            state["proj_left" if side == "left" else "proj_right"] = torch.as_tensor(basis).float()
        for name in ("exp_avg", "exp_avg_sq"):  # galore-torch keeps them in the gradient's dtype
            if isinstance(state.get(name), torch.Tensor) and state[name].dtype in (torch.bfloat16, torch.float16):
                state[name] = state[name].float()
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = int(state["step"].item())
        out["state"][key] = state
    return out


def check_loadable(groups: list[dict[str, Any]], state_dict: dict[str, Any]) -> None:
    """Raise ``ValueError`` if ``state_dict`` does not fit the params of ``groups`` (this optimizer's
    groups): group and param counts, layout options (rank, proj_type) per group, and per param the
    shapes and dtypes of the moments and bases. Names the param, what was expected and what was found.
    Modifies nothing."""
    saved_groups = state_dict.get("param_groups")
    if saved_groups is None or "state" not in state_dict:
        raise ValueError("load_state_dict: expected a dict with 'state' and 'param_groups' (an optimizer state_dict)")
    if len(saved_groups) != len(groups):
        raise ValueError(f"load_state_dict: the checkpoint has {len(saved_groups)} param groups, this optimizer "
                         f"{len(groups)}")
    index = 0
    for group_index, (saved_group, group) in enumerate(zip(saved_groups, groups)):
        if len(saved_group["params"]) != len(group["params"]):
            raise ValueError(f"load_state_dict: param group {group_index} has {len(saved_group['params'])} params "
                             f"in the checkpoint and {len(group['params'])} here")
        for option in _LAYOUT_OPTIONS:
            if option in saved_group and saved_group[option] != group[option]:
                raise ValueError(
                    f"load_state_dict: param group {group_index} has {option}={saved_group[option]!r} in the "
                    f"checkpoint but {option}={group[option]!r} here; its state was made for the former. Build "
                    f"the optimizer with {option}={saved_group[option]!r} to resume"
                )
        for key, p in zip(saved_group["params"], group["params"]):
            saved = state_dict["state"].get(key)
            if saved:
                _check_param_state(saved, p, group, f"param {index} (param group {group_index}, shape "
                                                    f"{tuple(p.shape)})", "load_state_dict: ", "in the checkpoint")
            index += 1


def check_state_fits(state: dict[str, Any], p: torch.Tensor, group: dict[str, Any], where: str) -> None:
    """Raise ``ValueError`` if the optimizer state of ``p`` does not fit it and its group (a step
    checks this before any param moves, so state that went stale raises with nothing updated): the
    checkpoint's checks, and every state tensor on ``p``'s device. With these the fused ops' own
    argument checks hold for the optimizer's calls (``optim.GaloreBatch`` relies on it)."""
    _check_param_state(state, p, group, where, "OwLoreAdamW.step: ", "in the state", device=p.device)


# Adam moments the fused ops take: fp32 or bf16 (fp64 for fp64 plain params), the two of one dtype
_MOMENT_DTYPES = (torch.float32, torch.bfloat16)


def _check_param_state(saved: dict[str, Any], p: torch.Tensor, group: dict[str, Any], where: str, prefix: str,
                       found_in: str, device: Optional[torch.device] = None) -> None:
    def expect(name: str, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...]) -> None:
        value = saved.get(name)
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{prefix}{where} has no tensor {name!r} {found_in} (keys: {sorted(saved)})")
        if value.shape != shape:
            raise ValueError(f"{prefix}{where}: {name} has shape {tuple(value.shape)} {found_in}, "
                             f"expected {tuple(shape)}")
        if value.dtype not in dtypes:
            raise ValueError(f"{prefix}{where}: {name} is {value.dtype} {found_in}, expected one of {dtypes}")
        if device is not None and value.device != device:
            raise ValueError(f"{prefix}{where}: {name} is on {value.device} {found_in} but the param is on {device}; "
                             "move the optimizer state with the model (or load the checkpoint after moving it)")

    if not isinstance(saved.get("step"), int) or isinstance(saved.get("step"), bool):
        raise ValueError(f"{prefix}{where}: step is {saved.get('step')!r} {found_in}, expected an int")
    moment_dtypes = (torch.float64,) if group["rank"] is None and p.dtype == torch.float64 else _MOMENT_DTYPES
    if group["rank"] is None:
        for name in ("exp_avg", "exp_avg_sq"):
            expect(name, p.shape, moment_dtypes)
        _check_same_moment_dtype(saved, where, prefix, found_in)
        return
    if p.dim() != 2:
        raise ValueError(f"{prefix}{where} is in a GaLore group but is not 2-D")
    m, n = p.shape
    rank = min(group["rank"], m, n)
    side = projection_side(p.shape, group["proj_type"])
    low = subspace_shape(p.shape, rank, side)
    for name in ("exp_avg", "exp_avg_sq"):
        expect(name, low, moment_dtypes)
    _check_same_moment_dtype(saved, where, prefix, found_in)
    if side in ("left", "full"):
        expect("proj_left", (m, rank), (torch.float32,))
    if side in ("right", "full"):
        expect("proj_right", (rank, n), (torch.float32,))


def _check_same_moment_dtype(saved: dict[str, Any], where: str, prefix: str, found_in: str) -> None:
    if saved["exp_avg"].dtype != saved["exp_avg_sq"].dtype:
        raise ValueError(f"{prefix}{where}: exp_avg is {saved['exp_avg'].dtype} and exp_avg_sq "
                         f"{saved['exp_avg_sq'].dtype} {found_in}; the two moments must share a dtype")
