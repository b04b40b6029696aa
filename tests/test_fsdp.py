"""FSDP2 (fully_shard, DTensor params): OwLoreAdamW + OwLoreSampler on 2 CPU processes (gloo) vs one process.

One spawn runs every multi-process scenario of tests/fsdp_workers.py (about 40 s on 2
shared cores); the checks below read its results. Tolerances: the sharded step computes
the same math as one process, but sums in another order -- FSDP2 averages per-rank
gradients (half-batches) where one process sums the whole batch, and the collectives
sum per-rank partial products. Each such sum differs by ~eps_fp32 * sqrt(terms) ~ 1e-7
relative. Adam's normalisation passes that through unchanged (N ~ m / sqrt(v)), and a
refresh turns it into a basis error of ~1e-7 / (relative gap of the singular values);
the tiny models' random gradients have gaps of ~0.05-0.3, so ~1e-6 per refresh, times
lr * scale = 1e-2 in W. Six updates with three refreshes stay below 1e-5 (measured
3e-6, on the weight with the smallest gap); the well-separated spectra of the layout
cases give ~1e-7.
"""
import os
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fsdp_workers as fw
import owlore_kernels
from owlore_kernels.distributed import owlore_shard_placement

WORLD = 2
ATOL = 1e-5  # see the module docstring
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is missing")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def spawn_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fsdp")


@pytest.fixture(scope="module")
def ranks(spawn_dir):
    """Every scenario's results, per rank, from one 2-process spawn."""
    out = spawn_dir
    names = list(fw.SCENARIOS)
    try:
        mp.spawn(fw.run, args=(WORLD, _free_port(), str(out), names), nprocs=WORLD, join=True)
    finally:
        results = [torch.load(out / f"rank{r}.pt", weights_only=False) if (out / f"rank{r}.pt").exists() else {}
                   for r in range(WORLD)]
        for r in results:
            assert "error" not in r, r.get("error")
    return results


def assert_ranks_agree_and_match(results, name, single_params, single_history=None):
    r0, r1 = results[0][name], results[1][name]
    if single_history is not None:
        assert r0["history"] == r1["history"] == single_history  # every rank drew the same blocks
    for a, b, c in zip(r0["params"], r1["params"], single_params):
        assert torch.equal(a, b)  # full_tensor() of the same shards: identical on every rank
        torch.testing.assert_close(a, c, atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def single():
    """The one-process reference runs (plain tensors, the same seeds and batches)."""
    return {
        "parity": fw.train(0, 1),
        "accumulate": fw.train(0, 1, micro_batches=2),
        "placement": fw.train(0, 1, h=40),
    }


def assert_layout_close(got, case):
    expected = fw.train_layout(case)
    # Same gradients on both sides: only the collectives' summation order differs, and the
    # spectra are well separated (gaps of 1/2), so a few eps_fp32 per update: 1e-6 in fp32.
    # A bf16 weight is rounded after each update, and a 1e-7 difference can move that rounding
    # by one bf16 ulp: at most 2^-7 relative (bf16 has 8 significant bits).
    bf16 = case[3] == "bfloat16"
    torch.testing.assert_close(got.float(), expected.float(), atol=1e-6, rtol=2**-7 if bf16 else 0,
                               msg=lambda m: f"{case}: {m}")


def test_each_side_and_placement_matches_one_process(ranks):
    """left/right/full on Shard(0) and Shard(1), uneven splits, three refreshes, fixed gradients."""
    for case in fw.LAYOUT_CASES:
        got0, got1 = ranks[0]["layouts"][case], ranks[1]["layouts"][case]
        assert torch.equal(got0, got1)
        assert_layout_close(got0, case)


def test_layouts_on_four_ranks_with_empty_shards(tmp_path):
    """4 ranks: 13 rows split 4/4/4/1 and 9 columns 3/3/3/0, so one rank holds an empty shard."""
    mp.spawn(fw.run, args=(4, _free_port(), str(tmp_path), ["layouts"]), nprocs=4, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(4)]
    for case in fw.LAYOUT_CASES:
        for r in results:
            assert torch.equal(r["layouts"][case], results[0]["layouts"][case])
        assert_layout_close(results[0]["layouts"][case], case)


def test_state_is_sharded_like_the_subspace(ranks):
    """Rank 0's local state: right-side moments m x r by rows, left-side r x n by columns."""
    default = ranks[0]["parity"]["state"]["blocks.2.fc1.weight"]  # 39 x 21, right, Shard(0): rows 20/19
    assert default["exp_avg"] == ("(Shard(dim=0),)", (20, 4)) and default["proj_right"] == ("(Replicate(),)", (4, 21))
    default = ranks[0]["parity"]["state"]["blocks.2.fc2.weight"]  # 21 x 39, left, Shard(0): rows 11/10
    assert default["exp_avg"] == ("(Shard(dim=1),)", (4, 20)) and default["proj_left"] == ("(Shard(dim=0),)", (11, 4))
    by_columns = ranks[0]["placement"]["state"]["blocks.2.fc2.weight"]  # 21 x 40, left, Shard(1)
    assert by_columns["exp_avg"] == ("(Shard(dim=1),)", (4, 20))
    assert by_columns["proj_left"] == ("(Replicate(),)", (21, 4))
    assert ranks[0]["parity"]["state"]["embed.weight"]["exp_avg"] == ("(Shard(dim=0),)", (17, 21))  # 33 rows


def test_state_bytes_counts_local_shards(ranks):
    model, opt, smp = fw.build(1)
    fw.train(0, 1, built=(model, opt, smp))
    # the shards add up to one process's state, plus the right-projected weights' Q (4 x 21 fp32),
    # which every rank holds whole: one per active block (gamma=2), on WORLD - 1 extra ranks
    replicated = 2 * 4 * 21 * 4 * (WORLD - 1)
    assert sum(r["parity"]["state_bytes"] for r in ranks) == opt.state_bytes() + replicated


def test_fsdp_with_sampler_matches_one_process(ranks, single):
    params, history = single["parity"]
    assert_ranks_agree_and_match(ranks, "parity", params, history)


def test_compiled_step_matches_one_process(ranks, single):
    """torch.compile(opt.step) on FSDP2 params, the sampler moving the gradients between blocks:
    compiled at the first step (a recompile would have raised in the worker), the same result."""
    params, history = single["parity"]
    assert_ranks_agree_and_match(ranks, "compiled", params, history)
    for r in ranks:
        frames = r["compiled"]["frames"]
        assert len(frames) == fw.STEPS and frames[0] >= 1 and len(set(frames)) == 1, frames


def test_in_backward_steps_match_one_process(ranks, single):
    params, history = single["parity"]  # in-backward changes when a param steps, not how
    assert_ranks_agree_and_match(ranks, "in_backward", params, history)


def test_in_backward_with_accumulation_matches_one_process(ranks, single):
    params, history = single["accumulate"]
    assert_ranks_agree_and_match(ranks, "accumulate", params, history)  # hooks.no_step()
    assert_ranks_agree_and_match(ranks, "accumulate_fsdp_no_sync", params, history)  # FSDP2's switch


def test_shard_placement_makes_steps_communication_free(ranks, single):
    params, history = single["placement"]
    assert_ranks_agree_and_match(ranks, "placement", params, history)
    placements = ranks[0]["placement"]["placements"]
    assert placements["blocks.0.fc2.weight"] == "(Shard(dim=1),)"  # 21 x 40: projected on the left
    assert placements["blocks.0.fc1.weight"] == "(Shard(dim=0),)"  # 40 x 21: on the right
    calls = ranks[0]["placement"]["collectives"]
    # update_proj_gap=2 and the sampler redraws every 2 steps: updates 1, 3, 5 refresh, 2, 4, 6 do not
    assert [bool(c) for c in calls] == [True, False] * 3, calls


def test_no_collective_carries_a_whole_weight(ranks):
    smallest_weight = min(39 * 21, 40 * 21)  # the GaLore weights of the two models
    for name in ("parity", "placement"):
        for step_calls in ranks[0][name]["collectives"]:
            for op, numel in step_calls:
                assert numel < smallest_weight, (name, op, numel)
    # Shard(0) default: the left-projected 21 x 39 weights exchange their r x n subspace every step
    steady = ranks[0]["parity"]["collectives"][1]
    assert steady and {op for op, _ in steady} == {"_reduce_scatter_base_.default", "_allgather_base_.default"}


def test_resume_from_distributed_checkpoint_is_bit_exact(ranks):
    resumed, straight = ranks[0]["resume"], ranks[0]["parity"]
    assert resumed["saved_keys"] == resumed["loaded_keys"]
    assert resumed["history"] == straight["history"][3:]
    for a, b in zip(resumed["params"], straight["params"]):
        assert torch.equal(a, b)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP loading in one process, as meant
def test_two_rank_checkpoint_resumes_in_one_process(ranks, spawn_dir):
    """The DCP checkpoint saved by 2 ranks after 3 updates, loaded into one process, which trains
    the 3 others: DCP reassembles each sharded state tensor from its DTensor offsets, so a wrong
    global layout (which a same-world-size round trip would not notice) breaks the match."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    model, opt, smp = fw.build(1, seed=1)
    state = {"model": get_model_state_dict(model), "sampler": smp.state_dict()}
    dcp.load(state, checkpoint_id=str(spawn_dir / "ckpt"))
    set_model_state_dict(model, state["model"])
    smp.load_state_dict(state["sampler"])
    osd = {"optim": get_optimizer_state_dict(model, opt)}
    dcp.load(osd, checkpoint_id=str(spawn_dir / "ckpt"))
    set_optimizer_state_dict(model, opt, osd["optim"])
    params, history = fw.train(0, 1, built=(model, opt, smp), batch_list=fw.batches()[3:])
    assert history == ranks[0]["parity"]["history"][3:]
    for a, b in zip(params, ranks[0]["parity"]["params"]):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_unsupported_layouts_raise_before_modifying(ranks):
    errors = ranks[0]["errors"]
    for key, placement in (("replicate", "Replicate()"), ("mesh2d", "2-D mesh")):
        message, untouched = errors[key]
        assert message.startswith("ValueError") and "param 0" in message and "(12, 10)" in message
        assert placement in message and untouched
    message, untouched = errors["svd"]
    assert "proj_method='svd'" in message and "'randomized'" in message and "480 bytes" in message and untouched
    assert "DistributedDataParallel" in errors["ddp_hooks"]
    assert "un-averaged" in errors["plain_hooks"] and "(6, 6)" in errors["plain_hooks"]
    message, untouched = errors["grad_placement"]  # after two steps that passed their checks
    assert message.startswith("ValueError") and "but its grad has (Replicate(),)" in message and untouched


# ------------------------------------------------------------ one process
def test_in_backward_is_bit_identical_to_step_in_one_process():
    for micro_batches in (1, 2):
        hooked = fw.train(0, 1, in_backward=True, micro_batches=micro_batches, steps=4)
        stepped = fw.train(0, 1, micro_batches=micro_batches, steps=4)
        assert hooked[1] == stepped[1]
        for a, b in zip(hooked[0], stepped[0]):
            assert torch.equal(a, b)


def test_in_backward_frees_gradients_and_step_is_a_no_op():
    model, opt, smp = fw.build(1)
    hooks = opt.register_step_hooks(model)
    smp.step()
    fw.loss_of(model, fw.batches()[0]).backward()
    assert all(p.grad is None for p in model.parameters())
    trained = {p for p in model.parameters() if p.requires_grad}
    assert set(opt.state) == trained  # each trainable param stepped once, frozen blocks not at all
    assert all(st["step"] == 1 for st in opt.state.values())
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()  # finds no gradient
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    with hooks.no_step():
        fw.loss_of(model, fw.batches()[1]).backward()
    assert all((p.grad is not None) == p.requires_grad for p in model.parameters())
    hooks.remove()
    opt.zero_grad()
    fw.loss_of(model, fw.batches()[1]).backward()
    assert all((p.grad is not None) == p.requires_grad for p in model.parameters())


def test_register_step_hooks_rejects_params_outside_the_optimizer():
    model = nn.Linear(4, 4)
    opt = owlore_kernels.OwLoreAdamW([model.weight])
    with pytest.raises(ValueError, match=r"1 param\(s\) \(shapes \[\(4,\)\]\) are not in the optimizer"):
        opt.register_step_hooks(model)


def test_deepspeed_flat_partitions_raise():
    weight = nn.Parameter(torch.randn(8, 6))
    opt = owlore_kernels.OwLoreAdamW([{"params": [weight], "rank": 2}])
    # what ZeRO-1/2 does after building the optimizer: swap in one flat fp32 partition per group
    flat = nn.Parameter(torch.randn(24))
    flat.grad = torch.randn(24)
    opt.param_groups[0]["params"] = [flat]
    with pytest.raises(ValueError, match=r"param 0 .*shape \(24,\).*DeepSpeed ZeRO.*FSDP2.*ZeRO stage 0"):
        opt.step()
    # ZeRO-3 also tags its params
    tagged = nn.Parameter(torch.randn(8, 6))
    tagged.ds_id = 3
    tagged.grad = torch.randn(8, 6)
    plain = owlore_kernels.OwLoreAdamW([tagged])
    with pytest.raises(ValueError, match="DeepSpeed's ds_\\* attributes"):
        plain.step()
    assert not plain.state


def test_shard_placement_picks_left_projected_weights():
    model = fw.TinyLM(h=40)
    groups = owlore_kernels.owlore_param_groups(model, **fw.GALORE)
    place = owlore_shard_placement(groups, world_size=2)
    from torch.distributed.tensor import Shard

    block = model.blocks[0]
    assert place(block.fc2.weight) == Shard(1)  # 21 x 40, left
    assert place(block.fc1.weight) is None  # 40 x 21, right: fully_shard's default Shard(0)
    assert place(model.head.weight) is None and place(block.fc2.bias) is None
    with pytest.warns(UserWarning, match=r"\(21, 40\).*world_size=3 does not divide"):
        place3 = owlore_shard_placement(groups, world_size=3)
    assert place3(block.fc2.weight) is None
    reverse = owlore_kernels.owlore_param_groups(model, **{**fw.GALORE, "proj_type": "reverse_std"})
    assert owlore_shard_placement(reverse, world_size=3)(block.fc1.weight) == Shard(1)  # 40 x 21, now left
    with pytest.raises(ValueError, match="world_size must be an int >= 1, got 0"):
        owlore_shard_placement(groups, world_size=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        owlore_shard_placement(groups, world_size=4)  # 40 % 4 == 0: no warning
