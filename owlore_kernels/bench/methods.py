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
``prepare_model`` applies the training options to a loaded model (gradient checkpointing),
``enable_in_backward`` moves the optimizer step into backward, and ``train_step`` runs one
step: sampler, forward with the model's own or the chunked loss, backward, optimizer step. The
benchmark's worker and the memory estimator (``owlore_kernels.estimate``) both run these, so
what is measured and what is traced is one definition.
"""
from __future__ import annotations

import inspect
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

METHODS = ("full", "lora", "galore", "lisa", "owlore")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# the bench's settings, also the estimator's defaults for what it does not take as arguments
DEFAULTS: dict[str, Any] = dict(
    model="smollm2", methods=",".join(METHODS), steps=24, batch=4, seq_len=64, eval_seqs=8,
    lr=1e-4, rank=128, lora_rank=16, gamma=5, interval=8, update_proj_gap=200,
    galore_scale=0.25, owlore_scale=1.0,  # each method at its reference: galore-torch 0.25, the OwLore paper 1.0
    proj_method="svd", device="auto", dtype="fp32", seed=0, out=os.path.join("benchmarks", "results"),
    grad_checkpointing=False, offload_checkpoints=False, chunked_loss=False, chunk_size=None, in_backward=False,
    trace=True,
)


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
    # in-backward steps (enable_in_backward): the optimizers stepped from the hooks
    in_backward: list[torch.optim.Optimizer] = field(default_factory=list)

    def optimizers(self) -> list[torch.optim.Optimizer]:
        """Every optimizer whose state holds this method's state (the per-param ones in-backward)."""
        return [self.optimizer] + [o for o in self.in_backward if o is not self.optimizer]


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


def wrap_lora(model: nn.Module, cfg: dict[str, Any]) -> nn.Module:
    """The lora method's model: peft LoRA (rank ``cfg["lora_rank"]``, alpha 2r, no dropout) on
    q/k/v/o/gate/up/down. ``build("lora", ...)`` calls it unless the model is wrapped already
    (the estimator wraps its meta-device model before giving it fake storages)."""
    peft = _require("peft", "pip install peft")
    config = peft.LoraConfig(r=cfg["lora_rank"], lora_alpha=2 * cfg["lora_rank"], lora_dropout=0.0,
                             target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config)


def build(method: str, model: nn.Module, cfg: dict[str, Any]) -> Setup:
    lr = cfg["lr"]
    if method == "full":
        opt, lib = _torch_adamw(model.parameters(), lr)
        return Setup(model, opt, None, lib)
    if method == "lora":
        peft = _require("peft", "pip install peft")
        if not isinstance(model, peft.PeftModel):
            model = wrap_lora(model, cfg)
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
        extra = {}
        if cfg.get("state_dtype") is not None:  # bf16 Adam moments, where OwLoreAdamW offers them
            if "state_dtype" not in inspect.signature(ok.OwLoreAdamW).parameters:
                raise ValueError(f"state_dtype={cfg['state_dtype']!r}: this OwLoreAdamW has no state_dtype option")
            extra["state_dtype"] = cfg["state_dtype"]
        if method == "lisa":
            opt = ok.OwLoreAdamW(model.parameters(), lr=lr, weight_decay=0.0, backend=backend, **extra)
            prob_mode, lib = "uniform", "OwLoreSampler(uniform) + OwLoreAdamW (no projection)"
        else:
            groups = ok.owlore_param_groups(model, rank=cfg["rank"], update_proj_gap=cfg["update_proj_gap"],
                                            scale=cfg["owlore_scale"])
            opt = ok.OwLoreAdamW(groups, lr=lr, weight_decay=0.0, proj_method=cfg["proj_method"], backend=backend,
                                 **extra)
            prob_mode, lib = "owl", f"OwLoreSampler(owl) + OwLoreAdamW rank={cfg['rank']} ({cfg['proj_method']})"
        # block_scores: the sampler's public seam for given outlier scores (the estimator passes
        # uniform ones: its fake weights have no values to score); None computes them
        scores = cfg.get("block_scores") if prob_mode == "owl" else None
        sampler = ok.OwLoreSampler(model, opt, gamma=cfg["gamma"], interval=cfg["interval"],
                                   prob_mode=prob_mode, seed=cfg["seed"], scores=scores)
        return Setup(model, opt, sampler, lib)
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


def prepare_model(model: nn.Module, cfg: dict[str, Any]) -> nn.Module:
    """Training options on a loaded model, before ``build``: no KV cache; gradient checkpointing
    (non-reentrant, transformers' default) when ``cfg["grad_checkpointing"]``, with each
    checkpointed block's inputs held in pinned host memory until its recompute when
    ``cfg["offload_checkpoints"]`` (transformers' ``activation_checkpointing_enable(offload=True)``:
    a copy to the host in forward, one back in backward; it needs a GPU)."""
    model.config.use_cache = False
    offload = bool(cfg.get("offload_checkpoints"))
    if offload and not cfg.get("grad_checkpointing"):
        raise ValueError("offload_checkpoints=True holds the inputs of checkpointed blocks in host memory: it needs "
                         "grad_checkpointing=True")
    if cfg.get("grad_checkpointing"):
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
            if offload:
                if "offload" not in inspect.signature(model.activation_checkpointing_enable).parameters:
                    raise ValueError("offload_checkpoints=True needs transformers' activation_checkpointing_enable("
                                     "offload=True), which this transformers version does not have")
                model.activation_checkpointing_enable(kwargs, offload=True)
            else:
                model.activation_checkpointing_enable(kwargs)
        elif offload:
            raise ValueError("offload_checkpoints=True needs transformers' activation_checkpointing_enable("
                             "offload=True), which this transformers version does not have")
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def enable_in_backward(setup: Setup) -> None:
    """Step each parameter inside backward, as soon as its gradient is accumulated, and free the gradient.

    OwLoreAdamW (lisa, owlore): its ``register_step_hooks``. Any other optimizer (torch AdamW for
    full and lora, galore-torch's GaLoreAdamW): one optimizer of the same class per parameter with
    that parameter's group options, stepped from a ``register_post_accumulate_grad_hook`` (the
    recipe of PyTorch's "optimizer step in backward" tutorial). ``setup.optimizer.step()`` then
    finds no gradient and does nothing; the per-param optimizers go in ``setup.in_backward``.
    """
    opt = setup.optimizer
    params = [p for g in opt.param_groups for p in g["params"]]
    if hasattr(opt, "register_step_hooks"):
        opt.register_step_hooks(params)
        return
    for group in opt.param_groups:
        options = {k: v for k, v in group.items() if k != "params"}
        for p in group["params"]:
            with warnings.catch_warnings():  # galore-torch's deprecation notice, once per param
                warnings.simplefilter("ignore")
                single = type(opt)([{**options, "params": [p]}], lr=options["lr"])
            setup.in_backward.append(single)

            def step_now(param: torch.Tensor, single: torch.optim.Optimizer = single, group: dict = group) -> None:
                single.param_groups[0]["lr"] = group["lr"]  # an LR scheduler drives the main optimizer's groups
                single.step()
                param.grad = None

            p.register_post_accumulate_grad_hook(step_now)


def train_step(setup: Setup, input_ids: torch.Tensor, labels: torch.Tensor, cfg: dict[str, Any],
               mark: Optional[Callable[[str], None]] = None) -> torch.Tensor:
    """One training step: ``sampler.step()``, forward and loss, ``backward()``, ``optimizer.step()``.

    The loss is the model's own (``model(input_ids=..., labels=...).loss``), or with
    ``cfg["chunked_loss"]`` ``owlore_kernels.losses.causal_lm_loss`` (chunks of
    ``cfg["chunk_size"]`` tokens). ``mark(phase)`` is called as each phase starts: "forward",
    "loss" (as the LM head starts), "backward", "optimizer step". Returns the loss; the caller
    zeroes the gradients.
    """
    mark = mark or (lambda phase: None)
    model = setup.model
    if setup.sampler is not None:
        setup.sampler.step()
    mark("forward")
    if cfg.get("chunked_loss"):
        from owlore_kernels.losses import DEFAULT_CHUNK_SIZE, chunked_causal_lm_loss

        hidden = model.get_decoder()(input_ids=input_ids).last_hidden_state
        mark("loss")
        loss = chunked_causal_lm_loss(hidden, model.get_output_embeddings(), labels,
                                      chunk_size=cfg.get("chunk_size") or DEFAULT_CHUNK_SIZE)
    else:
        handle = model.get_output_embeddings().register_forward_pre_hook(lambda module, args: mark("loss"))
        try:
            loss = model(input_ids=input_ids, labels=labels).loss
        finally:
            handle.remove()
    mark("backward")
    loss.backward()
    mark("optimizer step")
    setup.optimizer.step()
    return loss


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


def state_tensors(optimizer: torch.optim.Optimizer):
    """Yield ``(key, tensor)`` for every tensor held in ``optimizer.state``, each once."""
    seen: set[int] = set()
    for st in optimizer.state.values():
        for key, value in st.items():
            for t in _tensors_in(value, seen):
                yield str(key), t


def is_projection_key(key: str) -> bool:
    """OwLoreAdamW's ``proj_left``/``proj_right`` and galore-torch's ``projector`` hold projections."""
    return "proj" in key.lower()


def storage_bytes(tensors, seen: Optional[set[int]] = None) -> int:
    """Bytes of the storages behind ``tensors``, each storage once: what memory holds. A view counts
    its whole base (galore-torch keeps ``U[:, :rank]`` of an fp32 SVD, a view of all of U)."""
    seen = set() if seen is None else seen
    total = 0
    for t in tensors:
        storage = t.untyped_storage()
        if storage._cdata not in seen:
            seen.add(storage._cdata)
            total += storage.nbytes()
    return total


def state_bytes(optimizer: torch.optim.Optimizer) -> tuple[int, int]:
    """(moment and step-counter bytes, projection-matrix bytes) held in ``optimizer.state``, by storage.

    A state entry whose key contains "proj" (OwLoreAdamW's ``proj_left``/``proj_right``,
    galore-torch's ``projector``) counts as projection.
    """
    held = list(state_tensors(optimizer))
    seen: set[int] = set()
    projection = storage_bytes((t for key, t in held if is_projection_key(key)), seen)
    return storage_bytes((t for key, t in held if not is_projection_key(key)), seen), projection


def unique_params(model: nn.Module) -> list[nn.Parameter]:
    return list({id(p): p for p in model.parameters()}.values())


def param_bytes(model: nn.Module) -> int:
    return storage_bytes(unique_params(model))


def grad_bytes(model: nn.Module) -> int:
    return storage_bytes(p.grad for p in unique_params(model) if p.grad is not None)


def trainable_params(model: nn.Module) -> int:
    return sum(p.numel() for p in unique_params(model) if p.requires_grad)
