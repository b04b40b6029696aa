"""Training-memory estimator: trace one real training step of the model on fake tensors.

``estimate_memory(model, method, ...)`` builds the model from its Hugging Face config on fake
tensors (``torch._subclasses.fake_tensor.FakeTensorMode``: shapes, dtypes and storages, no
data, so LLaMA-2-7B costs no memory), wraps it with the benchmark's own method builder
(``owlore_kernels.bench.methods.build``: one definition of full, lora, galore, lisa and
owlore), and runs the benchmark's own training step (``methods.train_step``) twice -- sampler,
forward with or without gradient checkpointing, the model's own loss (or the chunked loss of
``owlore_kernels.losses``), backward, optimizer step (or in-backward steps) -- so that the
second step runs with the optimizer state in place. A :class:`MemoryTracker` (a
``TorchDispatchMode``) records every storage an op returns and drops it when the storage dies.

Counting. Each storage counts ``512 * ceil(nbytes / 512)`` bytes, the block size the CUDA
caching allocator hands out (``torch.cuda.max_memory_allocated`` counts those blocks), from
the op that creates it until its last reference goes (a weakref finalizer on the untyped
storage). Views share their base's storage and cost nothing. Allocations inside a kernel that
are not returned to Python (cuBLAS workspaces, the CUDA context) are not seen.

The answer (:class:`MemoryEstimate`): the peak of the live bytes over both steps, the phase it
falls in (forward, loss, backward, optimizer step), and the live bytes at that moment by role:
weights (params and buffers), gradients (every storage that became a ``.grad``), optimizer
state (Adam moments, step counters), projections (GaLore/OwLore bases), and activations and
temporaries (everything else). A storage's role is learned when it is seen as such (a
post-accumulate-grad hook, the optimizer state after a step) and applies to its whole life.

What is traced where it cannot read values:

* the outlier scores of ``prob_mode="owl"`` would read the weights: the sampler gets uniform
  scores (its ``scores=`` argument). Every block of a LLaMA-style model has the same shapes, so
  which blocks are drawn does not change the memory;
* OwLoreAdamW's NaN/inf check at a subspace refresh reads the gradient: OwLoreAdamW skips it for
  fake gradients (``torch._subclasses.fake_tensor.is_fake``) and runs it on real ones;
* Hugging Face's causal-mask builder reads the position ids to detect packed sequences, which
  fake tensors cannot answer, and would then build an explicit ``B x 1 x T x T`` mask. The trace
  registers transformers' own SDPA attention under the name ``ATTENTION`` with no mask function,
  which is what an unpadded, unpacked batch gets from ``sdpa``: ``is_causal=True``, no mask.

Fake tensors live on the CPU here (a CPU-only torch cannot create fake CUDA tensors), so the
trace runs the CPU kernels' choices where they differ from CUDA (SDPA: the CPU flash kernel,
which also keeps ``out`` and an fp32 log-sum-exp; OwLoreAdamW's fused ops: their fake
implementations, which allocate what the Triton launchers allocate). ``device="cuda"`` traces
on fake CUDA tensors where torch is built with CUDA.

OwLoreAdamW on CUDA keeps, for bf16/fp16 weights, a copy of each basis in the weight's dtype
(``proj_dot``: the tensor-core GEMMs read both operands in that dtype); on CPU it does not.
``step_device`` says whose step the trace models, whatever its tensors' device: ``"cuda"`` (the
default) counts the copies (role ``projection``), ``"cpu"`` does not. A real run (``fake=False``)
makes the same choice, passing the copies to the CPU kernels, which accept a basis in the
weight's dtype.

``state_dtype`` (bf16 Adam moments): passed to OwLoreAdamW as its ``state_dtype`` option, so the
trace holds the real bf16 moments.

``offload_checkpoints`` (the inputs of checkpointed blocks in pinned host memory): the model is
prepared as the bench prepares it, with transformers' ``activation_checkpointing_enable(offload=
True)``, whose checkpoint runs inside torch's ``save_on_cpu`` hooks. Here every tensor is on the
CPU, so for the trace transformers' ``save_on_cpu`` is replaced by the class of
:func:`_traced_save_on_cpu`: its pack makes the host copy and gives it the role ``host``, counted
apart from the device's bytes (``MemoryEstimate.host``: their peak), and its unpack makes a new
tensor, the copy back to the device in backward. The device tensor is released when nothing else holds it, as on a GPU.

Bytes are bytes; :func:`format_bytes` prints GiB (2**30), as GPU tools do.
"""
from __future__ import annotations

import contextlib
import json
import os
import weakref
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Optional, Union

from .bench.methods import LORA_TARGETS, METHODS  # noqa: F401  (one definition of the methods: the bench's)
PHASES = ("forward", "loss", "backward", "optimizer step")
ROLES = ("weights", "gradients", "optimizer_state", "projection", "activations")
DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
          "fp16": "float16", "float16": "float16"}
BLOCK = 512  # the CUDA caching allocator's rounding: every block is a multiple of 512 bytes
ATTENTION = "sdpa_unpadded"

# Hugging Face config.json fields of the built-in models (no download): LLaMA-style decoders
BUILTIN_CONFIGS: dict[str, dict[str, Any]] = {
    # meta-llama/Llama-2-7b-hf; 6.74e9 parameters
    "llama2-7b": dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                      max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False),
    # meta-llama/Meta-Llama-3-8B (GQA, 8 kv heads); 8.03e9 parameters
    "llama3-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
                      tie_word_embeddings=False),
    # mistralai/Mistral-7B-v0.1 (GQA, 8 kv heads); 7.24e9 parameters
    "mistral-7b": dict(model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=None,
                       tie_word_embeddings=False),
    # HuggingFaceTB/SmolLM2-135M(-Instruct): the benchmark's default model; tied embeddings
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True),
}


# ----------------------------------------------------------------------------- configs
def load_config_dict(model: Union[str, Mapping[str, Any]]) -> dict[str, Any]:
    """A built-in name, a config.json path (file or folder) or a dict -> the config as a dict."""
    if isinstance(model, Mapping):
        return dict(model)
    key = model.lower()
    if key in BUILTIN_CONFIGS:
        return dict(BUILTIN_CONFIGS[key], _name_or_path=key)
    path = os.path.join(model, "config.json") if os.path.isdir(model) else model
    if not os.path.isfile(path):
        raise ValueError(f"unknown model {model!r}: expected one of {sorted(BUILTIN_CONFIGS)} or a path to an "
                         "HF config.json")
    with open(path) as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a JSON {type(config).__name__}, expected an object (an HF config)")
    config.setdefault("_name_or_path", model)
    return config


def model_config(model: Any):
    """A ``transformers.PretrainedConfig`` from a built-in name, a config.json path, a dict, a config or a model."""
    import torch
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(model, PretrainedConfig):
        return model
    if isinstance(model, torch.nn.Module):
        config = getattr(model, "config", None)
        if not isinstance(config, PretrainedConfig):
            raise TypeError(f"model is a {type(model).__name__} without a Hugging Face `config`; pass its config "
                            "(a dict or a config.json path) or a built-in name")
        return config
    if not isinstance(model, (str, Mapping)):
        raise TypeError("model must be a name, a config path, a dict, an HF config or an nn.Module with a config, "
                        f"got {type(model).__name__}")
    d = load_config_dict(model)
    if "model_type" not in d:
        d["model_type"] = "llama"  # the LLaMA-style configs this project was written for
    d = dict(d)
    model_type = d.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **d)
    except (ValueError, KeyError) as exc:
        raise ValueError(f"config {d.get('_name_or_path', '?')!r}: {exc}") from None


def config_name(config) -> str:
    return str(getattr(config, "_name_or_path", "") or config.model_type)


def num_blocks(config) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.num_hidden_layers)


# ----------------------------------------------------------------------------- tracker
def _traced_save_on_cpu(tracker: "MemoryTracker"):
    """A stand-in for torch's ``save_on_cpu`` (as transformers' offloading checkpoint calls it) in
    a trace where every tensor is on the CPU: a ``saved_tensors_hooks`` class whose pack copies a
    saved tensor to a new storage with the role ``host`` (the pinned copy; the device's bytes do
    not count it) and whose unpack copies it back to a new storage (the device copy a backward
    makes). It is put in transformers' place for one trace."""
    import torch

    class TracedSaveOnCpu(torch.autograd.graph.saved_tensors_hooks):
        def __init__(self, pin_memory: bool = False, device_type: str = "cuda") -> None:
            def pack(t):
                host = torch.empty(t.shape, dtype=t.dtype, layout=t.layout, device=t.device)
                host.copy_(t)
                tracker.track(host, "host")
                return host

            super().__init__(pack, lambda host: host.clone())

    return TracedSaveOnCpu


class MemoryTracker:
    """Records the storages that ops return, and when each dies, as CUDA's allocator would count them.

    Use ``with tracker:`` around the traced code; ``track(tensor)`` adds storages that exist
    already (the model's params). The record is a list of events (``+serial`` when a storage is
    first seen, ``-serial`` when it dies) with phase marks between them; ``replay`` turns it into
    the peak and the bytes by role at the peak. Storage identities are serial numbers: the
    address of a freed storage may be reused by the next one.
    """

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_leaves(out):
                    tracker._see(t)
                return out

        self._mode = _Mode()
        self._live: dict[int, int] = {}  # storage address -> serial
        self.nbytes: dict[int, int] = {}  # serial -> storage bytes (unrounded)
        self.events: list[int] = []
        self.marks: list[tuple[int, str, int]] = []  # (event index, phase, step)
        self.roles: dict[int, str] = {}  # serial -> role, once known
        self.step = 0
        self.accounted_at: list[int] = []  # event indices right after each optimizer step

    def __enter__(self) -> "MemoryTracker":
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)

    def _see(self, t: Any) -> Optional[int]:
        import torch

        if not isinstance(t, torch.Tensor):
            return None
        storage = t.untyped_storage()
        address = storage._cdata
        serial = self._live.get(address)
        if serial is None:
            serial = len(self.nbytes) + 1
            self._live[address] = serial
            self.nbytes[serial] = storage.nbytes()
            self.events.append(serial)
            weakref.finalize(storage, self._free, address, serial)
        return serial

    def _free(self, address: int, serial: int) -> None:
        if self._live.get(address) == serial:
            del self._live[address]
        self.events.append(-serial)

    def track(self, t: Any, role: Optional[str] = None) -> None:
        """Count ``t``'s storage from now on (if not yet counted) and, with ``role``, give it that role."""
        serial = self._see(t)
        if serial is not None and role is not None:
            self.roles[serial] = role

    def mark(self, phase: str) -> None:
        self.marks.append((len(self.events), phase, self.step))

    def replay(self) -> dict[str, Any]:
        """The peak of the rounded live bytes, its phase and step, the bytes by role there, each
        phase's peak, and the unrounded bytes of weights + gradients + state right after each
        optimizer step (the benchmark's "p+g+s"), the largest of them."""

        def size(serial: int, rounded: bool) -> int:
            n = self.nbytes[serial]
            return -(-n // BLOCK) * BLOCK if rounded else n

        host = host_peak = 0  # role "host": offloaded copies in host memory, not the device's bytes

        by_role = dict.fromkeys(ROLES, 0)
        raw_by_role = dict.fromkeys(ROLES, 0)
        live = peak = 0
        at_peak: dict[str, int] = dict(by_role)
        peak_phase, peak_step = "setup", 0
        phase_peaks: dict[str, int] = {}
        marks = sorted(self.marks)
        accounted = set(self.accounted_at)
        accounted_max = 0
        mi, phase, step = 0, "setup", 0
        for i in range(len(self.events) + 1):
            while mi < len(marks) and marks[mi][0] == i:
                _, phase, step = marks[mi]
                mi += 1
            if i in accounted:
                accounted_max = max(accounted_max, sum(raw_by_role[r] for r in ROLES if r != "activations"))
            if i == len(self.events):
                break
            e = self.events[i]
            serial, sign = abs(e), (1 if e > 0 else -1)
            role = self.roles.get(serial, "activations")
            n = sign * size(serial, True)
            if role == "host":
                host += n
                host_peak = max(host_peak, host)
                continue
            by_role[role] += n
            raw_by_role[role] += sign * size(serial, False)
            live += n
            if live > phase_peaks.get(phase, -1):
                phase_peaks[phase] = live
            if live > peak:
                peak, at_peak, peak_phase, peak_step = live, dict(by_role), phase, step
        return dict(peak=peak, at_peak=at_peak, phase=peak_phase, step=peak_step, phase_peaks=phase_peaks,
                    accounted=accounted_max, host_peak=host_peak)


# ----------------------------------------------------------------------------- the traced step
def _register_attention() -> None:
    """transformers' SDPA attention under the name ``ATTENTION``, without a mask function: the
    mask builder then returns None and SDPA runs with ``is_causal=True`` (see the module docstring)."""
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION, ALL_ATTENTION_FUNCTIONS["sdpa"])


def _materialize(model, device, make) -> None:
    """Replace every param and buffer of a meta-device ``model`` by ``make(meta_tensor)`` on ``device``,
    keeping shared (tied) tensors shared."""
    import torch

    memo: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for table, is_param in ((module._parameters, True), (module._buffers, False)):
            for name, t in list(table.items()):
                if t is None:
                    continue
                if id(t) not in memo:
                    new = make(t)
                    memo[id(t)] = torch.nn.Parameter(new, requires_grad=t.requires_grad) if is_param else new
                table[name] = memo[id(t)]


def build_model(config, cfg: dict[str, Any], method: str, device: str = "cpu", fake_mode: Any = None):
    """The causal LM of ``config`` in ``cfg["dtype"]``, prepared for training (``methods.prepare_model``)
    and, for lora, wrapped (``methods.wrap_lora``). With a ``fake_mode`` it is built on the meta
    device, prepared and wrapped there (a module's ``.to()`` cannot convert fake params), then given
    fake storages on ``device``; otherwise it is real, randomly initialised with ``cfg["seed"]``."""
    import torch
    from transformers import AutoModelForCausalLM

    from owlore_kernels.bench import methods

    _register_attention()
    torch_dtype = getattr(torch, DTYPES[cfg["dtype"]])
    if fake_mode is None:
        torch.manual_seed(cfg["seed"])
    with torch.device("meta" if fake_mode is not None else device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, attn_implementation=ATTENTION)
    methods.prepare_model(model, cfg)
    if method == "lora":
        model = methods.wrap_lora(model, cfg)
    if fake_mode is not None:
        with fake_mode:
            _materialize(model, device, lambda t: torch.empty(t.shape, dtype=t.dtype, device=device))
    return model


@dataclass
class MemoryEstimate:
    """The traced peak of one training step, its phase, and the live bytes by role at the peak."""

    model: str
    method: str
    peak: int
    phase: str
    weights: int
    gradients: int
    optimizer_state: int
    projection: int
    activations: int  # activations and temporaries: everything else alive at the peak
    trainable_params: int
    total_params: int
    # params + gradients + state + projections right after an optimizer step (unrounded, the largest of
    # the two steps, buffers left out): what the bench counts as "p+g+s" at the same moment
    accounted: int = 0
    phase_peaks: dict[str, int] = field(default_factory=dict)
    host: int = 0  # peak bytes offloaded to host memory (offload_checkpoints), not part of ``peak``
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    COMPONENTS = ROLES

    @property
    def total(self) -> int:
        """The peak: the sum of the components at that moment."""
        return self.peak

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["total"] = self.total
        return d

    def table(self) -> str:
        """A printable breakdown, GiB and bytes."""
        s = self.settings
        flags = [f"{k}" for k in ("grad_checkpointing", "offload_checkpoints", "chunked_loss", "in_backward")
                 if s.get(k)]
        lines = [
            f"model {self.model}  method {self.method}  dtype {s.get('dtype')}  batch {s.get('batch')}  "
            f"seq-len {s.get('seq_len')}"
            + (f"  gamma {s['gamma']}" if self.method in ("lisa", "owlore") else "")
            + (f"  rank {s['rank']}" if self.method in ("galore", "owlore") else "")
            + (f"  lora-rank {s['lora_rank']}" if self.method == "lora" else "")
            + (f"  state-dtype {s['state_dtype']}" if s.get("state_dtype") else "")
            + ("  " + " ".join(flags) if flags else ""),
            f"trainable params {self.trainable_params:,} of {self.total_params:,}",
            f"peak {format_bytes(self.peak)} ({self.peak:,} B) in the {self.phase}; at the peak:",
        ]
        for c in self.COMPONENTS:
            value = getattr(self, c)
            label = "activations+tmp" if c == "activations" else c
            lines.append(f"  {label:<16} {format_bytes(value):>12}  {value:>16,} B")
        lines.append("  peak per phase: " + ", ".join(f"{p} {format_bytes(v)}" for p, v in self.phase_peaks.items()))
        if s.get("offload_checkpoints"):
            lines.append(f"  host memory (offloaded checkpoint inputs, peak; not in the peak above): "
                         f"{format_bytes(self.host)} ({self.host:,} B)")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def format_bytes(n: float) -> str:
    if n >= 2**28:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def estimate_memory(
    model: Any = "llama2-7b",
    method: str = "owlore",
    *,
    gamma: int = 5,
    rank: int = 128,
    lora_rank: int = 8,
    batch: int = 1,
    seq_len: int = 512,
    dtype: str = "bf16",
    grad_checkpointing: bool = False,
    offload_checkpoints: bool = False,
    chunked_loss: bool = False,
    chunk_size: Optional[int] = None,
    in_backward: bool = False,
    state_dtype: Optional[str] = None,
    proj_method: str = "randomized",
    device: str = "cpu",
    fake: bool = True,
    step_device: str = "cuda",
    method_options: Optional[Mapping[str, Any]] = None,
) -> MemoryEstimate:
    """Trace two training steps of ``model`` with ``method`` and return the peak and its breakdown.

    ``model``: a built-in name (``llama2-7b``, ``llama3-8b``, ``mistral-7b``, ``smollm2-135m``),
    a path to an HF ``config.json`` (or its folder), a dict, an HF config, or a model (its
    ``config`` is used; the traced model is a fresh one built from it). ``method``: ``full``,
    ``lora``, ``galore``, ``lisa``, ``owlore``, built by ``owlore_kernels.bench.methods.build``
    with the benchmark's defaults (``method_options`` overrides them: lr, scales,
    update_proj_gap, interval, seed, ...). ``gamma`` sampled blocks (lisa, owlore); ``rank`` of
    the projection (galore, owlore); ``lora_rank``; ``batch`` sequences of ``seq_len`` tokens;
    ``dtype`` of the weights; ``grad_checkpointing``; ``offload_checkpoints`` (with it: the
    checkpointed blocks' inputs in host memory, ``MemoryEstimate.host``, see the module
    docstring); ``chunked_loss`` (the loss of
    ``owlore_kernels.losses``, ``chunk_size`` tokens at a time); ``in_backward``
    (``methods.enable_in_backward``: each param steps inside backward and frees its gradient);
    ``state_dtype`` of OwLoreAdamW's moments (lisa, owlore; see the module docstring);
    ``proj_method`` of OwLore's refresh. ``fake=False`` runs the same step on real, randomly
    initialised tensors (small models: it allocates everything). ``step_device``: the device whose
    optimizer step is modelled, ``"cuda"`` or ``"cpu"`` (see the module docstring).
    """
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from owlore_kernels.bench import methods

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if step_device not in ("cuda", "cpu"):
        raise ValueError(f"step_device must be 'cuda' or 'cpu', got {step_device!r}")
    if state_dtype is not None:
        if state_dtype not in DTYPES:
            raise ValueError(f"state_dtype must be one of {sorted(DTYPES)} or None, got {state_dtype!r}")
        if method not in ("lisa", "owlore"):
            raise ValueError(f"state_dtype={state_dtype!r} is an OwLoreAdamW option (lisa, owlore), not of "
                             f"method {method!r}")
    for name, value in (("batch", batch), ("seq_len", seq_len), ("rank", rank), ("lora_rank", lora_rank)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if offload_checkpoints and not grad_checkpointing:
        raise ValueError("offload_checkpoints=True holds the inputs of checkpointed blocks in host memory: it needs "
                         "grad_checkpointing=True")
    config = model_config(model)
    n_blocks = num_blocks(config)
    if method in ("lisa", "owlore") and not 1 <= gamma <= n_blocks:
        raise ValueError(f"gamma must be in [1, {n_blocks}] for {config_name(config)}, got {gamma}")
    cfg = dict(methods.DEFAULTS, gamma=gamma, rank=rank, lora_rank=lora_rank, batch=batch, seq_len=seq_len,
               dtype=dtype, grad_checkpointing=grad_checkpointing, offload_checkpoints=offload_checkpoints,
               chunked_loss=chunked_loss, chunk_size=chunk_size,
               in_backward=in_backward, proj_method=proj_method, block_scores=[1.0] * n_blocks,
               **dict(method_options or {}))
    if state_dtype is not None:
        cfg["state_dtype"] = getattr(torch, DTYPES[state_dtype])
    notes: list[str] = []
    tracker = MemoryTracker()
    fake_mode = FakeTensorMode() if fake else None
    net = build_model(config, cfg, method, device, fake_mode)
    with fake_mode or contextlib.nullcontext():
        net.train()
        setup = methods.build(method, net, cfg)
        net = setup.model
        params = methods.unique_params(net)
        for p in params:
            tracker.track(p, "weights")
            if p.requires_grad:  # registered before any in-backward hook: it sees each gradient before a step frees it
                p.register_post_accumulate_grad_hook(lambda q: tracker.track(q.grad, "gradients"))
        buffer_bytes = 0  # counted as weights at the peak, but not in the bench's params + grads + state
        for b in net.buffers():
            tracker.track(b, "weights")
            buffer_bytes += b.untyped_storage().nbytes()
        if in_backward:
            methods.enable_in_backward(setup)
        trainable = 0

        def learn_state() -> None:
            for opt in setup.optimizers():
                for key, t in methods.state_tensors(opt):
                    tracker.track(t, "projection" if methods.is_projection_key(key) else "optimizer_state")

        import functools
        import unittest.mock

        from . import optim

        # OwLoreAdamW keeps a 16-bit copy of each basis for the tensor-core GEMMs on CUDA only: the
        # trace's weights keep one when it stands in for a CUDA step, whatever their own device
        basis_copies = unittest.mock.patch.object(
            optim, "_keeps_dot_copy", functools.partial(optim._keeps_dot_copy, device_type=step_device))
        offloading = contextlib.nullcontext()
        if offload_checkpoints:  # transformers' checkpoint looks save_on_cpu up in its module at each call
            import transformers.modeling_utils

            offloading = unittest.mock.patch.object(transformers.modeling_utils, "save_on_cpu",
                                                    _traced_save_on_cpu(tracker))
        with tracker, offloading, basis_copies:
            for step in range(2):
                tracker.step = step + 1
                ids = torch.zeros(batch, seq_len, dtype=torch.long, device=device)
                labels = torch.zeros(batch, seq_len, dtype=torch.long, device=device)
                methods.train_step(setup, ids, labels, cfg, mark=tracker.mark)
                for p in params:
                    if p.grad is not None:
                        tracker.track(p.grad, "gradients")
                learn_state()
                tracker.accounted_at.append(len(tracker.events))
                trainable = max(trainable, methods.trainable_params(net))
                tracker.mark("zero_grad")
                for opt in setup.optimizers():
                    opt.zero_grad(set_to_none=True)
                del ids, labels
        total_params = sum(p.numel() for p in params)
    result = tracker.replay()
    at = result["at_peak"]
    settings = dict(gamma=gamma, rank=rank, lora_rank=lora_rank, batch=batch, seq_len=seq_len, dtype=dtype,
                    grad_checkpointing=grad_checkpointing, offload_checkpoints=offload_checkpoints,
                    chunked_loss=chunked_loss, chunk_size=chunk_size, in_backward=in_backward,
                    state_dtype=state_dtype, proj_method=proj_method, device=device, fake=fake, step_device=step_device,
                    peak_step=result["step"])
    phase_peaks = {p: result["phase_peaks"][p] for p in PHASES if p in result["phase_peaks"]}
    return MemoryEstimate(config_name(config), method, result["peak"], result["phase"], at["weights"],
                          at["gradients"], at["optimizer_state"], at["projection"], at["activations"],
                          trainable, total_params, result["accounted"] - buffer_bytes, phase_peaks,
                          result["host_peak"], settings, notes)
