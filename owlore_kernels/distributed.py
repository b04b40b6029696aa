"""OwLoreAdamW on sharded params: FSDP2 (``torch.distributed.fsdp.fully_shard``).

FSDP2 hands the optimizer DTensor params, each sharded over a 1-D device mesh
of W ranks by rows (``Shard(0)``, the default, uneven shards included) or by
columns (``Shard(1)``, through ``fully_shard(shard_placement_fn=...)``; FSDP2
requires those to split evenly). GaLore runs on the local shard and never
gathers a full gradient. Per m x n weight at rank r, W ranks, one step:

===============  ===========================  ==============================================
placement, side  projection                   collective (on the param's mesh)
===============  ===========================  ==============================================
Shard(0), right  R_l = G_l Q^T, local          none
Shard(1), left   R_l = P^T G_l, local          none
Shard(0), left   R = sum_l P_l^T G_l           reduce-scatter r x n, all-gather N (r x n)
Shard(1), right  R = sum_l G_l Q_l^T           reduce-scatter m x r, all-gather N (m x r)
full             P^T G Q^T partial sums        all-reduce r x r
===============  ===========================  ==============================================

The fused ops (``project_adam_``, ``back_project_update_``) run on the local
shards. Adam moments are DTensors sharded like the subspace allows: a right
side's m x r moments by rows (``Shard(0)``), a left side's r x n moments by
columns (``Shard(1)``: reduce-scattering R, then all-gathering N, moves the
same bytes as the all-reduce that replicated moments would need, and hands
each rank only its columns, so moments cost r n / W per rank instead of
r n: for Llama-2-70B at r=128, whose
down_proj (8192 x 28672), k_proj and v_proj (1024 x 8192) are left-projected,
0.46 GB per rank on 8 ranks instead of 3.7 GB replicated), the r x r moments of
``full`` replicated. Bases are sharded along the param's sharded dim when they
have it (P by rows under Shard(0), Q by columns under Shard(1)) and replicated
otherwise. ``owlore_shard_placement`` shards every left-projected weight by
columns so that step() needs no communication at all between refreshes.

The refresh is ``proj_method="randomized"``: the range finder of
``owlore_kernels.projector`` fed with three products of the sharded gradient
(G X, G^T Y, B^T G), each one local GEMM plus one collective of a tall-skinny
m x k or n x k (or k x n) matrix, k = r + oversample. Omega is drawn whole
from the same seed on every rank, so the basis is the one-process basis up to
the sums' rounding order. ``proj_method="svd"`` on a sharded param raises: an
exact SVD needs the whole m x n gradient on some rank (a 4096 x 11008 fp32
gradient is 180 MB; with 8 ranks each holds 22 MB of it).
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Iterable, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from ._dtensor import is_dtensor
from .ops.back_project_update import back_project_update_
from .ops.project_adam import adam_normalized_, project_adam_, project_reference
from .projector import projection_side, randomized_svd_of_operator, refresh_seed, subspace_shape
from .update_rule import galore_coefficients, new_galore_state, nonfinite_refresh_error, refresh_due

# torch.distributed.tensor is imported where a DTensor is at hand, not here: it takes ~0.5 s

__all__ = ["owlore_shard_placement", "check_param_layout", "galore_update_sharded"]


# ------------------------------------------------------------------ checks
def check_param_layout(p: torch.Tensor, group: dict[str, Any], group_index: int, index: int) -> None:
    where = f"param {index} (param group {group_index}, shape {tuple(p.shape)})"
    galore = group.get("rank") is not None
    if hasattr(p, "ds_id") or hasattr(p, "ds_numel") or (galore and p.dim() == 1):
        what = "a flat 1-D tensor in a GaLore group" if p.dim() == 1 else "a tensor with DeepSpeed's ds_* attributes"
        raise ValueError(
            f"{where} is {what} (rank={group.get('rank')}): it looks like a DeepSpeed ZeRO partition (or an FSDP1 "
            "flat parameter). ZeRO stages 1-3 and FSDP1 flatten the params into 1-D partitions, and GaLore needs "
            "each weight's 2-D shape to project its gradient. Use FSDP2 (torch.distributed.fsdp.fully_shard), "
            "which OwLoreAdamW supports, or DeepSpeed with ZeRO stage 0."
        )
    if p.grad is None:
        return
    if not is_dtensor(p):
        if is_dtensor(p.grad):
            raise ValueError(f"{where} is a plain tensor but its grad is a DTensor; shard both or neither")
        return
    if not is_dtensor(p.grad):
        raise ValueError(f"{where} is a DTensor but its grad is a plain tensor of shape {tuple(p.grad.shape)}")
    if p.grad.placements != p.placements or p.grad.device_mesh != p.device_mesh:
        raise ValueError(
            f"{where} has placements {p.placements} but its grad has {p.grad.placements}; OwLoreAdamW updates "
            "each shard in place and needs the grad sharded like the param"
        )
    if not galore:
        return  # plain AdamW is elementwise: any placement works on the local shards
    placements = tuple(p.placements)
    from torch.distributed.tensor import Shard

    if p.device_mesh.ndim != 1 or placements not in ((Shard(0),), (Shard(1),)):
        raise ValueError(
            f"{where} is a DTensor with placements {placements} on a {p.device_mesh.ndim}-D mesh; the sharded GaLore "
            "step supports a 1-D mesh with Shard(0) (fully_shard's default) or Shard(1) (owlore_shard_placement). "
            "Put this weight in a group without rank (plain AdamW works with any placement)."
        )
    if group["proj_method"] != "randomized":
        m, n = p.shape
        raise ValueError(
            f"proj_method={group['proj_method']!r} in param group {group_index} cannot refresh the sharded {where}: "
            f"an exact SVD needs the whole {m} x {n} gradient ({m * n * 4:,} bytes in fp32) gathered on "
            "every rank. Use proj_method='randomized', which runs on the shards and exchanges only m x k and "
            "k x n sketches (k = rank + oversample)."
        )


# -------------------------------------------------------------- collectives
class _MeshAxis:
    """The ranks a DTensor is sharded over, and torch.chunk's split of a dim among them."""

    def __init__(self, mesh: Any):
        self.group = mesh.get_group(0)
        self.size = mesh.size(0)
        self.rank = mesh.get_local_rank(0)

    def chunk(self, length: int) -> tuple[int, int]:
        """(start, length) of this rank's chunk: ceil(length / W) per rank, the last ranks shorter or empty,
        as DTensor's Shard and fully_shard split."""
        per_rank = -(-length // self.size)
        start = min(self.rank * per_rank, length)
        return start, min(per_rank, length - start)

    def gather(self, piece: torch.Tensor, dim: int, length: int) -> torch.Tensor:
        """Concatenate every rank's chunk of a dim of ``length`` along ``dim`` (uneven chunks padded)."""
        per_rank = -(-length // self.size)
        rows = piece.movedim(dim, 0)
        padded = rows.new_zeros(per_rank, *rows.shape[1:])
        padded[: rows.shape[0]] = rows
        out = rows.new_empty(per_rank * self.size, *rows.shape[1:])
        dist.all_gather_into_tensor(out, padded, group=self.group)
        return out[:length].movedim(0, dim)

    def reduce_scatter(self, partial: torch.Tensor, dim: int) -> torch.Tensor:
        """Sum ``partial`` over the ranks and keep this rank's chunk of ``dim`` (contiguous)."""
        length = partial.shape[dim]
        per_rank = -(-length // self.size)
        rows = partial.movedim(dim, 0)
        padded = rows.new_zeros(per_rank * self.size, *rows.shape[1:])
        padded[:length] = rows
        out = rows.new_empty(per_rank, *rows.shape[1:])
        dist.reduce_scatter_tensor(out, padded, op=dist.ReduceOp.SUM, group=self.group)
        return out[: self.chunk(length)[1]].movedim(0, dim).contiguous()

    def all_reduce(self, partial: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(partial, op=dist.ReduceOp.SUM, group=self.group)
        return partial


def _sharded(local: torch.Tensor, mesh: Any, placement: Any, shape: tuple[int, ...]) -> torch.Tensor:
    stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, mesh, [placement], run_check=False, shape=torch.Size(shape), stride=stride)


def _local_chunk(full: torch.Tensor, axis: _MeshAxis, placement: Any) -> torch.Tensor:
    from torch.distributed.tensor import Replicate

    if placement == Replicate():
        return full.contiguous()
    start, length = axis.chunk(full.shape[placement.dim])
    return full.narrow(placement.dim, start, length).contiguous()


# ------------------------------------------------------------ the refresh
def sharded_randomized_projection(
    grad: torch.Tensor, rank: int, side: str, *, oversample: int, power_iters: int, seed: int
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``projector.compute_projection(..., "randomized")`` of a Shard(0)/Shard(1) DTensor gradient.

    Returns the whole (replicated) P (m x r) and Q (r x n), or None for the
    unused side. No rank holds more than its shard of G: each product is a
    local GEMM on the shard and one collective of an m x k, n x k or k x n
    matrix, so the sketch, QRs and small SVD -- and the basis, signs included
    -- are those of one process, up to the sums' rounding order.
    """
    axis = _MeshAxis(grad.device_mesh)
    shard_dim = grad.placements[0].dim
    matrix = grad.to_local().float()
    m, n = grad.shape
    if shard_dim == 0:
        start, length = axis.chunk(m)
        mine = slice(start, start + length)

        def times(x):
            return axis.gather(matrix @ x, 0, m)

        def transpose_times(y):
            return axis.all_reduce(matrix.t() @ y[mine])

        def project(basis):
            return axis.all_reduce(basis[mine].t() @ matrix)
    else:
        start, length = axis.chunk(n)
        mine = slice(start, start + length)

        def times(x):
            return axis.all_reduce(matrix @ x[mine])

        def transpose_times(y):
            return axis.gather(matrix.t() @ y, 0, n)

        def project(basis):
            return axis.gather(basis.t() @ matrix, 1, n)

    u, vh = randomized_svd_of_operator(
        (m, n), times, transpose_times, project, rank=rank, oversample=oversample, power_iters=power_iters,
        seed=seed, device=matrix.device, dtype=torch.float32,
    )
    left = u.contiguous() if side in ("left", "full") else None
    right = vh.contiguous() if side in ("right", "full") else None
    return left, right


# -------------------------------------------------------------- the step
def galore_update_sharded(state: dict[str, Any], p: torch.Tensor, group: dict[str, Any], index: int) -> None:
    """One GaLore update of a Shard(0)/Shard(1) DTensor weight ``p`` whose optimizer state is ``state``
    (created here when empty; see the module docstring's table). ``index`` seeds the refreshes."""
    from torch.distributed.tensor import Replicate, Shard

    mesh = p.device_mesh
    axis = _MeshAxis(mesh)
    shard_dim = p.placements[0].dim
    m, n = p.shape
    rank = min(group["rank"], m, n)
    side = projection_side(p.shape, group["proj_type"])
    # left: r x n by columns; right: m x r by rows; full: r x r, replicated
    moment_placement = {"left": Shard(1), "right": Shard(0), "full": Replicate()}[side]
    if not state:

        def zeros(shape: tuple[int, ...]) -> torch.Tensor:
            local_shape = list(shape)
            if moment_placement != Replicate():
                local_shape[moment_placement.dim] = axis.chunk(shape[moment_placement.dim])[1]
            return _sharded(torch.zeros(local_shape, dtype=torch.float32, device=p.device), mesh, moment_placement,
                            shape)

        state.update(new_galore_state(p.shape, rank, side, zeros))
    grad = p.grad.to_local()
    if refresh_due(state, group):
        # every rank must reach the same verdict, or the others would wait in the next collective forever
        bad = torch.tensor([0.0 if bool(torch.isfinite(grad).all()) else 1.0], device=p.device)
        if axis.all_reduce(bad).item() > 0:
            raise nonfinite_refresh_error(index, p.shape, state["step"] + 1)
        left, right = sharded_randomized_projection(
            p.grad, rank, side, oversample=group["oversample"], power_iters=group["power_iters"],
            seed=refresh_seed(group["seed"], index, state["step"]),
        )
        if left is not None:  # P (m x r): by rows under Shard(0)
            placement = Shard(0) if shard_dim == 0 else Replicate()
            state["proj_left"] = _sharded(_local_chunk(left, axis, placement), mesh, placement, tuple(left.shape))
        if right is not None:  # Q (r x n): by columns under Shard(1)
            placement = Shard(1) if shard_dim == 1 else Replicate()
            state["proj_right"] = _sharded(_local_chunk(right, axis, placement), mesh, placement, tuple(right.shape))
    state["step"] += 1
    numbers = galore_coefficients(group, state["step"])
    beta1, beta2 = group["betas"]
    adam = dict(beta1=beta1, beta2=beta2, eps=group["eps"], bias_correction1=numbers.bias_correction1,
                bias_correction2=numbers.bias_correction2)
    update = dict(beta=numbers.beta, alpha=numbers.alpha)
    backend = group["backend"]
    weight = p.to_local()
    exp_avg, exp_avg_sq = state["exp_avg"].to_local(), state["exp_avg_sq"].to_local()

    def back_project(proj: torch.Tensor, norm: torch.Tensor, proj_side: str) -> None:
        if weight.numel() > 0:  # an uneven split can leave a rank an empty shard
            back_project_update_(weight, proj, norm, side=proj_side, backend=backend, **update)

    def adam_on(low: torch.Tensor) -> torch.Tensor:
        return adam_normalized_(low, exp_avg, exp_avg_sq, torch.empty_like(low), adam["beta1"], adam["beta2"],
                                adam["eps"], adam["bias_correction1"], adam["bias_correction2"])

    if side == "full":
        proj_left, proj_right = state["proj_left"].to_local(), state["proj_right"].to_local()
        low = axis.all_reduce(project_reference(grad, proj_left, "left").mm(proj_right.t()))
        back_project(proj_left, adam_on(low).mm(proj_right), "left")
        return
    proj = (state["proj_left"] if side == "left" else state["proj_right"]).to_local()
    if (side, shard_dim) in (("right", 0), ("left", 1)):
        # the projection contracts the unsharded dim: everything is local
        if weight.numel() == 0:
            return
        norm = project_adam_(grad, proj, exp_avg, exp_avg_sq, side=side, backend=backend, **adam)
        back_project(proj, norm, side)
        return
    # the projection contracts the sharded dim: partial sums over the ranks, each rank keeps
    # (and runs Adam on) its chunk of the subspace, then every rank needs the whole N
    subspace_dim = 1 if side == "left" else 0
    low = axis.reduce_scatter(project_reference(grad, proj, side), subspace_dim)
    norm = axis.gather(adam_on(low), subspace_dim, subspace_shape(p.shape, rank, side)[subspace_dim])
    back_project(proj, norm.contiguous(), side)


# ------------------------------------------------------ shard placement
def owlore_shard_placement(
    param_groups: Iterable[Union[dict[str, Any], torch.Tensor]],
    world_size: Optional[int] = None,
    *,
    proj_type: str = "std",
) -> Callable[[nn.Parameter], Optional[Any]]:
    """A ``shard_placement_fn`` for ``fully_shard`` that shards each left-projected GaLore weight by columns.

    Under ``Shard(1)`` a left projection R = P^T G contracts the unsharded rows,
    so the step is local; a right projection is local under ``Shard(0)``, the
    default. With every GaLore weight placed so, ``OwLoreAdamW.step()`` issues
    no collective between refreshes.

    Args:
        param_groups: the groups of ``owlore_param_groups(model, ...)`` (or any
            OwLoreAdamW groups), built on the model *before* ``fully_shard``
            (fully_shard replaces the params: build the optimizer's groups again
            afterwards).
        world_size: ranks of the sharding mesh (default: the default group's size).
            FSDP2 needs Shard(1) to split evenly: a left-projected weight whose
            column count it does not divide stays Shard(0), with a warning.
        proj_type: the side rule for groups that do not set ``proj_type``.
    """
    from torch.distributed.tensor import Shard

    if world_size is None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("world_size=None needs an initialized torch.distributed; pass world_size")
        world_size = dist.get_world_size()
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    by_columns: set[int] = set()
    uneven: list[tuple[int, int]] = []
    for group in param_groups:
        if not isinstance(group, dict) or group.get("rank") is None:
            continue
        params = group["params"]
        for p in [params] if isinstance(params, torch.Tensor) else params:
            if p.dim() == 2 and projection_side(p.shape, group.get("proj_type", proj_type)) == "left":
                if p.shape[1] % world_size == 0:
                    by_columns.add(id(p))
                else:
                    uneven.append(tuple(p.shape))
    if uneven:
        warnings.warn(
            f"owlore_shard_placement: {len(uneven)} left-projected weight(s) of shape(s) {sorted(set(uneven))} have "
            f"a column count that world_size={world_size} does not divide (FSDP2 shards dims > 0 evenly only); they "
            "stay Shard(0), and each of their steps exchanges an r x n reduce-scatter and all-gather",
            stacklevel=2,
        )

    def placement(param: nn.Parameter) -> Optional[Any]:
        return Shard(1) if id(param) in by_columns else None

    return placement
