"""OwLoreAdamW under torch.amp.GradScaler: unscaled inside the fused ops, overflowed steps skipped
without the optimizer reading the found-inf flag, step counts exact from the next step on."""
import copy

import pytest
import torch

from owlore_kernels import OwLoreAdamW

SCALE = 2.0**10  # GradScaler's scales are powers of two: scaling and unscaling are exact in fp32


def _weights(seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(12, 7), (5, 16), (9, 9), (13,), (3, 4)]  # tall, wide, square GaLore weights; plain ones
    return [torch.nn.Parameter(torch.randn(*s, generator=gen)) for s in shapes]


def _gradients(params, steps, overflow, seed=1, size=1.0):
    """Per step one gradient per param; at the steps in ``overflow`` one entry of the first is inf."""
    gen = torch.Generator().manual_seed(seed)
    grads = [[size * torch.randn(p.shape, generator=gen) for p in params] for _ in range(steps)]
    for k in overflow:
        grads[k][0].view(-1)[0] = float("inf")
    return grads


def _scaled_step(params, opt, scaler, grads):
    """A training step whose gradients are exactly ``grads`` times the scale: loss = sum <w, G>."""
    loss = sum((p * g).sum() for p, g in zip(params, grads))
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()


def _groups(params, proj_type, gap):
    return [{"params": params[:3], "rank": 3, "update_proj_gap": gap, "proj_type": proj_type},
            {"params": params[3:]}]


def _step_both(scaled, opt_scaled, scaler, plain, opt_plain, grads, skipped):
    """Step ``scaled`` through the scaler and ``plain`` on the unscaled gradients, leaving the steps in
    ``skipped`` out of the plain run; after each step the weights must be equal bit for bit (and a
    skipped step must leave the scaled weights as they were)."""
    for k, step_grads in enumerate(grads):
        before = [p.detach().clone() for p in scaled]
        _scaled_step(scaled, opt_scaled, scaler, step_grads)
        if k in skipped:
            assert all(torch.equal(p, b) for p, b in zip(scaled, before)), f"step {k} was skipped but moved weights"
            continue
        for p, g in zip(plain, step_grads):
            p.grad = g.clone()
        opt_plain.step()
        assert all(torch.equal(a, b) for a, b in zip(scaled, plain)), f"weights differ after step {k}"


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("proj_type", ["std", "full"])
def test_scaled_run_equals_the_unscaled_run_without_the_overflowed_steps(backend, proj_type):
    """With the GradScaler, the run is bit for bit the run that gets the unscaled gradients and skips the
    overflowed steps. Bitwise, because a power-of-two scale commutes with every fp32 rounding (no value
    here comes near overflow or the subnormals): P^T (s G) / s = P^T G exactly, and the refresh takes the
    singular vectors of s G, which are those of G (bit for bit here, or this test would fail). Overflows fall on a step that refreshes (update_proj_gap=3: updates 1, 4, 7 refresh;
    the flag is read at once) and on steps that do not (issued with the flag unread, settled at the next
    step); "full" weights read the flag at every step."""
    if backend == "cpp":
        pytest.importorskip("owlore_kernels._C")
    steps, overflow = 9, (2, 4, 5)  # call 5 is update 4 after the skips at calls 2 and 4: a refresh
    scaled, plain = _weights(), _weights()
    grads = _gradients(scaled, steps, overflow)
    opt_scaled = OwLoreAdamW(_groups(scaled, proj_type, 3), lr=1e-2, weight_decay=0.1, backend=backend)
    opt_plain = OwLoreAdamW(_groups(plain, proj_type, 3), lr=1e-2, weight_decay=0.1, backend=backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    _step_both(scaled, opt_scaled, scaler, plain, opt_plain, grads, overflow)
    saved_scaled, saved_plain = opt_scaled.state_dict()["state"], opt_plain.state_dict()["state"]
    assert saved_scaled.keys() == saved_plain.keys()
    for i in saved_plain:
        assert saved_scaled[i]["step"] == saved_plain[i]["step"] == steps - len(overflow)
        for name, value in saved_plain[i].items():
            if torch.is_tensor(value):
                assert torch.equal(saved_scaled[i][name], value), (i, name)
    assert scaler.get_scale() == SCALE / 2 ** len(overflow)  # the scaler saw every overflow


def test_plain_weights_match_torch_fused_adamw_under_the_same_scaler():
    """variant="torch" plain weights against torch.optim.AdamW(fused=True), both driven by one kind of
    GradScaler, with overflows. Gradients of ~3e-6 at eps=1e-6 make eps matter, so a step that forgot
    to unscale (sqrt(v) 1024x larger) or kept counting a skipped update (bias correction 1 - 0.9^t off
    by ~25% at t = 3) is far outside the tolerance. Tolerance: both compute the same ~10 fp32
    operations per element in other orders; the moments agree to a few fp32 ulps, and each stored
    weight to 1 ulp per step, so 8 steps stay within 8 * 2^-23 relative (plus 1e-7 absolute for
    weights near zero): about 1e-6 where the bugs above move weights by 1e-3."""
    steps, overflow = 8, (0, 3, 4)
    ours, theirs = _weights()[3:], _weights()[3:]
    grads = _gradients(ours, steps, overflow, size=3e-6)
    opt = OwLoreAdamW(ours, lr=1e-3, eps=1e-6, weight_decay=0.1, variant="torch")
    ref = torch.optim.AdamW(theirs, lr=1e-3, eps=1e-6, weight_decay=0.1, fused=True)
    scaler_ours = torch.amp.GradScaler("cpu", init_scale=SCALE)
    scaler_theirs = torch.amp.GradScaler("cpu", init_scale=SCALE)
    for k in range(steps):
        _scaled_step(ours, opt, scaler_ours, grads[k])
        _scaled_step(theirs, ref, scaler_theirs, grads[k])
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=8 * 2.0**-23, atol=1e-7)
    saved = opt.state_dict()["state"]
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert saved[i]["step"] == int(ref.state[b]["step"]) == steps - len(overflow)
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[a][name], ref.state[b][name], rtol=1e-5, atol=0)
    assert scaler_ours.get_scale() == scaler_theirs.get_scale()


class _TinyLM(torch.nn.Module):
    def __init__(self, vocab=40, d=16):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(d, 32), torch.nn.Tanh(), torch.nn.Linear(32, d))
        self.head = torch.nn.Linear(d, vocab)

    def forward(self, ids):
        h = self.embed(ids)
        return self.head(h + self.mlp(h))


def test_fp16_model_trains_and_an_overflow_changes_nothing():
    """A whole fp16 model (no fp32 master weights: the case GradScaler needs a fused optimizer for):
    training lowers the loss, and the step whose loss overflows leaves every weight and moment as it was
    (read back through state_dict, which settles the pending skip)."""
    torch.manual_seed(0)
    model = _TinyLM().half()
    linears = [p for n, p in model.named_parameters() if n.startswith("mlp") and p.dim() == 2]
    rest = [p for n, p in model.named_parameters() if not (n.startswith("mlp") and p.dim() == 2)]
    opt = OwLoreAdamW([{"params": linears, "rank": 4, "update_proj_gap": 4}, {"params": rest}], lr=3e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    ids = torch.randint(0, 40, (4, 12), generator=torch.Generator().manual_seed(0))

    def loss_fn():
        logits = model(ids[:, :-1]).float()
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())

    first = loss_fn().item()
    for k in range(12):
        loss = loss_fn() * (float("inf") if k == 6 else 1.0)
        if k == 6:
            weights = [p.detach().clone() for p in model.parameters()]
            state = copy.deepcopy(opt.state_dict())
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        if k == 6:
            assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
            now = opt.state_dict()["state"]
            for i, saved in state["state"].items():
                assert now[i]["step"] == saved["step"]
                assert all(torch.equal(now[i][n], v) for n, v in saved.items() if torch.is_tensor(v))
    assert loss_fn().item() < first - 0.1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_bad_scaler_tensors_raise_before_anything_changes():
    params = _weights()
    opt = OwLoreAdamW(_groups(params, "std", 2), lr=1e-2)
    for p, g in zip(params, _gradients(params, 1, ())[0]):
        p.grad = g
    opt.step()
    before = [p.detach().clone() for p in params]
    state = copy.deepcopy(opt.state_dict())
    cases = [("found_inf", torch.zeros(2), r"found_inf must be a floating tensor with exactly one element, got shape "
                                           r"\(2,\) of torch.float32"),
             ("grad_scale", torch.ones(1, dtype=torch.int32), r"grad_scale must be a floating tensor .* torch.int32"),
             ("found_inf", torch.zeros(1, device="meta"), r"found_inf is on meta; expected cpu")]
    for name, value, message in cases:
        setattr(opt, name, value)
        with pytest.raises(ValueError, match=message):
            opt.step()
        delattr(opt, name)
        assert all(torch.equal(p, b) for p, b in zip(params, before))
        assert opt.state_dict()["state"][0]["step"] == state["state"][0]["step"] == 1


def test_a_unit_scaler_skips_nan_steps_of_an_fp32_run_and_changes_nothing_else():
    """The README's recipe for skipping steps with NaN/inf gradients without dynamic loss scaling: a
    GradScaler that starts at 1 and never grows. A NaN (not only inf) skips the step, and every other
    step equals the unguarded run's bit for bit (the scale is 1, then 1/2 after the backoff: powers of
    two, unscaled exactly inside the ops)."""
    steps = 7
    guarded, plain = _weights(), _weights()
    grads = _gradients(guarded, steps, overflow=())
    grads[3][1].view(-1)[2] = float("nan")
    opt_guarded = OwLoreAdamW(_groups(guarded, "std", 2), lr=1e-2)
    opt_plain = OwLoreAdamW(_groups(plain, "std", 2), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=2**31 - 1)
    _step_both(guarded, opt_guarded, scaler, plain, opt_plain, grads, skipped=(3,))
    assert scaler.get_scale() == 0.5
    assert all(torch.isfinite(p).all() for p in guarded)


def test_scaler_step_with_in_backward_hooks_raises_and_works_once_they_are_removed():
    """In-backward hooks step inside backward, on gradients the scaler has not unscaled or checked, so a
    scaler step with hooks registered raises instead of passing for a normal step."""
    params = _weights()
    opt = OwLoreAdamW(_groups(params, "std", 2), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    hooks = opt.register_step_hooks(params)
    grads = _gradients(params, 2, overflow=())
    with pytest.raises(RuntimeError, match=r"GradScaler step with in-backward step hooks"):
        _scaled_step(params, opt, scaler, grads[0])
    hooks.remove()
    opt.zero_grad()
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    _scaled_step(params, opt, scaler, grads[1])


def test_scaler_step_without_any_gradient_does_nothing():
    """Every param frozen (a sampler between draws, say): the scaler finds no gradient and hands over
    found_inf=0, a plain int; the step does nothing, as torch's fused AdamW does."""
    params = _weights()
    opt = OwLoreAdamW(_groups(params, "std", 2), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    before = [p.detach().clone() for p in params]
    loss = torch.zeros((), requires_grad=True)
    scaler.scale(loss).backward()
    scaler.step(opt)  # (scaler.update() would then raise: torch's scaler wants an inf check recorded)
    assert all(torch.equal(p, b) for p, b in zip(params, before)) and not opt.state


# ------------------------------------------------------------------ CUDA (run by benchmarks/gpu_run.sh)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
def test_cuda_scaled_run_equals_the_unscaled_run_without_the_overflowed_steps():
    """The first test on the GPU's kernels (Triton): the same bit-for-bit equality."""
    steps, overflow = 9, (2, 4, 5)
    scaled = [torch.nn.Parameter(p.detach().cuda()) for p in _weights()]
    plain = [torch.nn.Parameter(p.detach().cuda()) for p in _weights()]
    grads = [[g.cuda() for g in step] for step in _gradients(scaled, steps, overflow)]
    opt_scaled = OwLoreAdamW(_groups(scaled, "std", 3), lr=1e-2, weight_decay=0.1)
    opt_plain = OwLoreAdamW(_groups(plain, "std", 3), lr=1e-2, weight_decay=0.1)
    scaler = torch.amp.GradScaler("cuda", init_scale=SCALE)
    _step_both(scaled, opt_scaled, scaler, plain, opt_plain, grads, overflow)
    saved_scaled, saved_plain = opt_scaled.state_dict()["state"], opt_plain.state_dict()["state"]
    for i in saved_plain:
        assert saved_scaled[i]["step"] == saved_plain[i]["step"] == steps - len(overflow)


@cuda
def test_cuda_step_between_refreshes_does_not_wait_for_the_device():
    """A GradScaler step with no refresh due returns while the GPU is still busy with work queued before
    it (``torch.cuda._sleep``), so it did not read found_inf on the host; it waits at most for the flag
    of the step before, which the test lets finish first. An overflow among those steps is still
    skipped and taken off the counts."""
    params = [torch.nn.Parameter(p.detach().cuda()) for p in _weights()]
    grads = [[g.cuda() for g in step] for step in _gradients(params, 5, overflow=(3,))]
    opt = OwLoreAdamW(_groups(params, "std", 10**6), lr=1e-2)  # one refresh: the first step
    scaler = torch.amp.GradScaler("cuda", init_scale=SCALE)
    _scaled_step(params, opt, scaler, grads[0])
    for k in range(1, 5):
        loss = sum((p * g).sum() for p, g in zip(params, grads[k]))
        scaler.scale(loss).backward()
        torch.cuda.synchronize()  # the previous step's flag is ready: what the next step may wait for
        before = [p.detach().clone() for p in params]
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time queued ahead of the step
        done = torch.cuda.Event()
        done.record()
        scaler.step(opt)
        assert not done.query(), f"step {k} waited for the device"
        scaler.update()
        opt.zero_grad()
        if k == 3:
            torch.cuda.synchronize()
            assert all(torch.equal(p, b) for p, b in zip(params, before)), "the overflowed step moved weights"
    assert all(st["step"] == 4 for st in opt.state_dict()["state"].values())
