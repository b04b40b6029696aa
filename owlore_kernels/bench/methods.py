"""The five fine-tuning methods the benchmark compares, each built from its real library.

``build(method, model, cfg)`` returns a :class:`Setup`: the (possibly wrapped) model, the
optimizer and, for the sampled methods, the sampler whose ``step()`` runs before each forward.

* ``full``   -- ``torch.optim.AdamW(fused=True)`` on every parameter (foreach where fused fails);
* ``lora``   -- ``peft`` LoRA on q/k/v/o/gate/up/down, ``torch.optim.AdamW`` on the adapters;
* ``galore`` -- ``galore_torch.GaLoreAdamW`` with every block's 2-D linear weight projected;
* ``lisa``   -- ``OwLoreSampler(prob_mode="uniform")`` + ``OwLoreAdamW`` with no projection,
  so a frozen block's state is released (LISA with plain AdamW);
* ``owlore`` -- ``OwLoreSampler(prob_mode="owl")`` + ``OwLoreAdamW`` on ``owlore_param_groups``.

A missing library raises :class:`MethodUnavailable` carrying the command that installs it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..estimate import LORA_TARGETS, METHODS


class MethodUnavailable(RuntimeError):
    """A method's library is missing; ``install`` says how to get it."""

    def __init__(self, message: str, install: str):
        super().__init__(message)
        self.install = install


@dataclass
class Setup:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    sampler: Any = None
    library: str = ""  # what really runs, for the report


def _require(module: str, install: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MethodUnavailable(f"{module} is not importable ({exc})", install) from exc


def _decoder_block_linears(model: nn.Module) -> list[nn.Parameter]:
    """The 2-D weights of every nn.Linear inside the decoder blocks (found as OwLore finds them)."""
    from owlore_kernels import find_decoder_blocks

    _, blocks = find_decoder_blocks(model)
    return [m.weight for b in blocks for m in b.modules() if isinstance(m, nn.Linear)]


def _torch_adamw(params, lr: float) -> tuple[torch.optim.Optimizer, str]:
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True), "torch.optim.AdamW(fused=True)"
    except (RuntimeError, TypeError, ValueError):  # fused unsupported for this device/dtype
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, foreach=True), "torch.optim.AdamW(foreach=True)"


def build(method: str, model: nn.Module, cfg: dict[str, Any]) -> Setup:
    lr = cfg["lr"]
    if method == "full":
        opt, lib = _torch_adamw(model.parameters(), lr)
        return Setup(model, opt, None, lib)
    if method == "lora":
        peft = _require("peft", "pip install peft")
        config = peft.LoraConfig(r=cfg["lora_rank"], lora_alpha=2 * cfg["lora_rank"], lora_dropout=0.0,
                                 target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM")
        model = peft.get_peft_model(model, config)
        opt, lib = _torch_adamw((p for p in model.parameters() if p.requires_grad), lr)
        return Setup(model, opt, None, f"peft {peft.__version__} LoRA r={cfg['lora_rank']} + {lib}")
    if method == "galore":
        galore_torch = _require("galore_torch", "pip install galore-torch==1.0")
        projected = _decoder_block_linears(model)
        ids = {id(p) for p in projected}
        others = [p for p in model.parameters() if id(p) not in ids]
        groups = [{"params": others},
                  {"params": projected, "rank": cfg["rank"], "update_proj_gap": cfg["update_proj_gap"],
                   "scale": cfg["galore_scale"], "proj_type": "std"}]
        opt = galore_torch.GaLoreAdamW(groups, lr=lr, weight_decay=0.0, no_deprecation_warning=True)
        return Setup(model, opt, None, f"galore_torch.GaLoreAdamW rank={cfg['rank']}")
    if method in ("lisa", "owlore"):
        import owlore_kernels as ok  # the public names, wherever they live inside the package

        backend = cfg.get("backend")
        if method == "lisa":
            opt = ok.OwLoreAdamW(model.parameters(), lr=lr, weight_decay=0.0, backend=backend)
            prob_mode, lib = "uniform", "OwLoreSampler(uniform) + OwLoreAdamW (no projection)"
        else:
            groups = ok.owlore_param_groups(model, rank=cfg["rank"], update_proj_gap=cfg["update_proj_gap"],
                                            scale=cfg["owlore_scale"])
            opt = ok.OwLoreAdamW(groups, lr=lr, weight_decay=0.0, proj_method=cfg["proj_method"], backend=backend)
            prob_mode, lib = "owl", f"OwLoreSampler(owl) + OwLoreAdamW rank={cfg['rank']} ({cfg['proj_method']})"
        sampler = ok.OwLoreSampler(model, opt, gamma=cfg["gamma"], interval=cfg["interval"],
                                   prob_mode=prob_mode, seed=cfg["seed"])
        return Setup(model, opt, sampler, lib)
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


# ----------------------------------------------------------------- accounting
def _tensors_in(obj: Any, seen: set[int]):
    """Yield every tensor reachable from an optimizer-state value, each once."""
    if isinstance(obj, torch.Tensor):
        if id(obj) not in seen:
            seen.add(id(obj))
            yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors_in(v, seen)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors_in(v, seen)
    elif hasattr(obj, "__dict__"):  # galore-torch's GaLoreProjector holds ortho_matrix
        yield from _tensors_in(vars(obj), seen)


def state_bytes(optimizer: torch.optim.Optimizer) -> tuple[int, int]:
    """(moment and step-counter bytes, projection-matrix bytes) held in ``optimizer.state``.

    A state entry whose key contains "proj" (OwLoreAdamW's ``proj_left``/``proj_right``,
    galore-torch's ``projector``) counts as projection.
    """
    moments = projection = 0
    seen: set[int] = set()
    for st in optimizer.state.values():
        for key, value in st.items():
            n = sum(t.numel() * t.element_size() for t in _tensors_in(value, seen))
            if "proj" in str(key).lower():
                projection += n
            else:
                moments += n
    return moments, projection


def unique_params(model: nn.Module) -> list[nn.Parameter]:
    return list({id(p): p for p in model.parameters()}.values())


def param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in unique_params(model))


def grad_bytes(model: nn.Module) -> int:
    return sum(p.grad.numel() * p.grad.element_size() for p in unique_params(model) if p.grad is not None)


def trainable_params(model: nn.Module) -> int:
    return sum(p.numel() for p in unique_params(model) if p.requires_grad)

