"""Workers for tests/test_fsdp.py: run in processes started by torch.multiprocessing.spawn
(which needs an importable target), and, with world=1, in the test process as the reference.

One spawn runs every scenario of a test module in turn (``run``), each rank saving a dict
of results; the test process compares them with one-process runs of the same functions.
"""
import contextlib
import os
import traceback

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import owlore_kernels
from tiny_models import PlainLM
from owlore_kernels.distributed import owlore_shard_placement

VOCAB, STEPS = 33, 6
# rank 4, a refresh every 2 updates: 3 refreshes in STEPS updates
GALORE = dict(rank=4, update_proj_gap=2, scale=1.0)


def TinyLM(d=21, h=39, n_blocks=4):
    """Odd sizes on purpose: under Shard(0) on 2 ranks every weight, bias and the embedding split unevenly.
    fc1 (h x d, h >= d) is projected on the right, fc2 (d x h) on the left."""
    return PlainLM(n_blocks=n_blocks, d=d, vocab=VOCAB, hidden=h)


def batches(world_batch=4, steps=STEPS, seed=7):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (world_batch, 6), generator=gen) for _ in range(steps)]


def build(world, *, h=39, placement=False, seed=0, sampler=True, variant=None):
    """Model (fully_shard-ed when world > 1), optimizer and sampler, identically on every rank."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = TinyLM(h=h)
    if world > 1:
        place = owlore_shard_placement(owlore_kernels.owlore_param_groups(model, **GALORE), world) if placement else None
        for block in model.blocks:
            fully_shard(block, shard_placement_fn=place)
        fully_shard(model, shard_placement_fn=place)
    groups = owlore_kernels.owlore_param_groups(model, **GALORE)  # after fully_shard: its DTensor params
    options = {} if variant is None else {"variant": variant}
    opt = owlore_kernels.OwLoreAdamW(groups, lr=1e-2, weight_decay=0.1, proj_method="randomized", **options)
    smp = None
    if sampler:
        smp = owlore_kernels.OwLoreSampler(model, opt, gamma=2, interval=2, prob_mode="uniform", seed=0,
                                           always_train=["embed", "head", "norm"])
    return model, opt, smp


def full_params(model):
    """Every param whole (DTensors gathered), detached, in registration order."""
    out = []
    for p in model.parameters():
        p = p.detach()
        out.append((p.full_tensor() if hasattr(p, "full_tensor") else p).clone())
    return out


def loss_of(model, tokens):
    logits = model(tokens[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


def train(rank, world, *, h=39, placement=False, in_backward=False, micro_batches=1, steps=STEPS, built=None,
          batch_list=None, recorder=None, fsdp_no_sync=False, step=None):
    """Train; each rank takes its slice of every global batch. Returns (params, sampler history).

    ``fsdp_no_sync``: accumulate with FSDP2's own switch (no reduce-scatter before the last
    micro-batch, so no hook fires either) instead of ``hooks.no_step()``. ``step``: called instead
    of ``opt.step`` (a compiled one)."""
    model, opt, smp = built if built is not None else build(world, h=h, placement=placement)
    step = opt.step if step is None else step
    hooks = opt.register_step_hooks(model) if in_backward else None
    history = []
    for tokens in (batch_list if batch_list is not None else batches())[:steps]:
        if smp is not None:
            smp.step()
            history.append(list(smp.active_layers))
        local = tokens.chunk(world)[rank]
        for i, micro in enumerate(local.chunk(micro_batches)):
            last = i == micro_batches - 1
            if fsdp_no_sync:
                model.set_requires_gradient_sync(last)
            with (contextlib.nullcontext() if last or hooks is None or fsdp_no_sync else hooks.no_step()):
                (loss_of(model, micro) / micro_batches).backward()
        with (recorder.recording() if recorder is not None else contextlib.nullcontext()):
            step()
        opt.zero_grad(set_to_none=True)
    if hooks is not None:
        hooks.remove()
    return full_params(model), history


# ------------------------------------------------------------ collectives
class CollectiveRecorder(TorchDispatchMode):
    """Records every c10d collective dispatched while ``recording()`` is active: (op, largest tensor numel)."""

    def __init__(self):
        super().__init__()
        self.calls = []  # one list per recording() block
        self._active = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self._active and func.namespace in ("c10d", "_c10d_functional"):
            sizes = [t.numel() for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            self.calls[-1].append((func.__name__, max(sizes, default=0)))
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def recording(self):
        self.calls.append([])
        self._active = True
        try:
            with self:
                yield
        finally:
            self._active = False


# -------------------------------------------------------------- scenarios
def state_layout(model, opt):
    """name -> {state key: (placements, local shape)} for the params holding optimizer state."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: {k: (str(v.placements), tuple(v.to_local().shape)) for k, v in st.items()
                           if hasattr(v, "placements")}
            for p, st in opt.state.items()}


def scenario_parity(rank, world):
    """Shard(0) (uneven everywhere), sampler on, step() after backward."""
    rec = CollectiveRecorder()
    built = build(world)
    params, history = train(rank, world, built=built, recorder=rec)
    return {"params": params, "history": history, "collectives": rec.calls, "state": state_layout(*built[:2]),
            "state_bytes": built[1].state_bytes()}


def scenario_compiled(rank, world):
    """scenario_parity with torch.compile(opt.step): sharded GaLore updates run in the step's
    eager schedule, the plain params' local shards in the compiled graph."""
    import torch._dynamo.testing

    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    built = build(world)
    compiled, steps = torch.compile(built[1].step, backend=counter), []

    def step():
        with torch._dynamo.config.patch(error_on_recompile=bool(steps)):  # compiled at the first step only
            compiled()
        steps.append(counter.frame_count)

    params, history = train(rank, world, built=built, step=step)
    return {"params": params, "history": history, "frames": steps}


def scenario_in_backward(rank, world):
    params, history = train(rank, world, in_backward=True)
    return {"params": params, "history": history}


def scenario_accumulate(rank, world):
    """Two micro-batches per step, in-backward steps on the last one only."""
    params, history = train(rank, world, in_backward=True, micro_batches=2)
    return {"params": params, "history": history}


def scenario_accumulate_fsdp_no_sync(rank, world):
    """Two micro-batches per step with FSDP2's set_requires_gradient_sync(False) before the last."""
    params, history = train(rank, world, in_backward=True, micro_batches=2, fsdp_no_sync=True)
    return {"params": params, "history": history}


def scenario_placement(rank, world):
    """owlore_shard_placement: left-projected weights by columns; record step()'s collectives."""
    rec = CollectiveRecorder()
    built = build(world, h=40, placement=True)
    placements = {n: str(p.placements) for n, p in built[0].named_parameters() if n.startswith("blocks.0.")}
    params, history = train(rank, world, h=40, built=built, recorder=rec)
    return {"params": params, "history": history, "collectives": rec.calls, "placements": placements,
            "state": state_layout(*built[:2])}


def scenario_resume(rank, world, ckpt_dir):
    """3 steps, save (DCP), rebuild from another init, load, 3 more steps; vs 6 straight steps (scenario_parity)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    all_batches = batches()
    model, opt, smp = build(world)
    train(rank, world, built=(model, opt, smp), batch_list=all_batches[:3])
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt),
             "sampler": smp.state_dict()}
    dcp.save(state, checkpoint_id=ckpt_dir)
    saved_keys = sorted(state["optim"]["state"])
    del model, opt, smp, state

    model, opt, smp = build(world, seed=1)  # other weights: loading must overwrite them all
    state = {"model": get_model_state_dict(model), "sampler": smp.state_dict()}
    dcp.load(state, checkpoint_id=ckpt_dir)
    set_model_state_dict(model, state["model"])
    smp.load_state_dict(state["sampler"])  # freezes the saved active blocks, so the optimizer's
    osd = {"optim": get_optimizer_state_dict(model, opt)}  # template holds state for exactly those
    dcp.load(osd, checkpoint_id=ckpt_dir)
    set_optimizer_state_dict(model, opt, osd["optim"])
    loaded_keys = sorted(get_optimizer_state_dict(model, opt)["state"])
    params, history = train(rank, world, built=(model, opt, smp), batch_list=all_batches[3:])
    return {"params": params, "history": history, "saved_keys": saved_keys, "loaded_keys": loaded_keys}


def _raises(fn):
    try:
        fn()
    except (ValueError, RuntimeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def scenario_errors(rank, world):
    """Layouts the sharded step refuses, each raising before anything is modified."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    out = {}
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    full, grad = torch.randn(12, 10), torch.randn(12, 10)

    def galore_step(placements, device_mesh=mesh, **options):
        p = nn.Parameter(distribute_tensor(full.clone(), device_mesh, placements))
        p.grad = distribute_tensor(grad.clone(), device_mesh, placements)
        before = p.detach().to_local().clone()
        opt = owlore_kernels.OwLoreAdamW([{"params": [p], "rank": 2}], **{"proj_method": "randomized", **options})
        message = _raises(opt.step)
        return message, torch.equal(before, p.detach().to_local()) and not opt.state

    out["replicate"] = galore_step([Replicate()])
    out["svd"] = galore_step([Shard(0)], proj_method="svd")
    mesh2d = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "shard"))
    out["mesh2d"] = galore_step([Replicate(), Shard(0)], device_mesh=mesh2d)
    # a gradient sharded unlike its param after steps whose checks passed: checked again, refused
    p = nn.Parameter(distribute_tensor(full.clone(), mesh, [Shard(0)]))
    opt = owlore_kernels.OwLoreAdamW([{"params": [p], "rank": 2}], proj_method="randomized")
    for _ in range(2):
        p.grad = distribute_tensor(grad.clone(), mesh, [Shard(0)])
        opt.step()
    p.grad = distribute_tensor(grad.clone(), mesh, [Replicate()])
    before, steps = p.detach().to_local().clone(), opt.state[p]["step"]
    message = _raises(opt.step)
    out["grad_placement"] = message, torch.equal(before, p.detach().to_local()) and opt.state[p]["step"] == steps
    # in-backward with DDP, or with plain params in a multi-process job
    model = nn.Sequential(nn.Linear(6, 6))
    opt = owlore_kernels.OwLoreAdamW(model.parameters())
    ddp = nn.parallel.DistributedDataParallel(model)
    out["ddp_hooks"] = _raises(lambda: opt.register_step_hooks(ddp))
    out["plain_hooks"] = _raises(lambda: opt.register_step_hooks(model))
    return out


LAYOUT_CASES = [  # (shape, proj_type, shard dim, dtype): every side on both placements, uneven splits on 2 ranks
    ((13, 9), "left", 0, "float32"), ((13, 9), "left", 1, "float32"), ((13, 9), "right", 0, "float32"),
    ((13, 9), "right", 1, "float32"), ((13, 9), "full", 0, "float32"), ((13, 9), "full", 1, "float32"),
    ((9, 14), "std", 0, "float32"), ((14, 9), "std", 1, "float32"),
    ((13, 9), "left", 0, "bfloat16"), ((13, 9), "right", 1, "bfloat16"),
]
LAYOUT_STEPS = 5  # refreshes at updates 1, 3, 5


def layout_gradients(shape, steps=LAYOUT_STEPS, seed=3):
    """Rank-4-dominated gradients with well separated singular values (8, 4, 2, 1 on a 1e-2 floor), so the
    top-4 subspace is well conditioned: its rounding sensitivity is eps / (relative gap ~ 0.5)."""
    gen = torch.Generator().manual_seed(seed)
    m, n = shape
    out = []
    for _ in range(steps):
        u = torch.linalg.qr(torch.randn(m, 4, generator=gen)).Q
        v = torch.linalg.qr(torch.randn(n, 4, generator=gen)).Q
        out.append(u @ torch.diag(torch.tensor([8.0, 4.0, 2.0, 1.0])) @ v.t() + 1e-2 * torch.randn(m, n, generator=gen))
    return out


def train_layout(case, mesh=None):
    """OwLoreAdamW on one weight fed fixed gradients; sharded over ``mesh`` if given."""
    from torch.distributed.tensor import Shard, distribute_tensor

    shape, proj_type, shard_dim, dtype = case
    torch.manual_seed(0)
    weight = torch.randn(shape).to(getattr(torch, dtype))
    if mesh is not None:
        weight = distribute_tensor(weight, mesh, [Shard(shard_dim)])
    p = nn.Parameter(weight)
    # "full": at a refresh R = P^T G Q^T is diagonal up to rounding (P, Q are G's singular vectors), and
    # Adam turns its ~1e-7 off-diagonal rounding noise into N ~ noise / (|noise| + eps): with eps = 1e-6
    # that is O(0.1) and differs between any two summation orders (5e-5 in W after 5 updates). eps = 1e-3
    # bounds it to lr * 1e-7 / 1e-3 = 1e-6 per update, so the comparison tests the sharding, not the noise.
    eps = 1e-3 if proj_type == "full" else 1e-6
    opt = owlore_kernels.OwLoreAdamW([{"params": [p], "rank": 3, "update_proj_gap": 2, "proj_type": proj_type}],
                                     lr=1e-2, eps=eps, weight_decay=0.1, proj_method="randomized", seed=5)
    for grad in layout_gradients(shape):
        grad = grad.to(weight.dtype)
        p.grad = grad if mesh is None else distribute_tensor(grad, mesh, [Shard(shard_dim)])
        opt.step()
    out = p.detach()
    return out.full_tensor() if mesh is not None else out.clone()


def scenario_layouts(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    return {case: train_layout(case, mesh=mesh) for case in LAYOUT_CASES}


SCENARIOS = {
    "layouts": scenario_layouts,
    "parity": scenario_parity,
    "compiled": scenario_compiled,
    "in_backward": scenario_in_backward,
    "accumulate": scenario_accumulate,
    "accumulate_fsdp_no_sync": scenario_accumulate_fsdp_no_sync,
    "placement": scenario_placement,
    "resume": scenario_resume,
    "errors": scenario_errors,
}


def run(rank, world, port, out_dir, names):
    """mp.spawn target: every named scenario in turn; rank r's results go to out_dir/rank{r}.pt."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    results = {}
    try:
        for name in names:
            if name == "resume":
                results[name] = scenario_resume(rank, world, os.path.join(out_dir, "ckpt"))
            else:
                results[name] = SCENARIOS[name](rank, world)
    except Exception:  # keep the traceback: mp.spawn reports only the last line of a child's error
        results["error"] = traceback.format_exc()
        raise
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()
