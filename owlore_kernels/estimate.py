"""Training-memory estimator for LLaMA-style decoders: full AdamW, LoRA, GaLore, LISA, OwLore.

``estimate_memory(model, method, ...)`` returns a :class:`MemoryEstimate` with the bytes of
each component (weights, gradients, optimizer state, projection matrices, activations) and
their total. ``python -m owlore_kernels estimate ...`` prints the same figures.

Assumptions (each is a choice; change them with the keyword arguments):

* **Shapes.** A LLaMA block holds q, k, v, o (``h x h``, ``h_kv x h`` for k and v with
  grouped-query attention), gate, up (``i x h``), down (``h x i``) and two RMSNorm weights of
  size ``h``. Embedding ``V x h``; the LM head is another ``V x h`` unless the embeddings are
  tied; the final norm is ``h``. Linear layers have no bias.
* **Weights** are stored in ``dtype``. LoRA adapters are fp32, because peft's
  ``get_peft_model(autocast_adapter_dtype=True)`` (its default) upcasts bf16/fp16 adapters.
* **Gradients** exist for the trainable parameters only, in the dtype of the parameter, all
  alive together after backward. ``in_backward=True`` models a per-parameter optimizer step
  inside backward that frees each gradient once it is used: then only the largest trainable
  parameter's gradient is alive at a time, plus, with tied embeddings, the LM head's partial
  gradient of the shared matrix (formula in ``estimate_memory``).
* **Optimizer state** is two Adam moments per trainable element, or per element of the
  ``max(m, n) x r`` subspace for a projected matrix. Their dtype (``state_dtype=None``) follows
  the implementation each method runs with in ``owlore_kernels.bench``: torch AdamW and
  galore-torch keep the moments in the parameter's dtype (``zeros_like``), OwLoreAdamW (LISA
  and OwLore) keeps them in fp32. The scalar step counters are left out (a few bytes a tensor).
* **Projection matrices** (GaLore, OwLore): one ``min(m, n) x r`` matrix per projected weight,
  with ``r = min(rank, m, n)``; galore-torch stores it in the parameter's dtype, OwLoreAdamW in
  fp32. Both project a weight with ``rank >= min(m, n)`` onto a full basis of ``min(m, n)``
  directions (saving no memory; listed in ``MemoryEstimate.notes``). GaLore projects every 2-D
  linear weight of every block; OwLore those of the ``gamma`` sampled blocks. Embeddings, LM head
  and all norms use plain Adam.
* **LISA / OwLore** train ``gamma`` decoder blocks plus the embeddings, the LM head and the
  final norm, which always train (as in the LISA paper); every other block is frozen, with no
  gradient and no optimizer state. The figures are for one sample of ``gamma`` blocks.
* **Activations** (what backward keeps, per token, in bytes; ``e`` = bytes of ``dtype``):
  each block stores its residual input and the normed input of attention and of the MLP
  (``4 h``: two RMSNorm inputs and outputs), q, k, v after RoPE and the attention output
  (``2 h_q + 2 h_kv``; SDPA/flash attention, so no ``s x s`` score matrix), and gate, up,
  silu(gate) and the down-projection input (``4 i``): ``e (4 h + 2 h_q + 2 h_kv + 4 i)``.
  RMSNorm computes in fp32, so with a 16-bit ``dtype`` each of the two norms also keeps an fp32
  copy of its input (``+ 8 h``). The loss keeps the logits (``e V``), their fp32 upcast when
  ``e < 4`` (``4 V``), the fp32 log-softmax (``4 V``) and the fp32 logits gradient (``4 V``).
  ``fused_loss=True`` drops the logits term (a chunked/fused linear cross-entropy, e.g. Liger's).
  With gradient checkpointing only each block's input (``e h`` per block) is kept, plus one
  block's full activations while it is recomputed. Frozen blocks still need their
  activations (the gradient passes through them), so sampling does not reduce this term,
  except that LISA/OwLore/LoRA never need the activations of a weight they do not train
  -- a second-order saving that is ignored here.
* Everything else (CUDA context, allocator fragmentation, temporary buffers of the optimizer
  step) is left out; add 1--2 GB on a GPU.

Bytes are bytes; :func:`format_bytes` prints GiB (2**30) because that is what GPU tools
report.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Optional, Union

METHODS = ("full", "lora", "galore", "lisa", "owlore")
DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a LLaMA-style decoder that memory depends on."""

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    tie_word_embeddings: bool = False
    head_dim: Optional[int] = None

    @property
    def q_dim(self) -> int:
        return self.num_heads * (self.head_dim or self.hidden_size // self.num_heads)

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * (self.head_dim or self.hidden_size // self.num_heads)

    def block_linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of each linear layer in one decoder block."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (self.q_dim, h), "k_proj": (self.kv_dim, h), "v_proj": (self.kv_dim, h),
            "o_proj": (h, self.q_dim), "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i),
        }

    @property
    def block_norm_params(self) -> int:
        return 2 * self.hidden_size

    @property
    def block_params(self) -> int:
        return sum(m * n for m, n in self.block_linear_shapes().values()) + self.block_norm_params

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def head_params(self) -> int:
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    @property
    def always_trained_params(self) -> int:
        """Embeddings, LM head and final norm: trained by every full-rank method."""
        return self.embedding_params + self.head_params + self.hidden_size

    @property
    def total_params(self) -> int:
        return self.num_layers * self.block_params + self.always_trained_params


BUILTIN_MODELS: dict[str, ModelShape] = {
    # meta-llama/Llama-2-7b-hf config.json; 6.74e9 parameters
    "llama2-7b": ModelShape("llama2-7b", 32000, 4096, 11008, 32, 32, 32),
    # meta-llama/Meta-Llama-3-8B config.json (GQA, 8 kv heads); 8.03e9 parameters
    "llama3-8b": ModelShape("llama3-8b", 128256, 4096, 14336, 32, 32, 8),
    # mistralai/Mistral-7B-v0.1 config.json (GQA, 8 kv heads); 7.24e9 parameters
    "mistral-7b": ModelShape("mistral-7b", 32000, 4096, 14336, 32, 32, 8),
    # HuggingFaceTB/SmolLM2-135M(-Instruct): the benchmark's default model; tied embeddings
    "smollm2-135m": ModelShape("smollm2-135m", 49152, 576, 1536, 30, 9, 3, tie_word_embeddings=True),
}


def _is_module(model: Any) -> bool:
    """An nn.Module? (If torch is not imported, ``model`` cannot be one: the estimator never imports it.)"""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(model, torch.nn.Module)


def model_shape(model: Union[str, ModelShape, Mapping[str, Any], Any]) -> ModelShape:
    """Resolve a built-in name, a config.json path (file or folder), a dict, an HF config, or a model.

    A model (an ``nn.Module``, e.g. a transformers ``LlamaForCausalLM`` or a peft wrapper of one)
    is read through its ``config``; ``estimate_memory`` also counts its parameters and notes any
    difference from the LLaMA-shape count.
    """
    if isinstance(model, ModelShape):
        return model
    if isinstance(model, str):
        key = model.lower()
        if key in BUILTIN_MODELS:
            return BUILTIN_MODELS[key]
        path = os.path.join(model, "config.json") if os.path.isdir(model) else model
        if not os.path.isfile(path):
            raise ValueError(
                f"unknown model {model!r}: expected one of {sorted(BUILTIN_MODELS)} or a path to an HF config.json"
            )
        with open(path) as f:
            try:
                config = json.load(f)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") \
                    from None
        if not isinstance(config, dict):
            raise ValueError(f"{path} holds a JSON {type(config).__name__}, expected an object (an HF config)")
        return _shape_from_config(config, name=model)
    if isinstance(model, Mapping):
        return _shape_from_config(dict(model), name=str(model.get("_name_or_path") or "config"))
    if _is_module(model):
        config = getattr(model, "config", None)
        if config is None or not hasattr(config, "to_dict"):
            raise TypeError(f"model is a {type(model).__name__} without a Hugging Face `config`; pass its config "
                            "(a dict or a config.json path) or a ModelShape")
        name = str(getattr(config, "_name_or_path", "") or type(model).__name__)
        return _shape_from_config(config.to_dict(), name=name)
    if hasattr(model, "to_dict"):  # transformers.PretrainedConfig
        return _shape_from_config(model.to_dict(), name=str(getattr(model, "_name_or_path", "") or "config"))
    raise TypeError("model must be a name, a config path, a dict, an HF config or an nn.Module with a config, "
                    f"got {type(model).__name__}")


def _shape_from_config(cfg: dict[str, Any], name: str) -> ModelShape:
    if "text_config" in cfg and "hidden_size" not in cfg:  # multimodal wrappers
        cfg = cfg["text_config"]
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in cfg]
    if missing:
        raise ValueError(f"config {name!r} lacks {missing}; only LLaMA-style decoders are supported")
    return ModelShape(
        name=name,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=int(cfg["num_attention_heads"]),
        num_kv_heads=int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        head_dim=cfg.get("head_dim"),
    )


@dataclass
class MemoryEstimate:
    """Bytes per component of one training step's memory, and their total."""

    model: str
    method: str
    weights: int
    gradients: int
    optimizer_state: int
    projection: int
    activations: int
    trainable_params: int
    total_params: int
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what the figures assume beyond the settings

    COMPONENTS = ("weights", "gradients", "optimizer_state", "projection", "activations")

    @property
    def total(self) -> int:
        return sum(getattr(self, c) for c in self.COMPONENTS)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["total"] = self.total
        return d

    def table(self) -> str:
        """A printable breakdown, GiB and bytes."""
        s = self.settings
        lines = [
            f"model {self.model}  method {self.method}  dtype {s.get('dtype')}  batch {s.get('batch')}  "
            f"seq-len {s.get('seq_len')}  grad-checkpointing {s.get('grad_checkpointing')}"
            + ("  in-backward" if s.get("in_backward") else "")
            + (f"  gamma {s['gamma']}" if self.method in ("lisa", "owlore") else "")
            + (f"  rank {s['rank']}" if self.method in ("galore", "owlore") else "")
            + (f"  lora-rank {s['lora_rank']}" if self.method == "lora" else ""),
            f"trainable params {self.trainable_params:,} of {self.total_params:,}",
        ]
        for c in self.COMPONENTS + ("total",):
            value = self.total if c == "total" else getattr(self, c)
            lines.append(f"  {c:<16} {format_bytes(value):>12}  {value:>16,} B")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def format_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def _bytes_of(dtype: str) -> int:
    try:
        return DTYPE_BYTES[dtype.lower()]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}") from None


def activation_bytes(shape: ModelShape, batch: int, seq_len: int, dtype: str = "bf16",
                     grad_checkpointing: bool = False, fused_loss: bool = False) -> int:
    """Bytes backward keeps alive at its peak (see the module docstring for the formula)."""
    e = _bytes_of(dtype)
    h, i, V = shape.hidden_size, shape.intermediate_size, shape.vocab_size
    tokens = batch * seq_len
    per_block = e * (4 * h + 2 * shape.q_dim + 2 * shape.kv_dim + 4 * i) + (8 * h if e < 4 else 0)
    # final norm (input + fp32 copy) and the LM-head input
    final = e * 2 * h + (4 * h if e < 4 else 0)
    # fused_loss: a chunked / fused linear-cross-entropy never holds full-vocabulary logits
    loss = 0 if fused_loss else e * V + (4 * V if e < 4 else 0) + 4 * V + 4 * V
    if grad_checkpointing:
        layers = shape.num_layers * e * h + per_block  # block inputs + one block recomputed
    else:
        layers = shape.num_layers * per_block
    return tokens * (layers + final + loss)


def estimate_memory(
    model: Union[str, ModelShape, Mapping[str, Any], Any] = "llama2-7b",
    method: str = "owlore",
    *,
    gamma: int = 5,
    rank: int = 128,
    lora_rank: int = 8,
    batch: int = 1,
    seq_len: int = 512,
    dtype: str = "bf16",
    grad_checkpointing: bool = False,
    fused_loss: bool = False,
    in_backward: bool = False,
    state_dtype: Optional[str] = None,
    lora_targets: tuple[str, ...] = LORA_TARGETS,
) -> MemoryEstimate:
    """Estimate the bytes of weights, gradients, optimizer state, projections and activations.

    ``model``: a built-in name (``llama2-7b``, ``llama3-8b``, ``mistral-7b``, ``smollm2-135m``),
    a path to an HF ``config.json`` (or its folder), a dict, an HF config object, or a model
    (an ``nn.Module`` with an HF ``config``: its parameters are counted and a difference from the
    LLaMA-shape count is noted). ``method``: one of ``full``, ``lora``, ``galore``, ``lisa``,
    ``owlore``. ``gamma`` sampled blocks (LISA, OwLore); ``rank`` of the GaLore projection
    (GaLore, OwLore); ``lora_rank``. ``state_dtype=None`` uses each method's implementation's
    own choice (module docstring). ``fused_loss``: the loss never materialises full-vocabulary
    logits.

    ``rank``: a weight with ``rank >= min(m, n)`` is noted in ``MemoryEstimate.notes`` (galore-torch
    and OwLoreAdamW project it onto all ``min(m, n)`` directions and still apply ``scale``); a rank
    above every block weight's ``min(m, n)`` (the hidden size, for LLaMA shapes) is a
    ``ValueError`` for ``galore`` and ``owlore``, since no weight could use it.

    ``in_backward``: the optimizer steps each parameter inside backward, as soon as its gradient
    is accumulated (``OwLoreAdamW.register_step_hooks``, or any step run from
    ``Tensor.register_post_accumulate_grad_hook``), and frees that gradient right after. autograd
    runs a parameter's gradient accumulation as soon as it is ready, so in one process at most
    one trainable parameter's gradient is alive at a time, and the gradient term is

        ``e * max_p numel(p)``  over the trainable parameters ``p`` (``e`` = bytes of a gradient)

    instead of ``e * sum_p numel(p)``. With tied embeddings that train, the LM head's partial
    gradient of the shared ``V x h`` matrix is computed first in backward and held (in flight)
    until the embedding's backward adds its own part at the very end, so ``e * V * h`` is added:
    ``e * (V h + max_p numel(p))``. Weights, optimizer state, projections and activations do not
    change. (Under FSDP2 the gradients of one unit, typically a block, share a reduce-scatter
    buffer and are alive together; these figures are for one unsharded process.)
    """
    shape = model_shape(model)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method in ("lisa", "owlore") and not 1 <= gamma <= shape.num_layers:
        raise ValueError(f"gamma must be in [1, {shape.num_layers}] for {shape.name}, got {gamma}")
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if lora_rank < 1:
        raise ValueError(f"lora_rank must be >= 1, got {lora_rank}")
    if batch < 1 or seq_len < 1:
        raise ValueError(f"batch and seq_len must be >= 1, got batch={batch}, seq_len={seq_len}")
    e = _bytes_of(dtype)
    if state_dtype is None:
        s = 4 if method in ("lisa", "owlore") else e
    else:
        s = _bytes_of(state_dtype)

    linears = shape.block_linear_shapes()
    notes: list[str] = []
    if method in ("galore", "owlore"):
        largest_min = max(min(m, n) for m, n in linears.values())
        if rank > largest_min:
            raise ValueError(f"rank must be <= {largest_min} (the largest min(m, n) of {shape.name}'s block weights) "
                             f"for method {method!r}, got {rank}: no weight could be projected to it")
        capped = [(name, min(m, n)) for name, (m, n) in linears.items() if rank >= min(m, n)]  # block order
        if capped:
            which = ", ".join(f"{name} ({k})" for name, k in capped)
            library = "galore-torch" if method == "galore" else "OwLoreAdamW"
            notes.append(f"rank {rank} >= min(m, n) for {which}: {library} projects these onto all min(m, n) "
                         "directions (a full orthonormal basis, the update still multiplied by scale); counted at "
                         "that size")
    if _is_module(model):
        counted = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        if counted != shape.total_params:
            notes.append(f"the model has {counted:,} parameters, the LLaMA-shape count of its config is "
                         f"{shape.total_params:,}: the figures are for the latter")

    total = shape.total_params
    weights = total * e
    projection = 0

    def galore_block(proj_bytes: int) -> tuple[int, int]:
        """(moment elements, projection bytes) of one block whose linears are projected onto
        ``min(rank, m, n)`` directions (galore-torch and OwLoreAdamW alike)."""
        moments = proj = 0
        for m, n in linears.values():
            r = min(rank, m, n)
            moments += 2 * max(m, n) * r
            proj += min(m, n) * r * proj_bytes
        return moments + 2 * shape.block_norm_params, proj  # norms: plain Adam

    # the largest single trainable tensor (in_backward), among those of a trained block and the
    # always-trained embeddings, LM head and final norm
    largest_block = max(m * n for m, n in linears.values())
    largest_always = max(shape.embedding_params, shape.head_params, shape.hidden_size)
    if method == "full":
        trainable = total
        gradients = trainable * e
        state = 2 * trainable * s
        largest = max(largest_block, largest_always)
    elif method == "lora":
        adapters = {name: lora_rank * (m + n) for name, (m, n) in linears.items() if name in lora_targets}
        trainable = shape.num_layers * sum(adapters.values())
        weights += trainable * 4  # fp32 adapters (peft autocast_adapter_dtype)
        gradients = trainable * 4
        state = 2 * trainable * 4  # torch AdamW: moments in the adapters' dtype (fp32)
        # the larger of A (r x n) and B (m x r) of the widest adapted weight
        largest = max((lora_rank * max(linears[name]) for name in adapters), default=0)
    elif method == "galore":
        trainable = total
        gradients = trainable * e
        moments, proj = galore_block(e)  # galore-torch keeps P in the param dtype
        state = (shape.num_layers * moments + 2 * shape.always_trained_params) * s
        projection = shape.num_layers * proj
        largest = max(largest_block, largest_always)
    else:  # lisa, owlore
        trainable = gamma * shape.block_params + shape.always_trained_params
        gradients = trainable * e
        if method == "lisa":
            state = 2 * trainable * s
        else:
            moments, proj = galore_block(4)  # OwLoreAdamW keeps P in fp32
            state = (gamma * moments + 2 * shape.always_trained_params) * s
            projection = gamma * proj
        largest = max(largest_block, largest_always)
    if in_backward:
        grad_e = 4 if method == "lora" else e
        held = shape.embedding_params if shape.tie_word_embeddings and method != "lora" else 0
        gradients = grad_e * (held + largest)
    activations = activation_bytes(shape, batch, seq_len, dtype, grad_checkpointing, fused_loss)
    settings = dict(gamma=gamma, rank=rank, lora_rank=lora_rank, batch=batch, seq_len=seq_len, dtype=dtype,
                    grad_checkpointing=grad_checkpointing, fused_loss=fused_loss, in_backward=in_backward,
                    state_bytes_per_element=s)
    return MemoryEstimate(shape.name, method, weights, gradients, state, projection, activations,
                          trainable, total, settings, notes)
