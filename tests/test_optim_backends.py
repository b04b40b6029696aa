"""OwLoreAdamW with each fused backend against backend="torch" (the reference ops), over a
run long enough for refreshes and a checkpoint round trip.

Tolerances: one step differs between backends only by the ops' rounding (the per-op
bounds in test_op_*.py: ~(K+1) 2^-24 of sum |P||G| for R, carried through Adam at ~1.5x).
Twenty steps compound that: the moments carry earlier differences forward with weights
beta1 and beta2 (sum of weights <= 1), so per-step differences do not grow geometrically,
and W moves by lr * scale * N per step (2.5e-3 here), so 20 steps of N differences of
1e-5 move W by ~5e-7. fp32 states are compared at rtol 1e-4 / atol 1e-5, 10x the
single-step fp32 tolerance, for entries of R near 0 where N = m/(sqrt(v)+eps) magnifies
R's absolute error. A bf16 gradient makes Triton's dot round P to bf16 (2^-8 relative
per product): states of the bf16 param are compared at 2^-8 * 1.5 * 4 ~ 2.5e-2 relative
(the 4 for the sum over steps and entries near 0), weights at bf16's own ulp.

This compares backends with each other through the same optimizer, so a mistake in the rule
they share cannot show here: the rule itself is checked against an fp64 oracle in
test_optim.py. What a wrong backend looks like here: one that skips or mis-scales updates; the
fp32 weights move by more than 100x their tolerance (asserted), the bf16 weight (entries ~1,
moving ~1e-2) only by about its ulp, so for bf16 this test guards against gross errors only.
"""
from __future__ import annotations

import copy

import pytest
import torch

from owlore_kernels import OwLoreAdamW, ops

# rerun by `make test` on torch's generic CPU kernels (other summation orders)
pytestmark = pytest.mark.numerics

BACKENDS = [b for b in ("cpp", "triton") if b in ops._REGISTRY["project_adam"] and ops._runs_on(b, "cpu")]
WEIGHT_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=2**-7, atol=2**-7)}
STATE_TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=2.5e-2, atol=2.5e-2)}


@pytest.mark.parametrize("backend", BACKENDS)
def test_owlore_adamw_matches_torch_backend_over_20_steps(backend):
    """Weights and every state tensor over 20 steps with projection refreshes (gap 7), both
    sides, a bf16 weight, a plain-AdamW bias, a param whose grad is None, and a state_dict
    save and reload at step 10."""

    def make_params():
        g = torch.Generator().manual_seed(1)
        return [
            torch.randn(67, 131, generator=g).requires_grad_(),  # left (m < n)
            torch.randn(131, 67, generator=g).requires_grad_(),  # right (m >= n)
            torch.randn(40, 72, generator=g).to(torch.bfloat16).requires_grad_(),
            torch.randn(67, generator=g).requires_grad_(),  # plain AdamW
            torch.randn(16, 24, generator=g).requires_grad_(),  # grad stays None
        ]

    def make_opt(params, backend):
        galore, plain = params[:3] + params[4:], params[3:4]
        groups = [
            {"params": plain},
            {"params": galore, "rank": 5, "update_proj_gap": 7, "scale": 0.25, "proj_type": "std"},
        ]
        return OwLoreAdamW(groups, lr=1e-2, weight_decay=0.01, backend=backend)

    fast, slow = make_params(), make_params()
    opt_fast, opt_slow = make_opt(fast, backend), make_opt(slow, "torch")
    g = torch.Generator().manual_seed(2)
    for step in range(20):
        for pf, ps in zip(fast[:4], slow[:4]):
            grad = torch.randn(pf.shape, generator=g).to(pf.dtype)
            pf.grad, ps.grad = grad.clone(), grad.clone()
        opt_fast.step()
        opt_slow.step()
        if step == 9:  # save and reload mid-run: the fused path must resume from loaded state
            saved = copy.deepcopy(opt_fast.state_dict())
            opt_fast = make_opt(fast, backend)
            opt_fast.load_state_dict(saved)

    assert fast[4].grad is None and opt_fast.state[fast[4]] == {}
    for start, ps in zip(make_params(), slow):
        if ps.dtype == torch.float32 and ps.grad is not None:
            tol = WEIGHT_TOL[torch.float32]
            moved = (ps.detach() - start.detach()).abs()
            allowed = tol["atol"] + tol["rtol"] * start.detach().abs()
            assert (moved / allowed).max() > 100, (moved / allowed).max()
    for pf, ps in zip(fast, slow):
        torch.testing.assert_close(pf.detach(), ps.detach(), **WEIGHT_TOL[pf.dtype])
        state_f, state_s = opt_fast.state[pf], opt_slow.state[ps]
        assert state_f.keys() == state_s.keys()
        for key in state_s:
            if torch.is_tensor(state_s[key]):
                torch.testing.assert_close(state_f[key], state_s[key], **STATE_TOL[pf.dtype], msg=key)
            else:
                assert state_f[key] == state_s[key]
