"""DistributedDataParallel: OwLoreAdamW + OwLoreSampler on 2 CPU processes (gloo).

DDP averages gradients before ``opt.step()``, so every rank projects the same
gradient, takes the same SVD and draws the same blocks (same seed): the ranks
stay identical, and match one process that accumulates the same per-rank
gradients (see ``train``) bit for bit. The recipe
this test pins down (README, "DDP"): build the param groups, optimizer and
sampler on the bare model, then wrap it in DDP with
``find_unused_parameters=True`` (frozen blocks produce no gradient), before
the first ``sampler.step()``.
"""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import owlore_kernels
from tiny_models import PlainLM

STEPS, WORLD = 6, 2


def batches():
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(0, 32, (2 * WORLD, 5), generator=gen) for _ in range(STEPS)]


def train(rank: int, world: int, slices: int = 1):
    """Train for STEPS; each rank takes its slice of every global batch. Returns the final params.

    ``slices > 1`` (one process) is DDP's arithmetic without DDP: the backward of each of the
    ``slices`` rank slices accumulates into ``.grad`` (g0 + g1), then ``.grad / slices``.
    DDP divides each rank's gradient by the world size and all-reduces: g0/2 + g1/2, which
    is the same number, since halving is exact in binary floating point (barring
    underflow) and a two-term sum is commutative. So the comparison can be exact: no
    tolerance has to absorb a subspace refresh's sensitivity to rounding.
    """
    torch.manual_seed(0)
    model = PlainLM(n_blocks=4, d=24, vocab=32)
    groups = owlore_kernels.owlore_param_groups(model, rank=4, update_proj_gap=3, scale=1.0)
    opt = owlore_kernels.OwLoreAdamW(groups, lr=1e-2, backend="torch")
    sampler = owlore_kernels.OwLoreSampler(model, opt, gamma=2, interval=2, prob_mode="uniform", seed=0,
                                           always_train=["embed", "head", "norm"])
    net = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True) if world > 1 else model
    history = []
    for tokens in batches():
        sampler.step()
        history.append(list(sampler.active_layers))
        for local in tokens.chunk(world)[rank:rank + 1] if slices == 1 else tokens.chunk(slices):
            logits = net(local[:, :-1])
            loss = nn.functional.cross_entropy(logits.reshape(-1, 32), local[:, 1:].reshape(-1))
            loss.backward()
        if slices > 1:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.div_(slices)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return [p.detach().clone() for p in model.parameters()], history


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        params, history = train(rank, world)
        torch.save({"params": params, "history": history}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed gloo missing")
def test_ddp_ranks_agree_and_match_one_process(tmp_path):
    mp.spawn(_worker, args=(WORLD, _free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: the same kernels on the same shapes
    try:
        single_params, single_history = train(0, 1, slices=WORLD)
    finally:
        torch.set_num_threads(threads)
    assert results[0]["history"] == results[1]["history"] == single_history
    for a, b, c in zip(results[0]["params"], results[1]["params"], single_params):
        assert torch.equal(a, b)  # the ranks never diverge
        assert torch.equal(a, c)  # and do exactly what one process accumulating their gradients does
