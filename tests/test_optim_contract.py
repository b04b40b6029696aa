"""OwLoreAdamW under torch.optim's contract (what torch's OptimizerInfo tests check for every
optimizer), declared once as inputs and run through generic tests: closure, deepcopy,
state_dict before the first step, add_param_group after steps, step and load_state_dict
hooks, LR schedulers; plus the input checks a user meets first."""
import copy
import math
import warnings
from dataclasses import dataclass, field

import pytest
import torch

from owlore_kernels import OwLoreAdamW


@dataclass
class OptimizerInput:
    """One way to build the optimizer: param groups from params, constructor kwargs, a name."""

    desc: str
    groups: callable
    kwargs: dict = field(default_factory=dict)


def _model():
    """Two 2-D weights (one GaLore, one plain) and a bias, on which every input is built."""
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(12, 20, generator=gen)),
            torch.nn.Parameter(torch.randn(20, 6, generator=gen)),
            torch.nn.Parameter(torch.randn(6, generator=gen))]


INPUTS = [
    OptimizerInput("plain", lambda p: p),
    OptimizerInput("galore-std", lambda p: [{"params": p[:2], "rank": 4, "update_proj_gap": 2}, {"params": p[2:]}],
                   dict(weight_decay=0.1)),
    OptimizerInput("galore-full-randomized",
                   lambda p: [{"params": p[:2], "rank": 3, "update_proj_gap": 2, "proj_type": "full"},
                              {"params": p[2:]}], dict(proj_method="randomized")),
    OptimizerInput("torch-variant-no-bias-correction",
                   lambda p: [{"params": p[:1], "rank": 4, "update_proj_gap": 3}, {"params": p[1:]}],
                   dict(variant="torch", correct_bias=False, lr=1e-2)),
]


def _build(inp):
    params = _model()
    return params, OwLoreAdamW(inp.groups(params), **inp.kwargs)


def _loss(params):
    x = torch.linspace(-1, 1, 12)
    return ((x @ params[0] @ params[1] + params[2]) ** 2).sum()


def _train(params, opt, steps):
    for _ in range(steps):
        opt.zero_grad()
        _loss(params).backward()
        opt.step()


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def _assert_continue_alike(run, other, steps=3):
    """Train two (params, optimizer) pairs on, side by side: their params stay bit-equal."""
    _train(*run, steps)
    _train(*other, steps)
    assert _same(run[0], other[0])


@pytest.mark.parametrize("inp", INPUTS, ids=lambda i: i.desc)
def test_step_with_closure_equals_step_without(inp):
    p1, o1 = _build(inp)
    p2, o2 = _build(inp)

    def closure():
        o1.zero_grad()
        loss = _loss(p1)
        loss.backward()
        return loss

    for _ in range(4):
        expected = _loss(p2).item()  # the closure's loss is computed before the update
        loss = o1.step(closure)
        assert loss.item() == expected
        _train(p2, o2, 1)
    assert _same(p1, p2)
    assert isinstance(loss, torch.Tensor)


@pytest.mark.parametrize("inp", INPUTS, ids=lambda i: i.desc)
def test_deepcopy_continues_identically(inp):
    params, opt = _build(inp)
    _train(params, opt, 3)
    params2, opt2 = copy.deepcopy((params, opt))  # one memo: opt2's groups and state key params2
    assert opt2.state[params2[0]]["step"] == 3
    _assert_continue_alike((params, opt), (params2, opt2))


@pytest.mark.parametrize("inp", INPUTS, ids=lambda i: i.desc)
def test_state_dict_before_first_step_round_trips(inp):
    params, opt = _build(inp)
    sd = opt.state_dict()
    assert sd["state"] == {}
    params2, opt2 = _build(inp)
    opt2.load_state_dict(sd)
    _assert_continue_alike((params, opt), (params2, opt2))


@pytest.mark.parametrize("inp", INPUTS, ids=lambda i: i.desc)
def test_save_and_load_mid_run_resume_bit_exact(inp):
    params, opt = _build(inp)
    _train(params, opt, 3)
    sd = copy.deepcopy(opt.state_dict())
    saved = [p.detach().clone() for p in params]
    _train(params, opt, 3)
    params2, opt2 = _build(inp)
    with torch.no_grad():
        for p, s in zip(params2, saved):
            p.copy_(s)
    opt2.load_state_dict(sd)
    _train(params2, opt2, 3)
    assert _same(params, params2)


def test_add_param_group_after_steps():
    params, opt = _build(INPUTS[1])
    _train(params, opt, 3)
    extra = torch.nn.Parameter(torch.randn(10, 8))
    opt.add_param_group({"params": [extra], "rank": 2, "update_proj_gap": 2})
    before = extra.detach().clone()
    extra.grad = torch.randn_like(extra)
    opt.step()
    assert opt.state[extra]["step"] == 1 and not torch.equal(extra.detach(), before)
    assert opt.state[extra]["exp_avg"].shape == (10, 2)  # std, m >= n: right side, m x r


def test_step_hooks_see_the_right_state():
    params, opt = _build(INPUTS[1])
    seen = []
    opt.register_step_pre_hook(lambda o, args, kwargs: seen.append(("pre", o.state[params[0]].get("step", 0))))
    opt.register_step_post_hook(lambda o, args, kwargs: seen.append(("post", o.state[params[0]]["step"])))
    _train(params, opt, 2)
    assert seen == [("pre", 0), ("post", 1), ("pre", 1), ("post", 2)]


def test_load_state_dict_hooks_see_fp32_state_of_bf16_params():
    """The post hook sees the loaded state as it will be used: fp32 moments of a bf16 param
    (torch.optim would cast them to bf16 before user hooks run)."""
    w = torch.nn.Parameter(torch.randn(12, 20).bfloat16())
    b = torch.nn.Parameter(torch.randn(20).bfloat16())
    opt = OwLoreAdamW([{"params": [w], "rank": 4}, {"params": [b]}])
    w.grad, b.grad = torch.randn_like(w), torch.randn_like(b)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    opt2 = OwLoreAdamW([{"params": [w], "rank": 4}, {"params": [b]}])
    seen = {}
    opt2.register_load_state_dict_pre_hook(lambda o, s: seen.update(pre=len(o.state)))
    opt2.register_load_state_dict_post_hook(
        lambda o: seen.setdefault("post", {k: v.dtype for st in o.state.values() for k, v in st.items()
                                           if isinstance(v, torch.Tensor)}))
    opt2.load_state_dict(sd)
    assert seen["pre"] == 0
    assert set(seen["post"].values()) == {torch.float32}
    for p in (w, b):
        for key, value in opt.state[p].items():
            other = opt2.state[p][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other


@pytest.mark.parametrize("scheduler", ["step", "lambda", "cosine"])
def test_lr_schedulers_drive_both_group_kinds(scheduler):
    params, opt = _build(INPUTS[1])
    make = {
        "step": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5),
        "lambda": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda t: 1.0 / (t + 1)),
        "cosine": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=4),
    }[scheduler]
    sched = make(opt)
    lrs = []
    for _ in range(3):
        _train(params, opt, 1)
        sched.step()
        lrs.append([g["lr"] for g in opt.param_groups])
    assert lrs[0][0] > lrs[-1][0] and all(a == b for a, b in lrs)  # every group follows
    # lr = 0 freezes both group kinds (weight decay included: it scales with lr)
    for g in opt.param_groups:
        g["lr"] = 0.0
    before = [p.detach().clone() for p in params]
    _train(params, opt, 2)
    assert _same(params, before)


def test_tensor_lr():
    p1, o1 = _build(INPUTS[1])
    p2 = _model()
    # float64: the tensor holds the double 1e-3 itself, so bit equality with lr=1e-3 is the contract
    # (an fp32 tensor holds 1.0000000475e-3, another learning rate)
    o2 = OwLoreAdamW(INPUTS[1].groups(p2), lr=torch.tensor(1e-3, dtype=torch.float64), weight_decay=0.1)
    _assert_continue_alike((p1, o1), (p2, o2))
    with pytest.raises(ValueError, match="lr"):
        OwLoreAdamW(_model(), lr=torch.tensor([1e-3, 1e-3]))


def test_galore_torch_constructor_arguments_accepted():
    """GaLoreAdamW(params, lr, betas, eps, weight_decay, correct_bias, no_deprecation_warning) works
    positionally and by keyword; no deprecation warning is issued."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        OwLoreAdamW(_model(), 1e-3, (0.9, 0.999), 1e-6, 0.0, True, True)
        opt = OwLoreAdamW(_model(), correct_bias=False, no_deprecation_warning=False)
    assert opt.defaults["correct_bias"] is False
    with pytest.raises(ValueError, match="correct_bias=1"):
        OwLoreAdamW(_model(), correct_bias=1)


def test_typo_in_group_key_raises_and_other_keys_pass():
    p = _model()
    with pytest.raises(ValueError, match="'rnak'.*did you mean 'rank'"):
        OwLoreAdamW([{"params": p[:2], "rnak": 4}])
    with pytest.raises(ValueError, match="'update_proj_gp'.*'update_proj_gap'"):
        OwLoreAdamW([{"params": p[:2], "rank": 4, "update_proj_gp": 4}])
    opt = OwLoreAdamW([{"params": p[:2], "rank": 4, "name": "attention"}])  # metadata keys are fine
    assert opt.param_groups[0]["name"] == "attention"


def test_fp64_plain_params_keep_full_precision():
    """fp64 params train in fp64 (moments too): a 1e-12 offset survives lr=0, and the update
    matches torch.optim.AdamW in fp64 (variant="torch") to fp64 rounding."""
    w = torch.nn.Parameter(torch.ones(4, 4, dtype=torch.float64) + 1e-12)
    opt = OwLoreAdamW([w], lr=0.0)
    w.grad = torch.randn_like(w)
    opt.step()
    assert torch.all(w == 1 + 1e-12) and opt.state[w]["exp_avg"].dtype == torch.float64
    a = torch.nn.Parameter(torch.randn(9, 7, dtype=torch.float64))
    b = torch.nn.Parameter(a.detach().clone())
    o1, o2 = OwLoreAdamW([a], lr=1e-2, weight_decay=0.1, variant="torch"), torch.optim.AdamW([b], lr=1e-2,
                                                                                           weight_decay=0.1, eps=1e-6)
    for _ in range(5):
        g = torch.randn_like(a)
        a.grad, b.grad = g.clone(), g.clone()
        o1.step()
        o2.step()
    # elementwise, a handful of fp64 operations per step in another order: ~10 u64 relative
    torch.testing.assert_close(a, b, atol=5 * 10 * 2.0**-53, rtol=5 * 10 * 2.0**-53)


def test_fp64_weight_in_rank_group_refused_at_construction():
    w = torch.nn.Parameter(torch.randn(12, 20, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"torch.float64 weight of shape \(12, 20\)"):
        OwLoreAdamW([{"params": [w], "rank": 4}])


def test_nan_gradient_at_refresh_names_the_param():
    params = _model()
    opt = OwLoreAdamW([{"params": params[:2], "rank": 4}, {"params": params[2:]}])
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.randn_like(p)
    params[1].grad[3, 2] = float("nan")
    with pytest.raises(RuntimeError, match=r"param 1 \(shape \(20, 6\)\) has NaN or inf"):
        opt.step()
    # raised before anything moved: no param, no state (params 0 and 2 are fine but wait)
    assert _same(params, before) and not opt.state


def test_no_deprecation_flag_must_be_bool():
    with pytest.raises(ValueError, match="no_deprecation_warning"):
        OwLoreAdamW(_model(), no_deprecation_warning="yes")


def test_traced_step_is_bit_identical_and_one_graph():
    """torch.compile(opt.step) with dynamo's eager backend (tracing only, no code generation): the
    traced update runs the eager ops with the per-step numbers as tensors, so the numbers are the
    eager step's bit for bit, and 6 steps across 3 refreshes make one graph. Inductor's code is
    tested in tests/test_optim_compile.py."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    inp = INPUTS[1]
    p1, o1 = _build(inp)
    p2, o2 = _build(inp)
    torch._dynamo.reset()
    counters.clear()
    compiled_step = torch.compile(o2.step, backend="eager")
    for _ in range(6):  # 3 refreshes at update_proj_gap=2
        _train(p1, o1, 1)
        o2.zero_grad()
        _loss(p2).backward()
        compiled_step()
    assert _same(p1, p2)
    assert counters["stats"]["unique_graphs"] <= 1, dict(counters["stats"])
    torch._dynamo.reset()


def test_a_param_that_cannot_be_updated_stops_the_step_before_any_update():
    """Every param is checked before the first one is updated: no half-applied step."""
    params = _model()
    opt = OwLoreAdamW([{"params": params[:2], "rank": 4}, {"params": params[2:]}])
    params[1].data = params[1].data.double()  # became fp64 after construction
    for p in params:
        p.grad = torch.randn_like(p)
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=r"torch.float64 weight of shape \(20, 6\)"):
        opt.step()
    assert _same(params, before) and not opt.state


@pytest.mark.parametrize("plain_first", [False, True])
def test_a_failing_refresh_leaves_every_state_as_it_was(monkeypatch, plain_first):
    """The schedule advances each param's state before the updates run; if a refresh fails
    midway (here the decomposition raises for the second GaLore weight), the params prepared
    before it get their state back: step counts, bases and moments as after the last step.
    ``plain_first``: the plain params come first, so their counts (no refresh) were advanced too."""
    import owlore_kernels.optim as optim

    params = _model()
    groups = [{"params": params[:2], "rank": 4, "update_proj_gap": 2}, {"params": params[2:]}]
    opt = OwLoreAdamW(groups[::-1] if plain_first else groups)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    before = [p.detach().clone() for p in params]
    real, calls = optim.compute_projection, []

    def fail_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise torch.linalg.LinAlgError("did not converge (test)")
        return real(*args, **kwargs)

    monkeypatch.setattr(optim, "compute_projection", fail_second)
    with pytest.raises(torch.linalg.LinAlgError, match="test"):
        opt.step()  # update 3 refreshes both GaLore weights
    assert _same(params, before)
    now = opt.state_dict()
    assert now["state"].keys() == saved["state"].keys()
    for key, state in saved["state"].items():
        assert now["state"][key].keys() == state.keys()
        for name, value in state.items():
            assert torch.equal(now["state"][key][name], value) if torch.is_tensor(value) else \
                now["state"][key][name] == value, (key, name)
