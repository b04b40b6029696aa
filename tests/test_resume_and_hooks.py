"""No half-done state: checked resumes (our checkpoints and galore-torch's), steps that fail before
anything moves, in-backward hooks on models with frozen params, and keys that look like options."""
import copy
import warnings

import pytest
import torch

from owlore_kernels import OwLoreAdamW, OwLoreSampler, owlore_param_groups


class TinyLM(torch.nn.Module):
    """Embedding, blocks of two linears, head: the shape of a decoder LM, small."""

    def __init__(self, vocab=50, d=16, hidden=24, n_blocks=4):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d)
        self.layers = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(d, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, d))
            for _ in range(n_blocks))
        self.head = torch.nn.Linear(d, vocab)

    def forward(self, ids):
        h = self.embed(ids)
        for layer in self.layers:
            h = h + layer(h)
        return self.head(h)


def _loss(model, seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.embed.num_embeddings, (2, 6), generator=gen)
    return torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.roll(-1, 1).flatten())


def _groups(model, rank=4, gap=2):
    return [{"params": [p for n, p in model.named_parameters() if n.startswith("layers") and p.dim() == 2],
             "rank": rank, "update_proj_gap": gap},
            {"params": [p for n, p in model.named_parameters() if not (n.startswith("layers") and p.dim() == 2)]}]


def _snapshot(model, opt):
    weights = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    return weights, state


def _assert_unchanged(model, opt, snapshot):
    weights, state = snapshot
    for p, w in zip(model.parameters(), weights):
        assert torch.equal(p, w)
    now = opt.state_dict()
    assert now["state"].keys() == state["state"].keys()
    for key, saved in state["state"].items():
        assert now["state"][key].keys() == saved.keys()
        for name, value in saved.items():
            same = torch.equal(now["state"][key][name], value) if torch.is_tensor(value) else \
                now["state"][key][name] == value
            assert same, (key, name)


def _train(model, opt, steps, seed=0):
    for t in range(steps):
        opt.zero_grad()
        _loss(model, seed + t).backward()
        opt.step()


# ------------------------------------------------------------------ checked resumes
def test_state_of_another_model_raises_before_anything_loads():
    """hidden 16 -> 32: the checkpoint's moments do not fit; the error names the param and both shapes."""
    torch.manual_seed(0)
    small, big = TinyLM(d=16), TinyLM(d=32)
    opt_small = OwLoreAdamW(_groups(small), lr=1e-2)
    _train(small, opt_small, 2)
    opt_big = OwLoreAdamW(_groups(big), lr=1e-2)
    _train(big, opt_big, 1)
    before = _snapshot(big, opt_big)
    with pytest.raises(ValueError, match=r"param 0 \(param group 0, shape \(24, 32\)\).*expected"):
        opt_big.load_state_dict(opt_small.state_dict())
    _assert_unchanged(big, opt_big, before)
    opt_big.step()  # still usable


def test_rank_mismatch_raises_naming_the_group():
    torch.manual_seed(0)
    model = TinyLM()
    opt16 = OwLoreAdamW(_groups(model, rank=16), lr=1e-2)
    _train(model, opt16, 1)
    opt8 = OwLoreAdamW(_groups(model, rank=8), lr=1e-2)
    with pytest.raises(ValueError, match=r"param group 0 has rank=16 in the checkpoint but rank=8 here"):
        opt8.load_state_dict(opt16.state_dict())
    assert not opt8.state and opt8.param_groups[0]["rank"] == 8


def test_own_checkpoint_round_trip_still_loads():
    torch.manual_seed(0)
    model = TinyLM()
    opt = OwLoreAdamW(_groups(model), lr=1e-2)
    _train(model, opt, 3)
    other = OwLoreAdamW(_groups(model), lr=1e-2)
    other.load_state_dict(opt.state_dict())
    for p in model.parameters():
        for name, value in opt.state[p].items():
            got = other.state[p][name]
            assert torch.equal(got, value) if torch.is_tensor(value) else got == value


def test_galore_torch_run_continues_with_owlore():
    """Train 3 steps with galore-torch, take its state over, then 3 more steps with each: the same
    weights up to rounding. Bound: both run the same fp32 math with the same basis (galore-torch's
    SVD at the refresh inside the 6 steps is the same torch.linalg.svd call on the same gradient);
    what differs is the order of fp32 operations, ~1e-7 relative per step on updates of lr = 1e-2,
    so 1e-5 absolute on weights of ~1 is far below the 1e-2-sized movement of 3 steps."""
    galore_torch = pytest.importorskip("galore_torch")
    torch.manual_seed(0)
    model = TinyLM()
    theirs = copy.deepcopy(model)

    def their_groups(m):
        groups = _groups(m, gap=4)
        groups[0].update(scale=0.25, proj_type="std")
        return groups

    ref = galore_torch.GaLoreAdamW(their_groups(theirs), lr=1e-2)
    _train(theirs, ref, 3)
    ours = copy.deepcopy(theirs)
    opt = OwLoreAdamW(their_groups(ours), lr=1e-2)
    # a copy, as from torch.load: load_state_dict (torch's too) keeps tensors that need no cast, so
    # without it both optimizers would step the same moment tensors
    opt.load_state_dict(copy.deepcopy(ref.state_dict()))
    start = [p.detach().clone() for p in ours.parameters()]
    _train(theirs, ref, 3, seed=3)
    _train(ours, opt, 3, seed=3)
    moved = max((p - s).abs().max().item() for p, s in zip(ours.parameters(), start))
    assert moved > 1e-3
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ atomic steps
def test_a_step_that_fails_a_check_changes_nothing():
    """The last GaLore weight was swapped for one of another shape after its state was made (state
    gone stale): the step raises naming it, and every param, moment, basis and count is as before."""
    torch.manual_seed(0)
    model = TinyLM()
    opt = OwLoreAdamW(_groups(model), lr=1e-2)
    _train(model, opt, 2)
    opt.zero_grad()
    weight = opt.param_groups[0]["params"][-1]
    weight.data = torch.randn(weight.shape[0], weight.shape[1] + 2)
    # the model no longer runs forward: gradients by hand
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    before = _snapshot(model, opt)
    with pytest.raises(ValueError, match=r"param 7 \(param group 0, shape \(16, 26\).*expected"):
        opt.step()
    _assert_unchanged(model, opt, before)


@pytest.mark.parametrize("change, message", [
    (lambda st: st.update(exp_avg=st["exp_avg"].double(), exp_avg_sq=st["exp_avg_sq"].double()),
     r"exp_avg is torch.float64 in the state, expected one of"),
    (lambda st: st.update(exp_avg_sq=st["exp_avg_sq"].bfloat16()), r"the two moments must share a dtype"),
    (lambda st: st.update(proj_left=st["proj_left"].half()), r"proj_left is torch.float16 in the state"),
    (lambda st: st.update(exp_avg=st["exp_avg"].to("meta")), r"exp_avg is on meta in the state but the param is on cpu"),
])
def test_state_of_a_dtype_or_device_the_ops_cannot_take_fails_before_anything_moves(change, message):
    """The fused ops are called without their Python argument checks (the step checks each param and
    its state once); a state tensor of another dtype or device raises there, with nothing updated."""
    torch.manual_seed(0)
    model = TinyLM()
    opt = OwLoreAdamW(_groups(model), lr=1e-2)
    _train(model, opt, 2)
    weight = opt.param_groups[0]["params"][-1]  # 16 x 24: projected from the left (std, wide)
    change(opt.state[weight])
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    before = [p.detach().clone() for p in model.parameters()]
    steps = [st["step"] for st in opt.state.values()]
    with pytest.raises(ValueError, match=r"param 7 \(param group 0, shape \(16, 24\).*" + message):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert [st["step"] for st in opt.state.values()] == steps


def _last_galore_weight(opt):
    return opt.param_groups[0]["params"][-1]  # 16 x 24: projected from the left (std, wide)


def _double_grad(opt):
    weight = _last_galore_weight(opt)
    weight.grad_dtype = None  # torch refuses a gradient of another dtype unless told
    weight.grad = weight.grad.double()


@pytest.mark.parametrize("change, message", [
    (_double_grad, r"param 7 \(param group 0, shape \(16, 24\).*has a gradient of shape \(16, 24\), torch.float64"),
    (lambda opt: setattr(_last_galore_weight(opt).grad, "data", torch.randn(16, 23)),
     r"param 7 \(param group 0, shape \(16, 24\).*has a gradient of shape \(16, 23\)"),
    (lambda opt: setattr(_last_galore_weight(opt), "data", _last_galore_weight(opt).data.double()),
     r"param 7 \(param group 0, shape \(16, 24\), torch.float64 on cpu\) has a gradient of .* torch.float32"),
    (lambda opt: opt.param_groups[0].update(proj_type="right"),
     r"param 1 \(param group 0, shape \(16, 24\).*exp_avg has shape \(4, 24\) in the state, expected \(16, 4\)"),
    (lambda opt: opt.param_groups[0].update(rank=3),
     r"param 0 \(param group 0, shape \(24, 16\).*exp_avg has shape \(24, 4\) in the state, expected \(24, 3\)"),
])
def test_checks_run_again_when_what_they_read_changes(change, message):
    """A param's checks pass once and are not run again while the param, its gradient, its state and
    its group's options stay as they were; a gradient or param of another dtype or shape, or a group
    option changed between steps, is checked again at the next step: it raises with nothing moved."""
    torch.manual_seed(0)
    model = TinyLM()
    opt = OwLoreAdamW(_groups(model, gap=10), lr=1e-2)
    _train(model, opt, 3)  # three steps whose checks passed
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    change(opt)
    before = _snapshot(model, opt)
    with pytest.raises(ValueError, match=message):
        opt.step()
    _assert_unchanged(model, opt, before)


# ------------------------------------------------------------------ in-backward hooks
def _with_hooks_and_sampler(use_hooks):
    torch.manual_seed(0)
    model = TinyLM(n_blocks=4)
    opt = OwLoreAdamW(owlore_param_groups(model, rank=4, update_proj_gap=3), lr=1e-2)
    sampler = OwLoreSampler(model, opt, gamma=2, interval=2, seed=0)
    hooks = opt.register_step_hooks(model) if use_hooks else None
    draws = []
    for t in range(7):
        draws.append(sampler.step())
        _loss(model, t).backward()
        opt.step()
        opt.zero_grad()
    return model, opt, draws, hooks


def test_hooks_with_a_sampler_match_step_after_backward():
    """Hooks registered once, after the sampler froze all but 2 blocks: blocks unfrozen later step
    in-backward, frozen ones stop; bit-identical to step() after backward, through 3 resamples."""
    ref_model, ref_opt, ref_draws, _ = _with_hooks_and_sampler(False)
    model, opt, draws, hooks = _with_hooks_and_sampler(True)
    assert draws == ref_draws and len({tuple(d) for d in draws if d}) > 1
    for a, b in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(a, b)
    hooks.remove()


def test_registration_is_all_or_nothing():
    torch.manual_seed(0)
    model = TinyLM()
    opt = OwLoreAdamW(_groups(model), lr=1e-2)
    stranger = torch.nn.Parameter(torch.randn(3, 3))
    with pytest.raises(ValueError, match="not in the optimizer"):
        opt.register_step_hooks(list(model.parameters()) + [stranger])
    before = _snapshot(model, opt)
    _loss(model, 0).backward()  # no hook may have survived: nothing steps inside backward
    _assert_unchanged(model, opt, before)


def test_frozen_params_keep_their_flag_and_remove_removes_everything():
    torch.manual_seed(0)
    model = TinyLM()
    opt = OwLoreAdamW(_groups(model), lr=1e-2)
    model.layers[0].requires_grad_(False)
    hooks = opt.register_step_hooks(model)
    assert not any(p.requires_grad for p in model.layers[0].parameters())
    hooks.remove()
    before = _snapshot(model, opt)
    _loss(model, 0).backward()
    _assert_unchanged(model, opt, before)


def test_hooks_on_a_peft_model():
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2)
    base = transformers.LlamaForCausalLM(config)
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    ref = copy.deepcopy(model)
    ids = torch.randint(0, 64, (2, 8))
    results = []
    for m, hooked in ((model, True), (ref, False)):
        opt = OwLoreAdamW(owlore_param_groups(m, rank=2), lr=1e-2)
        if hooked:
            opt.register_step_hooks(m)
        for _ in range(3):
            m(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        results.append(dict(m.named_parameters()))
    for name, p in results[0].items():
        assert torch.equal(p, results[1][name]), name


# ------------------------------------------------------------------ keys that look like options
@pytest.mark.parametrize("key,meant", [("proj_gap", "update_proj_gap"), ("galore_rank", "rank"), ("r", "rank")])
def test_keys_that_look_like_options_warn_at_the_callers_line(key, meant):
    w = torch.nn.Parameter(torch.randn(8, 6))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        OwLoreAdamW([{"params": [w], "rank": 2, key: 3}])
    mine = [c for c in caught if key in str(c.message)]
    assert len(mine) == 1 and f"did you mean the option {meant!r}" in str(mine[0].message)
    assert "param group 0" in str(mine[0].message)
    assert mine[0].filename == __file__
