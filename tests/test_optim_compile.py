"""OwLoreAdamW.step() under torch.compile: one compile for a whole run, the eager numbers.

The step's schedule (checks, state, step counts, refreshes, step sizes) runs eagerly in one
graph break; the updates are one graph whose per-step numbers are tensor inputs. So a run
that crosses subspace refreshes, changes the learning rate at every step and moves the
gradients to other blocks of the same shapes (what the sampler does) compiles once.

GaLore weights go through the same fused kernels with the same numbers as in eager mode, so
they and their state are bit-identical. Plain weights are updated by inductor's generated
code, which may round each elementwise operation differently (FMA contraction, operation
order); their gap to eager is bounded below by a forward error analysis.
"""
from __future__ import annotations

import copy
import math
import re
import subprocess
import sys

import pytest
import torch
import torch._dynamo.testing

from owlore_kernels import ops
from owlore_kernels.optim import OwLoreAdamW
from tiny_models import PlainLM

# numerics: `make test` reruns it on torch's generic CPU kernels, where inductor also generates
# code for another vector ISA, so the rounding bound below meets other operation orders
pytestmark = [pytest.mark.filterwarnings("ignore:rank="), pytest.mark.numerics]

U = 2.0**-24  # fp32 unit roundoff
G_MIN, G_MAX = 0.5, 1.5  # test gradients: |g| in [G_MIN, G_MAX] elementwise
BETAS = (0.9, 0.999)
LR, WD, STEPS, GAP = 1e-2, 0.1, 7, 3  # refreshes at updates 1, 4 and 7


def make_optimizer(model: PlainLM, variant: str, lr, backend=None) -> OwLoreAdamW:
    """Plain params, and the blocks' weights in GaLore groups covering every projection side."""
    weights = [b.fc1.weight for b in model.blocks] + [b.fc2.weight for b in model.blocks]
    galore = set(map(id, weights))
    plain = [p for p in model.parameters() if id(p) not in galore]
    n = len(model.blocks)
    return OwLoreAdamW(
        [{"params": plain},
         {"params": weights[:n], "rank": 3, "update_proj_gap": GAP},  # fc1 (24 x 16): right
         {"params": weights[n:], "rank": 3, "update_proj_gap": GAP, "proj_type": "left"}],
        lr=lr, betas=BETAS, weight_decay=WD, variant=variant, backend=backend)


def gradient(shape, gen, dtype):
    magnitude = G_MIN + (G_MAX - G_MIN) * torch.rand(shape, generator=gen)
    return (magnitude * torch.randn(shape, generator=gen).sign()).to(dtype)


def plain_weight_bound(steps: int, w_max: float, wd: float = WD) -> tuple[float, float, float]:
    """Bounds on |compiled - eager| for a plain fp32 param's m, v and W after ``steps`` updates.

    Every elementwise operation of the update may be rounded differently (at most u each; a
    fused multiply-add rounds once instead of twice). Per update t, with |g| in [G_MIN, G_MAX]:
      dm_t <= b1 dm_{t-1} + 3u G_MAX                          (m <- b1 m + (1-b1) g)
      dv_t <= b2 dv_{t-1} + 3u (1-b2^t) G_MAX^2               (v <- b2 v + (1-b2) g^2)
    sqrt(v_t) >= s_t = G_MIN sqrt(1-b2^t) and |m_t| <= M_t = G_MAX (1-b1^t), so
    N = m / (sqrt(v) + eps) moves by at most
      dN_t <= dm_t / s_t + M_t dv_t / (2 s_t^3) + 4u M_t / s_t
    and W by the step size |lr sqrt(1-b2^t) / (1-b1^t)| times that (both update rules: the
    torch rule's sqrt(v / bc2) moves the same factor), plus 5 roundings of |W|:
      dW_t <= (1 + lr wd) dW_{t-1} + 5u max|W| + lr sqrt(1-b2^t)/(1-b1^t) dN_t
    """
    b1, b2 = BETAS
    dm = dv = dw = 0.0
    for t in range(1, steps + 1):
        dm = b1 * dm + 3 * U * G_MAX
        dv = b2 * dv + 3 * U * (1 - b2**t) * G_MAX**2
        s, m_max = G_MIN * math.sqrt(1 - b2**t), G_MAX * (1 - b1**t)
        dn = dm / s + m_max * dv / (2 * s**3) + 4 * U * m_max / s
        dw = (1 + LR * wd) * dw + 5 * U * w_max + LR * math.sqrt(1 - b2**t) / (1 - b1**t) * dn
    return dm, dv, dw


def run(variant: str, dtype: torch.dtype, lr_kind: str, backend=None):
    """STEPS updates, eager and compiled, on copies of one model; returns both and the compile count."""
    torch.manual_seed(0)
    eager_model = PlainLM(n_blocks=4, d=16, hidden=24).to(dtype)
    compiled_model = copy.deepcopy(eager_model)
    lr = (lambda: torch.tensor(LR)) if lr_kind == "tensor" else (lambda: LR)
    eager_opt = make_optimizer(eager_model, variant, lr(), backend)
    compiled_opt = make_optimizer(compiled_model, variant, lr(), backend)
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")

    @torch.compile(backend=counter)
    def compiled_step():
        compiled_opt.step()

    gen = torch.Generator().manual_seed(1)
    w_max = 0.0
    for t in range(STEPS):
        active = 0 if t < 3 else 1  # blocks 0, 2 train first, then blocks 1, 3 (same shapes)
        grads = {name: gradient(p.shape, gen, dtype) for name, p in eager_model.named_parameters()
                 if not name.startswith("blocks.") or int(name.split(".")[1]) % 2 == active}
        for model, opt, step in ((eager_model, eager_opt, eager_opt.step),
                                 (compiled_model, compiled_opt, compiled_step)):
            for name, p in model.named_parameters():
                p.grad = grads[name].clone() if name in grads else None
            for group in opt.param_groups:  # a schedule: a new learning rate at every step
                if lr_kind == "tensor":
                    group["lr"].fill_(LR * 0.9**t)
                else:
                    group["lr"] = LR * 0.9**t
            with torch._dynamo.config.patch(error_on_recompile=t > 0):  # compiled at the first step only
                step()
        w_max = max([w_max] + [p.detach().abs().max().item() for p in eager_model.parameters()])
    return eager_model, eager_opt, compiled_model, compiled_opt, counter, w_max


@pytest.mark.parametrize("variant,dtype,lr_kind,backend", [
    ("galore", torch.float32, "float", None),
    ("galore", torch.float32, "tensor", None),
    ("torch", torch.float32, "float", None),
    ("galore", torch.bfloat16, "float", None),
    ("torch", torch.float16, "tensor", None),
    # forced to the backend the dispatcher runs anyway: still the graph's ops, no graph break
    ("galore", torch.float32, "float", "cpp"),
])
def test_compiled_step_compiles_once_and_matches_eager(variant, dtype, lr_kind, backend):
    if backend is not None and backend not in ops._REGISTRY["project_adam"]:
        pytest.skip(ops._UNAVAILABLE.get(backend, f"{backend} not registered"))
    eager_model, eager_opt, compiled_model, compiled_opt, counter, w_max = run(variant, dtype, lr_kind, backend)
    # the updates were compiled (at the first step; a later recompile would have raised, for a
    # new step count, learning rate, refreshed basis or set of params with gradients)
    code = counter.graphs[-1].code
    assert "owlore.project_adam_.tensor" in code and "owlore.back_project_update_.tensor" in code, code
    galore = {id(p) for g in eager_opt.param_groups if g["rank"] is not None for p in g["params"]}
    dm, dv, dw = plain_weight_bound(STEPS, w_max)
    checked = 0
    for (name, pe), pc in zip(eager_model.named_parameters(), compiled_model.parameters()):
        se, sc = eager_opt.state[pe], compiled_opt.state[pc]
        assert se.keys() == sc.keys(), name
        assert se["step"] == sc["step"], name
        if id(pe) in galore:  # the same kernels on the same numbers
            assert torch.equal(pe, pc), name
            for key in se:
                if key != "step":
                    assert torch.equal(se[key], sc[key]), (name, key)
        elif dtype == torch.float32:
            torch.testing.assert_close(sc["exp_avg"], se["exp_avg"], rtol=0, atol=dm, msg=name)
            torch.testing.assert_close(sc["exp_avg_sq"], se["exp_avg_sq"], rtol=0, atol=dv, msg=name)
            torch.testing.assert_close(pc, pe, rtol=0, atol=dw, msg=name)
        else:  # bf16/fp16: a rounding flip of the stored weight, at most one ulp of |W| per step
            ulp = torch.finfo(dtype).eps * 2.0 ** math.ceil(math.log2(w_max))
            torch.testing.assert_close(pc.float(), pe.float(), rtol=0, atol=STEPS * ulp, msg=name)
        checked += 1
    assert checked == len(list(eager_model.parameters()))


def test_plain_bound_is_tighter_than_a_one_percent_step_size_error():
    """What a wrong compiled plain update looks like, run for real: two eager fp32 runs whose step
    sizes differ by 1% (the same gradients) end further apart than 4x the bound that the compiled
    run is held to, and the plain weights move by more than 100x it."""
    finals, starts = [], None
    for lr_factor in (1.0, 1.01):
        torch.manual_seed(0)
        model = PlainLM(n_blocks=4, d=16, hidden=24)
        starts = {name: p.detach().clone() for name, p in model.named_parameters()}
        opt = make_optimizer(model, "galore", LR * lr_factor)
        gen = torch.Generator().manual_seed(1)
        for _ in range(STEPS):
            for p in model.parameters():
                p.grad = gradient(p.shape, gen, torch.float32)
            opt.step()
        galore = {id(p) for g in opt.param_groups if g["rank"] is not None for p in g["params"]}
        finals.append({name: p.detach().clone() for name, p in model.named_parameters() if id(p) not in galore})
    w_max = max(w.abs().max().item() for run in finals for w in run.values())
    _, _, dw = plain_weight_bound(STEPS, w_max)
    off = max((finals[0][name] - finals[1][name]).abs().max().item() for name in finals[0])
    moved = max((finals[0][name] - starts[name]).abs().max().item() for name in finals[0])
    assert off > 4 * dw, (off, dw)
    assert moved > 100 * dw, (moved, dw)


def test_full_projection_compiles_once_and_matches_eager():
    """proj_type="full" (two-sided): the same fused kernels, so bit-identical too."""
    torch.manual_seed(0)
    eager_w = torch.nn.Parameter(torch.randn(20, 12))
    compiled_w = torch.nn.Parameter(eager_w.detach().clone())
    opts = [OwLoreAdamW([{"params": [w], "rank": 3, "update_proj_gap": GAP, "proj_type": "full"}], lr=torch.tensor(LR),
                        weight_decay=WD) for w in (eager_w, compiled_w)]
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled_step = torch.compile(opts[1].step, backend=counter)
    gen = torch.Generator().manual_seed(2)
    for t in range(STEPS):
        g = gradient(eager_w.shape, gen, torch.float32)
        for w, opt, step in ((eager_w, opts[0], opts[0].step), (compiled_w, opts[1], compiled_step)):
            w.grad = g.clone()
            opt.param_groups[0]["lr"].fill_(LR * 0.9**t)
            with torch._dynamo.config.patch(error_on_recompile=t > 0):
                step()
        assert torch.equal(eager_w, compiled_w), t
    assert "owlore.project_adam_.tensor" in counter.graphs[-1].code
    for key in ("exp_avg", "exp_avg_sq", "proj_left", "proj_right"):
        assert torch.equal(opts[0].state[eager_w][key], opts[1].state[compiled_w][key]), key


def test_importing_the_package_loads_neither_dynamo_nor_dtensor():
    """step's graph break is made at its first call, and DTensor is looked up only where one
    may exist, so ``import owlore_kernels`` does not pay for torch._dynamo and
    torch.distributed.tensor (about a second together)."""
    code = ("import sys, owlore_kernels, owlore_kernels.optim, owlore_kernels.sampler, owlore_kernels.outliers, "
            "owlore_kernels.distributed; print(sorted(m for m in ('torch._dynamo', 'torch.distributed.tensor') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


@pytest.mark.parametrize("shape,dtype", [((3000, 500), torch.float32), ((1_500_000,), torch.bfloat16)])
def test_compiled_plain_update_makes_no_full_size_buffer(shape, dtype):
    """Eagerly a plain param is updated in ~1M-entry row chunks (two here); traced, chunks
    would be in-place updates of views of graph inputs, which functionalization turns into a
    rebuilt full-size tensor per chunk. The traced update runs on whole tensors instead:
    inductor's code allocates nothing of the param's size and copies nothing back."""
    from torch._inductor.utils import run_and_get_code

    p = torch.nn.Parameter(torch.randn(shape).to(dtype))
    p.grad = torch.randn(shape).to(dtype)
    opt = OwLoreAdamW([p], lr=1e-3, weight_decay=0.1)
    torch._dynamo.reset()
    _, codes = run_and_get_code(torch.compile(opt.step))
    code = "\n".join(codes)
    buffers = [math.prod(int(d) for d in dims.split(",") if d.strip())
               for dims in re.findall(r"empty_strided_cpu\(\(([\d, ]+)\)", code)]
    assert "cpp_fused" in code, code[-3000:]
    assert p.numel() not in buffers and "copy_(" not in code, (buffers, code[-3000:])


def test_compiled_run_resumes_from_a_mid_run_checkpoint_bit_exact(tmp_path):
    """Compiled steps, save (model and optimizer state_dicts) after 3 of them, load both into a
    fresh model and optimizer, compile their step and finish: identical to the run without the
    stop, params and every state tensor."""
    torch.manual_seed(0)
    model = PlainLM(n_blocks=4, d=16, hidden=24)
    init = copy.deepcopy(model.state_dict())
    gen = torch.Generator().manual_seed(1)
    grads = [{n: gradient(p.shape, gen, torch.float32) for n, p in model.named_parameters()} for _ in range(STEPS)]

    def steps(model, opt, todo):
        compiled = torch.compile(opt.step)
        for t in todo:
            for n, p in model.named_parameters():
                p.grad = grads[t][n].clone()
            compiled()

    torch._dynamo.reset()
    opt = make_optimizer(model, "galore", LR)
    steps(model, opt, range(STEPS))

    first = PlainLM(n_blocks=4, d=16, hidden=24)
    first.load_state_dict(init)
    first_opt = make_optimizer(first, "galore", LR)
    steps(first, first_opt, range(3))
    torch.save({"model": first.state_dict(), "opt": first_opt.state_dict()}, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed = PlainLM(n_blocks=4, d=16, hidden=24)
    resumed.load_state_dict(saved["model"])
    resumed_opt = make_optimizer(resumed, "galore", LR)
    resumed_opt.load_state_dict(saved["opt"])
    steps(resumed, resumed_opt, range(3, STEPS))

    for (name, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
        sa, sb = opt.state[a], resumed_opt.state[b]
        assert sa.keys() == sb.keys(), name
        for key in sa:
            assert (sa[key] == sb[key]) if key == "step" else torch.equal(sa[key], sb[key]), (name, key)
