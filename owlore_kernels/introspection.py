"""Model introspection: where a causal LM keeps its decoder blocks, their linears, and what PEFT added.

Everything that reads a model's structure lives here, so that the layer
sampler (``owlore_kernels.sampler``), the outlier scores
(``owlore_kernels.outliers``) and the optimizer's param groups
(``owlore_kernels.param_groups``) see one model the same way. This module
imports nothing else from the package; the three modules above import it and
not each other.

* Decoder blocks: :func:`find_decoder_blocks` tries the paths of known HF
  causal LMs (``_KNOWN_BLOCK_PATHS``), also under wrappers (PEFT's
  ``base_model.model.``, DDP's ``module.``, ``torch.compile``'s
  ``_orig_mod.``), then the largest list of identical blocks of a plain torch
  model.
* Linears: ``nn.Linear`` and GPT-2's ``Conv1D`` (weight stored
  ``(in_features, out_features)``; :func:`oriented_weight` gives the
  ``(out, in)`` view without a copy).
* Tied weights: :func:`unique_named_params` lists a param reached under two
  names (embeddings = LM head) once.
* PEFT: a tuner layer (``peft.tuners.tuners_utils.BaseTunerLayer``, e.g.
  LoRA's ``q_proj``) wraps the original linear as ``base_layer`` and keeps its
  adapters in the submodules named by ``adapter_layer_names`` (``lora_A``,
  ``lora_B``, ...); ``ModulesToSaveWrapper`` keeps a trainable copy in
  ``modules_to_save`` next to the frozen ``original_module``. Both are
  recognized by these attributes, so peft need not be importable.
"""
from __future__ import annotations

import fnmatch
from typing import Any, Optional, Sequence

from torch import nn

__all__ = [
    "find_decoder_blocks",
    "block_linears",
    "oriented_weight",
    "is_conv1d",
    "unique_named_params",
    "default_always_train",
    "name_matches",
    "module_prefix_matches",
]

# Where known causal LMs keep their decoder blocks, tried in order before the
# generic search: Llama, Mistral, Qwen2, Gemma, Phi (model.layers), GPT-2
# (transformer.h), GPT-NeoX (gpt_neox.layers), OPT (model.decoder.layers),
# Falcon/Bloom (transformer.h), MPT (transformer.blocks), GPT-J (transformer.h).
_KNOWN_BLOCK_PATHS = (
    "model.layers",
    "transformer.h",
    "gpt_neox.layers",
    "model.decoder.layers",
    "transformer.layers",
    "transformer.blocks",
    "model.language_model.layers",
    "layers",
    "blocks",
    "h",
)
# Wrappers whose inner model holds those paths (PEFT: base_model.model.<path>).
_WRAPPER_PREFIXES = ("", "base_model.model.", "module.", "_orig_mod.")


def _get_path(root: nn.Module, path: str) -> Optional[Any]:
    obj: Any = root
    for part in path.split("."):
        if isinstance(obj, (nn.ModuleList, nn.Sequential)) and part.isdigit():
            index = int(part)
            obj = obj[index] if index < len(obj) else None
        else:
            obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _is_block_list(obj: Any) -> bool:
    """An nn.ModuleList of >= 1 blocks of one class, each holding parameters."""
    if not isinstance(obj, nn.ModuleList) or len(obj) == 0:
        return False
    first = type(obj[0])
    return all(type(b) is first and any(True for _ in b.parameters()) for b in obj)


def find_decoder_blocks(model: nn.Module, *, layers_attr: Optional[str] = None) -> tuple[str, nn.ModuleList]:
    """Return ``(path, blocks)``: the dotted attribute path of the decoder block list and the list.

    With ``layers_attr`` (e.g. ``"model.layers"``) that path is used as is and
    must name an ``nn.ModuleList``. Otherwise the known paths of HF causal LMs
    are tried (Llama, Mistral, Qwen2, Gemma, Phi: ``model.layers``; GPT-2:
    ``transformer.h``; GPT-NeoX: ``gpt_neox.layers``; OPT:
    ``model.decoder.layers``; also under a PEFT ``base_model.model.``), then
    the ``nn.ModuleList`` of identical, parameter-holding blocks with the most
    parameters anywhere in ``model`` (plain torch models). Raises
    ``ValueError`` if none is found, saying how to pass ``layers_attr``.
    """
    if layers_attr is not None:
        if not isinstance(layers_attr, str) or not layers_attr:
            raise ValueError(f"layers_attr must be a dotted attribute path such as 'model.layers', got {layers_attr!r}")
        obj = _get_path(model, layers_attr)
        if obj is None:
            raise ValueError(f"layers_attr={layers_attr!r}: {type(model).__name__} has no such attribute")
        if not isinstance(obj, nn.ModuleList) or len(obj) == 0:
            raise ValueError(
                f"layers_attr={layers_attr!r} names a {type(obj).__name__}"
                f"{' of length 0' if isinstance(obj, nn.ModuleList) else ''}; it must name a non-empty nn.ModuleList "
                "of decoder blocks"
            )
        return layers_attr, obj
    for prefix in _WRAPPER_PREFIXES:
        for path in _KNOWN_BLOCK_PATHS:
            obj = _get_path(model, prefix + path)
            if _is_block_list(obj):
                return prefix + path, obj
    best: Optional[tuple[int, str, nn.ModuleList]] = None
    for name, module in model.named_modules():
        if name and _is_block_list(module):
            size = sum(p.numel() for p in module.parameters())
            if best is None or size > best[0]:
                best = (size, name, module)
    if best is None:
        raise ValueError(
            f"could not find the decoder blocks of {type(model).__name__}: it holds no nn.ModuleList of identical "
            "blocks with parameters. Pass layers_attr='<dotted path to the nn.ModuleList of blocks>', "
            "e.g. layers_attr='model.layers' (Llama) or layers_attr='transformer.h' (GPT-2)"
        )
    return best[1], best[2]


# ------------------------------------------------------------------ linears
def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): a linear whose weight is stored ``(in_features, out_features)``.

    Matched by class name so that transformers stays optional.
    """
    return type(module).__name__ == "Conv1D" and getattr(getattr(module, "weight", None), "dim", lambda: 0)() == 2


def _is_linear(module: nn.Module) -> bool:
    return (isinstance(module, nn.Linear) or is_conv1d(module)) and module.weight is not None and module.weight.dim() == 2


def oriented_weight(module: nn.Module):
    """The weight as ``(out_features, in_features)``, so that input features run along the last dim.

    Conv1D's weight comes back as a transposed, strided view: no copy.
    """
    w = module.weight.detach()
    return w.t() if is_conv1d(module) else w


def _adapter_attrs(module: nn.Module) -> tuple[str, ...]:
    """Names of the submodules of ``module`` that hold PEFT adapter weights (empty for other modules)."""
    names = getattr(module, "adapter_layer_names", None)  # peft's BaseTunerLayer
    if isinstance(names, (tuple, list)) and all(isinstance(n, str) for n in names):
        return tuple(names)
    if isinstance(getattr(module, "modules_to_save", None), nn.ModuleDict) and hasattr(module, "original_module"):
        return ("modules_to_save",)  # peft's ModulesToSaveWrapper: the trainable copy
    return ()


def _adapter_modules(root: nn.Module) -> dict[int, nn.Module]:
    """id -> module for every module inside a PEFT adapter container under ``root``."""
    found: dict[int, nn.Module] = {}
    for module in root.modules():
        for attr in _adapter_attrs(module):
            sub = getattr(module, attr, None)
            if isinstance(sub, nn.Module):
                found.update((id(m), m) for m in sub.modules())
    return found


def block_linears(block: nn.Module, *, include_adapters: bool = False) -> list[tuple[str, nn.Module]]:
    """The linear layers of ``block`` with a 2-D weight: ``nn.Linear`` and GPT-2's ``Conv1D``, as ``(name, module)``.

    Names follow PEFT's ``target_modules`` naming: the layer a PEFT tuner layer
    wrapped (``q_proj.base_layer``) and, with ``include_adapters=True``, its
    adapter linears (``q_proj.lora_A.default``) are all reported as ``q_proj``.
    Adapters are left out by default: they are not the model's weights (LoRA's
    B starts at zero), so they neither get outlier scores nor a GaLore projection.
    """
    adapters = _adapter_modules(block)
    # the name each PEFT-wrapped layer goes by: its tuner layer's name
    owner_of: dict[int, str] = {}
    for name, module in block.named_modules():
        if _adapter_attrs(module):
            for sub in module.modules():
                if sub is not module:
                    owner_of.setdefault(id(sub), name)
    out = []
    for name, module in block.named_modules():
        if not _is_linear(module) or (id(module) in adapters and not include_adapters):
            continue
        out.append((owner_of.get(id(module), name), module))
    return out


# --------------------------------------------------------------- parameters
def unique_named_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``model.named_parameters()`` with every param once (tied embeddings under their first name)."""
    # named_parameters() already drops repeats; the id set also guards against a
    # param reached twice through a custom named_parameters
    seen: set[int] = set()
    out = []
    for name, p in model.named_parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    return out


def name_matches(name: str, targets: Sequence[str]) -> bool:
    """PEFT-style: ``name`` is a target, ends with ``.target``, or matches it as a glob pattern."""
    return any(name == t or name.endswith("." + t) or fnmatch.fnmatchcase(name, t) for t in targets)


def module_prefix_matches(param_name: str, pattern: str) -> bool:
    """``pattern`` names (or glob-matches) a module that owns ``param_name``."""
    parts = param_name.split(".")
    return any(
        fnmatch.fnmatchcase(".".join(parts[:k]), pattern) or ".".join(parts[:k]).endswith("." + pattern)
        for k in range(1, len(parts))
    )


def default_always_train(model: nn.Module, blocks: nn.ModuleList) -> list[str]:
    """LISA's always-trained modules, found from the model: input/output embeddings and the norms outside the blocks.

    Embeddings are every ``nn.Embedding`` outside the blocks (token and, for
    GPT-2/OPT, learned position embeddings) plus ``get_input_embeddings()`` /
    ``get_output_embeddings()`` where the model has them (the LM head); norms
    are modules outside the blocks whose class name contains "Norm" (the final
    norm: ``model.norm``, ``transformer.ln_f``, ``final_layer_norm``, ...).
    PEFT's ``modules_to_save`` copies outside the blocks are added too: PEFT
    made them trainable on purpose.
    """
    block_modules = {id(m) for m in blocks.modules()}
    by_id = {id(m): n for n, m in model.named_modules()}
    names: list[str] = []

    def add(module: Optional[nn.Module]) -> None:
        if module is None or id(module) in block_modules or id(module) not in by_id:
            return
        name = by_id[id(module)]
        if name and name not in names and any(True for _ in module.parameters()):
            names.append(name)

    for getter in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(model, getter, None)
        if callable(fn):
            try:
                add(fn())
            except (NotImplementedError, AttributeError):
                pass
    vocab_sizes = set()
    for name, module in model.named_modules():
        if id(module) in block_modules or not name:
            continue
        if isinstance(module, nn.Embedding) or "norm" in type(module).__name__.lower():
            add(module)
        if isinstance(module, nn.Embedding):
            vocab_sizes.add(module.num_embeddings)
        if "modules_to_save" in _adapter_attrs(module):
            add(module.modules_to_save)
    # plain models without get_output_embeddings: the head is a linear outside
    # the blocks that maps to the vocabulary
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and id(module) not in block_modules and module.out_features in vocab_sizes:
            add(module)
    # a module inside one already listed adds nothing (PEFT: lm_head, lm_head.modules_to_save.default)
    return [n for n in names if not any(n.startswith(m + ".") for m in names)]
