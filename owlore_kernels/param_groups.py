"""Optimizer param groups for OwLore: GaLore for the blocks' 2-D linear weights, plain AdamW for the rest.

Its own module because it belongs to neither neighbour: it reads the model's
structure through ``owlore_kernels.introspection`` and produces the groups
``owlore_kernels.OwLoreAdamW`` (or galore-torch's ``GaLoreAdamW``) takes; the
sampler only needs the optimizer it builds to hold every param.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

from torch import nn

from .introspection import block_linears, find_decoder_blocks, name_matches, unique_named_params

__all__ = ["owlore_param_groups"]


def owlore_param_groups(
    model: nn.Module,
    rank: Optional[int] = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    *,
    target_modules: Optional[Sequence[str]] = None,
    layers_attr: Optional[str] = None,
    project_adapters: bool = False,
    **galore_options: Any,
) -> list[dict[str, Any]]:
    """Param groups for ``OwLoreAdamW`` covering every parameter of ``model``, each once.

    Build them (and the optimizer) *before* the sampler freezes anything: the
    optimizer must hold every block's params from the start, or blocks
    unfrozen later never train (LMFlow issue #726). Frozen params cost
    nothing, since the optimizer skips params whose grad is None.

    Returns ``[galore_group, adamw_group]`` (either dropped when empty):

    * the GaLore group (galore-torch's format: ``{"params", "rank",
      "update_proj_gap", "scale", "proj_type", **galore_options}``) holds the
      2-D weights of the linears inside the decoder blocks -- ``nn.Linear`` and
      GPT-2's ``Conv1D`` -- restricted to ``target_modules`` when given (module
      names or their last parts, e.g. ``["q_proj", "v_proj"]``, or glob
      patterns such as ``"*.mlp.*"``; a layer PEFT wrapped goes by its own
      name, ``q_proj``, not ``q_proj.base_layer``);
    * the plain AdamW group holds everything else (embeddings, head, norms,
      biases, untargeted linears). Tied params (embeddings = lm_head) appear once.

    PEFT adapters (LoRA's A and B, other tuners' adapter weights,
    ``modules_to_save`` copies) go to the plain group: they are already
    low-rank (LoRA's r x d), so projecting them saves nothing.
    ``project_adapters=True`` puts the 2-D adapter linears inside the blocks
    in the GaLore group too. A PEFT-frozen base weight stays in the GaLore
    group, where it costs nothing while it has no gradient.

    ``rank=None`` puts everything into the plain AdamW group.
    """
    if target_modules is not None:
        if isinstance(target_modules, str):
            target_modules = [target_modules]
        target_modules = list(target_modules)
        if not all(isinstance(t, str) and t for t in target_modules):
            raise ValueError(f"target_modules must be a list of module names or patterns, got {target_modules!r}")
    if not isinstance(project_adapters, bool):
        raise ValueError(f"project_adapters must be True or False, got {project_adapters!r}")
    path, blocks = find_decoder_blocks(model, layers_attr=layers_attr)
    galore_ids: set[int] = set()
    matched_targets: set[str] = set()
    for i, block in enumerate(blocks):
        for name, lin in block_linears(block, include_adapters=project_adapters):
            full = f"{path}.{i}.{name}"
            if target_modules is None or name_matches(full, target_modules):
                galore_ids.add(id(lin.weight))
                if target_modules is not None:
                    matched_targets.update(t for t in target_modules if name_matches(full, [t]))
    if target_modules is not None and rank is not None:
        missing = [t for t in target_modules if t not in matched_targets]
        if missing:
            raise ValueError(
                f"target_modules={target_modules!r}: {missing} match no linear layer inside the blocks at {path!r}"
            )
    galore, plain = [], []
    for _, p in unique_named_params(model):
        (galore if rank is not None and id(p) in galore_ids else plain).append(p)
    groups = []
    if galore:
        groups.append(
            {"params": galore, "rank": rank, "update_proj_gap": update_proj_gap, "scale": scale,
             "proj_type": proj_type, **galore_options}
        )
    if plain:
        groups.append({"params": plain})
    return groups
