"""OwLoreSampler: block discovery, param groups, probabilities, the sampling law, freezing,
optimizer state, resume exactness, PEFT models and bad inputs. Tiny random-init models built offline."""
import io
import itertools
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from owlore_kernels import OwLoreAdamW, OwLoreSampler, find_decoder_blocks, owlore_param_groups
from tiny_models import Block, PlainLM, tiny_gpt2, tiny_llama

transformers = pytest.importorskip("transformers")


# ----------------------------------------------------------------- models
# architecture -> (builder, expected block path, modules expected among the default always_train)
def _arch_table():
    t = transformers
    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                  max_position_embeddings=64)
    table = {
        "llama": (lambda: tiny_llama(3, tie=True), "model.layers", {"model.embed_tokens", "model.norm"}),
        "gpt2": (lambda: tiny_gpt2(3), "transformer.h", {"transformer.wte", "transformer.wpe", "transformer.ln_f"}),
    }
    optional = {
        "mistral": ("MistralConfig", "MistralForCausalLM", dict(intermediate_size=64, num_key_value_heads=2),
                    "model.layers", {"model.embed_tokens", "model.norm"}),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(intermediate_size=64, num_key_value_heads=2),
                  "model.layers", {"model.embed_tokens", "model.norm"}),
        "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(intermediate_size=64, num_key_value_heads=2, head_dim=8),
                  "model.layers", {"model.embed_tokens", "model.norm"}),
        "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(intermediate_size=64),
                     "gpt_neox.layers", {"gpt_neox.embed_in", "gpt_neox.final_layer_norm"}),
        "opt": ("OPTConfig", "OPTForCausalLM", dict(ffn_dim=64, word_embed_proj_dim=32),
                "model.decoder.layers", {"model.decoder.embed_tokens", "model.decoder.final_layer_norm"}),
        "phi": ("PhiConfig", "PhiForCausalLM", dict(intermediate_size=64),
                "model.layers", {"model.embed_tokens", "model.final_layernorm"}),
    }
    for arch, (cfg_name, cls_name, extra, path, always) in optional.items():
        if hasattr(t, cfg_name) and hasattr(t, cls_name):
            table[arch] = (
                lambda c=cfg_name, k=cls_name, e=extra: getattr(t, k)(getattr(t, c)(**common, **e)), path, always
            )
    return table


ARCHS = _arch_table()


def _flags(model):
    return {n: p.requires_grad for n, p in model.named_parameters()}


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# -------------------------------------------------------------- discovery
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_discovery_across_architectures(arch):
    build, path, always = ARCHS[arch]
    model = build()
    found, blocks = find_decoder_blocks(model)
    assert found == path
    assert len(blocks) == 3
    assert model.get_submodule(path) is blocks
    sampler = OwLoreSampler(model, None, gamma=1, interval=1, prob_mode="uniform")
    assert always <= set(sampler.always_train), sampler.always_train
    names = {id(m): n for n, m in model.named_modules()}
    assert names[id(model.get_output_embeddings())] in sampler.always_train  # the LM head
    # every always-trainable name is outside the blocks
    assert not any(name.startswith(path + ".") for name in sampler.always_train)


def test_discovery_plain_model_override_and_error():
    model = PlainLM(n_blocks=5)
    path, blocks = find_decoder_blocks(model)
    assert path == "blocks" and blocks is model.blocks

    class TwoLists(nn.Module):
        def __init__(self):
            super().__init__()
            self.small = nn.ModuleList(nn.Linear(2, 2) for _ in range(3))
            self.big = nn.ModuleList(Block(8) for _ in range(2))

    two = TwoLists()
    assert find_decoder_blocks(two)[1] is two.big  # the list with the most parameters
    assert find_decoder_blocks(two, layers_attr="small")[1] is two.small
    sampler = OwLoreSampler(two, None, gamma=2, interval=1, prob_mode="uniform", layers_attr="small")
    assert sampler.num_blocks == 3 and sampler.layers_attr == "small"

    llama = tiny_llama(2, tie=True)
    assert find_decoder_blocks(llama, layers_attr="model.layers")[1] is llama.model.layers
    with pytest.raises(ValueError, match="layers_attr='model.nope'"):
        find_decoder_blocks(llama, layers_attr="model.nope")
    with pytest.raises(ValueError, match="nn.ModuleList"):
        find_decoder_blocks(llama, layers_attr="model.norm")

    no_blocks = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"could not find the decoder blocks of Sequential.*layers_attr="):
        find_decoder_blocks(no_blocks)


# ----------------------------------------------------------- param groups
def test_param_groups_llama_cover_every_param_once():
    model = tiny_llama(3, tie=True)
    groups = owlore_param_groups(model, rank=4, update_proj_gap=7, scale=0.5, proj_type="std", proj_method="svd")
    galore, plain = groups
    assert (galore["rank"], galore["update_proj_gap"], galore["scale"], galore["proj_type"]) == (4, 7, 0.5, "std")
    assert galore["proj_method"] == "svd" and "rank" not in plain
    expected = {id(m.weight) for b in model.model.layers for m in b.modules() if isinstance(m, nn.Linear)}
    assert {id(p) for p in galore["params"]} == expected and len(expected) == 3 * 7
    every = galore["params"] + plain["params"]
    assert len({id(p) for p in every}) == len(every)  # each once
    assert {id(p) for p in every} == {id(p) for p in model.parameters()}
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied: one param, in plain once
    assert sum(p is model.lm_head.weight for p in plain["params"]) == 1

    qv = owlore_param_groups(model, rank=4, target_modules=["q_proj", "v_proj"])
    assert len(qv[0]["params"]) == 3 * 2
    assert len(qv[0]["params"]) + len(qv[1]["params"]) == len(list(model.parameters()))
    glob = owlore_param_groups(model, rank=4, target_modules=["*.mlp.*"])
    assert len(glob[0]["params"]) == 3 * 3
    with pytest.raises(ValueError, match="target_modules.*'nonexistent'"):
        owlore_param_groups(model, rank=4, target_modules=["q_proj", "nonexistent"])
    assert len(owlore_param_groups(model, rank=None)) == 1


def test_param_groups_gpt2_conv1d_is_2d_linear():
    model = tiny_gpt2(2)
    galore, plain = owlore_param_groups(model, rank=4)
    # c_attn, attn.c_proj, c_fc, mlp.c_proj per block: transformers' Conv1D, handled as 2-D
    assert len(galore["params"]) == 2 * 4 and all(p.dim() == 2 for p in galore["params"])
    conv1d = [m.weight for m in model.transformer.h.modules() if type(m).__name__ == "Conv1D"]
    assert {id(p) for p in galore["params"]} == {id(w) for w in conv1d}
    opt = OwLoreAdamW([galore, plain], lr=1e-3)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


# ----------------------------------------------------------- probabilities
def test_probability_modes():
    model = PlainLM(n_blocks=4)
    scores = [1.0, 3.0, 0.0, 4.0]

    def probs(mode):
        # scores only where the mode uses them: the other modes refuse them
        kw = dict(scores=scores) if mode in ("owl", "owl_reverse") else {}
        return OwLoreSampler(model, None, gamma=1, interval=1, prob_mode=mode, **kw).probabilities

    np.testing.assert_allclose(probs("owl"), [1 / 8, 3 / 8, 0, 4 / 8])
    np.testing.assert_allclose(probs("uniform"), [0.25] * 4)
    rev = np.array([3, 1, 4, 0]) / 8  # max(p) - p with p = scores / 8, renormalized
    np.testing.assert_allclose(probs("owl_reverse"), rev)
    np.testing.assert_allclose(probs("increase"), np.array([1, 2, 3, 4]) / 10)
    np.testing.assert_allclose(probs("decrease"), np.array([4, 3, 2, 1]) / 10)
    np.testing.assert_allclose(probs([2, 2, 0, 4]), [0.25, 0.25, 0, 0.5])
    for mode in ("owl", "uniform", "owl_reverse", "increase", "decrease"):
        p = probs(mode)
        assert isinstance(p, np.ndarray) and p.ndim == 1 and not np.isnan(p).any()
        assert math.isclose(p.sum(), 1.0, rel_tol=0, abs_tol=1e-12)
    # all equal -> owl_reverse is uniform
    flat = OwLoreSampler(model, None, gamma=1, interval=1, prob_mode="owl_reverse", scores=[2.0] * 4)
    np.testing.assert_allclose(flat.probabilities, [0.25] * 4)


def test_all_zero_scores_fall_back_to_uniform_with_warning():
    model = PlainLM(n_blocks=4)
    with pytest.warns(UserWarning, match="uniform"):
        s = OwLoreSampler(model, None, gamma=2, interval=1, prob_mode="owl", scores=[0, 0, 0, 0])
    np.testing.assert_allclose(s.probabilities, [0.25] * 4)
    # Gaussian random init has no entry beyond 13 * mean|w| = 10.4 sigma: computed scores are zero
    with pytest.warns(UserWarning, match="uniform"):
        s = OwLoreSampler(tiny_llama(3, tie=True), None, gamma=1, interval=1, prob_mode="owl", threshold=13)
    np.testing.assert_allclose(s.probabilities, [1 / 3] * 3)
    # with a low threshold the weight-only scores are non-zero and used
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = OwLoreSampler(tiny_llama(3, tie=True), None, gamma=1, interval=1, prob_mode="owl", threshold=2.0)
    assert (s.scores > 0).all() and math.isclose(s.probabilities.sum(), 1.0)


def test_scores_from_text_file(tmp_path):
    path = tmp_path / "scores.txt"
    path.write_text("# block outlier ratios\n0.1\n0.3\n\n0.2\n0.4\n")
    s = OwLoreSampler(PlainLM(n_blocks=4), None, gamma=2, interval=1, prob_mode="owl", scores=str(path))
    np.testing.assert_allclose(s.probabilities, [0.1, 0.3, 0.2, 0.4])
    path.write_text("0.1\nabc\n")
    with pytest.raises(ValueError, match="line 2: 'abc'"):
        OwLoreSampler(PlainLM(n_blocks=4), None, gamma=2, interval=1, scores=path)


# --------------------------------------------------------- the sampling law
def _set_law(p, gamma):
    """P(the drawn set is S) for every gamma-subset S under weighted sampling without replacement:
    successive draws, each proportional to p over the blocks not drawn yet, summed over the orders."""
    law = {}
    for order in itertools.permutations(range(len(p)), gamma):
        prob, left = 1.0, 1.0
        for i in order:
            prob *= p[i] / left
            left -= p[i]
        subset = tuple(sorted(order))
        law[subset] = law.get(subset, 0.0) + prob
    return law


def _chi2_survival(x, dof):
    """P(chi^2_dof > x) for an even dof: exp(-x/2) sum_{j < dof/2} (x/2)^j / j! (no scipy needed)."""
    assert dof % 2 == 0
    return math.exp(-x / 2) * sum((x / 2) ** j / math.factorial(j) for j in range(dof // 2))


def test_drawn_sets_follow_weighted_sampling_without_replacement():
    """The sets drawn, against the law computed here by enumeration (not the sampler's own numpy
    call): Pearson's chi-square over all 35 sets of 3 of 7 blocks, 10,000 draws (expected counts
    >= 10, so the chi-square approximation holds). The test rejects at P(chi^2_34 > X) < 1e-6:
    a correct sampler fails it for one seed in a million. What a wrong law looks like: drawing
    with replacement and retrying repeated sets (P(S) proportional to the product of p_i) gives
    an expected statistic of 34 + 525, six times the rejection threshold (88); uniform sets,
    ~39,000."""
    scores = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 14.0]
    gamma, draws = 3, 10_000
    sampler = OwLoreSampler(PlainLM(n_blocks=7, d=2), None, gamma=gamma, interval=1, prob_mode="owl", seed=11,
                            scores=scores)
    p = np.asarray(scores) / sum(scores)
    np.testing.assert_allclose(sampler.probabilities, p, rtol=1e-15)
    law = _set_law(p, gamma)
    assert len(law) == math.comb(7, 3) and math.isclose(sum(law.values()), 1.0)
    counts = dict.fromkeys(law, 0)
    for _ in range(draws):
        sampler.step()
        counts[tuple(sampler.active_layers)] += 1
    expected = np.array([draws * law[s] for s in law])
    observed = np.array([counts[s] for s in law])
    assert expected.min() >= 10
    statistic = float(((observed - expected) ** 2 / expected).sum())
    dof = len(law) - 1
    assert _chi2_survival(statistic, dof) > 1e-6, statistic
    # the test's power against the product law (see the docstring)
    product = np.array([math.prod(p[list(s)]) for s in law])
    product /= product.sum()
    shift = draws * float(((product - expected / draws) ** 2 / (expected / draws)).sum())
    assert _chi2_survival(dof + shift, dof) < 1e-6 / 1e3, shift


def test_step_resamples_every_interval_first_call_included():
    sampler = OwLoreSampler(PlainLM(n_blocks=6), None, gamma=2, interval=3, prob_mode="uniform", seed=0)
    assert sampler.active_layers == []
    resampled = [sampler.step() is not None for _ in range(9)]
    assert resampled == [True, False, False] * 3
    assert sampler.num_steps == 9


# ------------------------------------------------------- freezing, training
def _train_step(model, opt, sampler, batch):
    sampler.step()
    out = model(input_ids=batch, labels=batch)
    out.loss.backward()
    opt.step()
    opt.zero_grad()


def test_frozen_blocks_bit_identical_active_blocks_change():
    model = tiny_llama(4, tie=True)
    opt = OwLoreAdamW(owlore_param_groups(model, rank=4, update_proj_gap=2), lr=1e-2)
    sampler = OwLoreSampler(model, opt, gamma=2, interval=3, prob_mode="owl", scores=[1, 2, 3, 4], seed=5)
    batch = torch.randint(0, 64, (2, 8))
    for _ in range(3):
        _train_step(model, opt, sampler, batch)
    before = _snapshot(model)
    sampler.step()  # resample (call 3)
    active = sampler.active_layers
    for i, block in enumerate(model.model.layers):
        for p in block.parameters():
            assert p.requires_grad == (i in active)
            assert p.grad is None
    out = model(input_ids=batch, labels=batch)
    out.loss.backward()
    opt.step()
    opt.zero_grad()
    for name, p in model.named_parameters():
        if name.startswith("model.layers."):
            block = int(name.split(".")[2])
            if block in active:
                assert not torch.equal(p, before[name]), name
            else:
                assert torch.equal(p, before[name]), name
    assert not torch.equal(model.model.embed_tokens.weight, before["model.embed_tokens.weight"])
    assert not torch.equal(model.model.norm.weight, before["model.norm.weight"])


def test_every_block_once_sampled_really_changes():
    # the optimizer sees every block from the start (LMFlow#726): blocks first
    # sampled late still train
    model = tiny_llama(4, tie=True)
    opt = OwLoreAdamW(owlore_param_groups(model, rank=4, update_proj_gap=2), lr=1e-2)
    sampler = OwLoreSampler(model, opt, gamma=1, interval=1, prob_mode="uniform", seed=1)
    batch = torch.randint(0, 64, (2, 8))
    changed = set()
    for _ in range(40):
        sampler.step()
        (active,) = sampler.active_layers
        before = [p.detach().clone() for p in model.model.layers[active].parameters()]
        others = [p.detach().clone() for i, b in enumerate(model.model.layers) if i != active for p in b.parameters()]
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
        after = list(model.model.layers[active].parameters())
        assert all(not torch.equal(a, b) for a, b in zip(after, before))
        assert all(torch.equal(a, b) for a, b in zip(
            [p for i, b in enumerate(model.model.layers) if i != active for p in b.parameters()], others))
        changed.add(active)
        if len(changed) == 4:
            break
    assert changed == {0, 1, 2, 3}


def test_a_block_drawn_again_keeps_its_optimizer_state():
    """A resample frees the state of the blocks that leave, and only theirs: a block drawn again
    keeps its moments, basis and step count, and its next update continues them (3 of 4 blocks
    are drawn each time, so at least 2 are drawn again)."""
    model = PlainLM(n_blocks=4, d=8)
    opt = OwLoreAdamW(owlore_param_groups(model, rank=2, update_proj_gap=50), lr=1e-3)
    sampler = OwLoreSampler(model, opt, gamma=3, interval=1, prob_mode="uniform", seed=0)
    gen = torch.Generator().manual_seed(0)
    kept_total = 0
    for _ in range(8):
        before = set(sampler.active_layers)
        saved = {id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
                 for i in before for p in model.blocks[i].parameters()}
        sampler.step()
        kept = before & set(sampler.active_layers)
        kept_total += len(kept)
        for i in range(4):
            for p in model.blocks[i].parameters():
                if i in kept:
                    state = opt.state[p]
                    assert state.keys() == saved[id(p)].keys(), i
                    for key, value in saved[id(p)].items():
                        assert torch.equal(state[key], value) if torch.is_tensor(value) else state[key] == value
                elif i in before:
                    assert p not in opt.state, i  # left: freed
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
        opt.zero_grad()
        for i in kept:
            for p in model.blocks[i].parameters():
                assert opt.state[p]["step"] == saved[id(p)]["step"] + 1, i
    assert kept_total >= 2 * 7


def test_state_bytes_counts_only_active_blocks_and_stays_flat():
    torch.manual_seed(0)
    model = PlainLM(n_blocks=8, d=8)
    groups = owlore_param_groups(model, rank=2, update_proj_gap=50)
    opt = OwLoreAdamW(groups, lr=1e-3)
    sampler = OwLoreSampler(model, opt, gamma=2, interval=1, prob_mode="uniform", seed=0)
    assert sorted(sampler.always_train) == ["embed", "head", "norm"]
    always = {id(p) for n in ("embed", "head", "norm") for p in model.get_submodule(n).parameters()}

    # expected bytes: a fresh optimizer stepped once with grads on two blocks + always-trainable
    ref_model = PlainLM(n_blocks=8, d=8)
    ref_opt = OwLoreAdamW(owlore_param_groups(ref_model, rank=2, update_proj_gap=50), lr=1e-3)
    live = list(ref_model.blocks[0].parameters()) + list(ref_model.blocks[1].parameters()) + [
        p for n in ("embed", "head", "norm") for p in ref_model.get_submodule(n).parameters()]
    for p in live:
        p.grad = torch.randn_like(p)
    ref_opt.step()
    expected = ref_opt.state_bytes()
    full = sum(p.numel() for p in model.parameters()) * 4 * 2
    assert expected < full

    gen = torch.Generator().manual_seed(0)
    for _ in range(1000):
        sampler.step()
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
        opt.zero_grad()
        active = {id(p) for i in sampler.active_layers for p in model.blocks[i].parameters()}
        assert {id(p) for p in opt.state} == active | always
        assert opt.state_bytes() == expected


# ------------------------------------------------------------------ resume
def _fresh(seed_init=0):
    torch.manual_seed(seed_init)
    model = tiny_llama(4, tie=True)
    opt = OwLoreAdamW(owlore_param_groups(model, rank=4, update_proj_gap=3), lr=1e-2)
    sampler = OwLoreSampler(model, opt, gamma=2, interval=2, prob_mode="owl", scores=[1, 2, 3, 4], seed=7)
    return model, opt, sampler


def test_resume_is_bit_exact():
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 64, (2, 8), generator=gen) for _ in range(8)]

    model, opt, sampler = _fresh()
    seq_full = []
    for b in batches:
        _train_step(model, opt, sampler, b)
        seq_full.append(sampler.active_layers)
    full = _snapshot(model)

    model, opt, sampler = _fresh()
    seq = []
    for b in batches[:3]:  # stop mid-interval (interval=2)
        _train_step(model, opt, sampler, b)
        seq.append(sampler.active_layers)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "sampler": sampler.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    model, opt, sampler = _fresh(seed_init=123)  # different init: everything must come from the checkpoint
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    sampler.load_state_dict(ckpt["sampler"])
    assert sampler.active_layers == seq[-1] and sampler.num_steps == 3
    for i, block in enumerate(model.model.layers):
        assert all(p.requires_grad == (i in seq[-1]) for p in block.parameters())
    for b in batches[3:]:
        _train_step(model, opt, sampler, b)
        seq.append(sampler.active_layers)
    assert seq == seq_full
    for name, p in model.named_parameters():
        assert torch.equal(p, full[name]), name


def test_resume_built_with_other_scores_and_seed_continues_the_saved_run(tmp_path):
    """What a checkpoint restores is the saved run's: probabilities, generator, step counter and
    active blocks, even in a sampler built with other scores and another seed (scores recomputed
    on trained weights would differ); the next draws are the saved run's."""

    def build(scores, seed):
        return OwLoreSampler(PlainLM(n_blocks=6, d=2), None, gamma=2, interval=3, prob_mode="owl", seed=seed,
                             scores=scores)

    saved = build([1.0, 2.0, 3.0, 4.0, 5.0, 9.0], seed=7)
    for _ in range(5):  # stop mid-interval
        saved.step()
    torch.save(saved.state_dict(), tmp_path / "sampler.pt")
    resumed = build([9.0, 5.0, 4.0, 3.0, 2.0, 1.0], seed=8)
    assert not np.allclose(resumed.probabilities, saved.probabilities)
    resumed.load_state_dict(torch.load(tmp_path / "sampler.pt", weights_only=True))
    np.testing.assert_array_equal(resumed.probabilities, saved.probabilities)
    assert resumed.state_dict() == saved.state_dict()  # generator state included
    assert resumed.active_layers == saved.active_layers and resumed.num_steps == 5
    for _ in range(40):
        assert resumed.step() == saved.step()
        assert resumed.active_layers == saved.active_layers


# --------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(gamma=0), "gamma must be an int in \\[1, 4\\].*got 0"),
        (dict(gamma=5), "gamma must be an int in \\[1, 4\\].*got 5"),
        (dict(gamma=2.5), "gamma"),
        (dict(interval=0), "interval must be an int >= 1, got 0"),
        (dict(prob_mode="bogus"), "prob_mode must be one of.*'bogus'"),
        (dict(scores=[1, float("nan"), 1, 1]), "scores must be finite and >= 0.*nan"),
        (dict(scores=[1, -2, 1, 1]), "scores must be finite and >= 0.*-2"),
        (dict(scores=[1, 2, 3]), "scores must hold one number per block \\(4\\)"),
        (dict(prob_mode=[1, 1, -1, 1], scores=None), "prob_mode must be finite and >= 0"),
        (dict(prob_mode=[0, 0, 0, 0], scores=None), "prob_mode must have a positive sum"),
        (dict(gamma=3, scores=[1, 0, 0, 1]), "gamma=3 .* only 2 of 4 blocks"),
        (dict(gamma=4, prob_mode="owl_reverse", scores=[1, 2, 3, 4]), "gamma=4 .* only 3 of 4"),
        (dict(threshold=-1.0, scores=None), "threshold must be a finite number > 0"),
        # arguments a mode would ignore are refused, not dropped
        (dict(prob_mode="uniform"), "scores=.* prob_mode='uniform' would ignore them"),
        (dict(prob_mode="increase"), "scores=.* prob_mode='increase' would ignore them"),
        (dict(prob_mode=[1, 1, 1, 1]), "scores=.* prob_mode=an array would ignore them"),
        (dict(threshold=13.0), "threshold=... only serves to compute block scores, but scores= are given"),
        (dict(prob_mode="uniform", scores=None, calibration=[torch.zeros(1, 2, dtype=torch.long)]),
         "calibration=... only serves .* prob_mode='uniform' uses no scores"),
        (dict(always_train=["no_such_module"]), "always_train.*no_such_module"),
        (dict(seed=-1), "seed must be an int >= 0"),
    ],
)
def test_bad_input_raises_and_modifies_nothing(kwargs, match):
    model = tiny_llama(4, tie=True)
    opt = OwLoreAdamW(owlore_param_groups(model, rank=4), lr=1e-2)
    batch = torch.randint(0, 64, (2, 8))
    model(input_ids=batch, labels=batch).loss.backward()
    opt.step()  # optimizer state exists; grads kept
    flags, weights = _flags(model), _snapshot(model)
    state_ids, nbytes = {id(p) for p in opt.state}, opt.state_bytes()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    args = dict(gamma=2, interval=1, prob_mode="owl", scores=[1, 2, 3, 4])
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        OwLoreSampler(model, opt, **args)
    assert _flags(model) == flags
    assert {id(p) for p in opt.state} == state_ids and opt.state_bytes() == nbytes
    for n, p in model.named_parameters():
        assert torch.equal(p, weights[n]) and p.grad is not None and torch.equal(p.grad, grads[n])


def test_optimizer_missing_block_params_is_refused():
    model = tiny_llama(3, tie=True)
    # LMFlow#726: an optimizer built over the trainable params after freezing misses blocks
    opt = OwLoreAdamW([p for n, p in model.named_parameters() if not n.startswith("model.layers.2.")], lr=1e-3)
    flags = _flags(model)
    with pytest.raises(ValueError, match="optimizer does not hold .*owlore_param_groups"):
        OwLoreSampler(model, opt, gamma=1, interval=1, prob_mode="uniform")
    assert _flags(model) == flags


def test_bad_state_dict_modifies_nothing():
    model = PlainLM(n_blocks=4)
    sampler = OwLoreSampler(model, None, gamma=2, interval=2, prob_mode="uniform", seed=3)
    sampler.step()
    good = sampler.state_dict()
    flags, active = _flags(model), list(sampler.active_layers)
    for bad, match in [
        ({**good, "num_blocks": 5}, "num_blocks=5"),
        ({**good, "active_layers": [0, 9]}, "active_layers"),
        ({**good, "probabilities": [0.5, 0.5]}, "probabilities"),
        ({k: v for k, v in good.items() if k != "rng_state"}, "not an OwLoreSampler state_dict"),
        # the constructor's schedule and the checkpoint's must agree: neither silently wins
        ({**good, "gamma": 3}, r"saved with gamma=3, interval=2 but this sampler has gamma=2, interval=2"),
        ({**good, "interval": 5}, r"saved with gamma=2, interval=5 but this sampler has gamma=2, interval=2"),
    ]:
        with pytest.raises(ValueError, match=match):
            sampler.load_state_dict(bad)
        assert _flags(model) == flags and sampler.active_layers == active and sampler.num_steps == 1
    # and the generator was not touched: the next draw equals an untouched twin's
    twin = OwLoreSampler(PlainLM(n_blocks=4), None, gamma=2, interval=2, prob_mode="uniform", seed=3)
    twin.step()
    assert sampler.resample() == twin.resample()


def test_discovery_through_a_peft_wrapper():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(3, tie=True), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    path, blocks = find_decoder_blocks(model)
    assert path == "base_model.model.model.layers" and len(blocks) == 3


# -------------------------------------------------------------------- PEFT
def _peft_llama(n_layers=3, **lora):
    """A LoRA model (q_proj, v_proj; lm_head as a modules_to_save copy) over a seed-0 base."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = tiny_llama(n_layers, tie=False)
    # init_lora_weights=False: B starts random, not zero, so A gets a gradient on
    # the first step too and every adapter of a trained block moves at once
    config = dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"],
                  init_lora_weights=False)
    config.update(lora)
    return peft, peft.get_peft_model(base, peft.LoraConfig(**config))


def _is_adapter(name):
    return ".lora_" in name or ".modules_to_save." in name


def test_peft_param_groups_keep_adapters_out_of_the_rank_group():
    _, model = _peft_llama()
    names = {id(p): n for n, p in model.named_parameters()}
    galore, plain = owlore_param_groups(model, rank=4)
    galore_names = {names[id(p)] for p in galore["params"]}
    # the 7 linears of each of 3 blocks: base weights only (q/v as their base_layer)
    assert len(galore_names) == 3 * 7 and not any(_is_adapter(n) for n in galore_names)
    assert {n for n in names.values() if ".lora_" in n} <= {names[id(p)] for p in plain["params"]}
    # a layer PEFT wrapped is targeted by its own name
    (qv, _) = owlore_param_groups(model, rank=4, target_modules=["q_proj", "v_proj"])
    assert sorted(names[id(p)].split(".")[-3:][0] for p in qv["params"]) == ["q_proj"] * 3 + ["v_proj"] * 3
    assert all(names[id(p)].endswith(".base_layer.weight") for p in qv["params"])
    # only when asked do the LoRA A/B matrices join the rank group
    (with_adapters, _) = owlore_param_groups(model, rank=4, project_adapters=True)
    added = {names[id(p)] for p in with_adapters["params"]} - galore_names
    assert added == {n for n in names.values() if ".lora_A." in n or ".lora_B." in n} and len(added) == 3 * 4
    with pytest.raises(ValueError, match="project_adapters must be True or False, got 'yes'"):
        owlore_param_groups(model, rank=4, project_adapters="yes")


def test_peft_sampler_trains_only_the_sampled_adapters_and_save_pretrained_keeps_them(tmp_path):
    peft, model = _peft_llama()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(_is_adapter(n) for n in trainable)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = OwLoreAdamW(owlore_param_groups(model, rank=4, update_proj_gap=2), lr=1e-2)
    sampler = OwLoreSampler(model, opt, gamma=1, interval=2, prob_mode="uniform", seed=0)
    # the default always-trainable set is what PEFT left trainable outside the blocks: the lm_head copy
    head = {n for n in trainable if ".lm_head." in n}
    assert head == {"base_model.model.lm_head.modules_to_save.default.weight"}
    assert sampler.always_train == ["base_model.model.lm_head"]
    batch = torch.randint(0, 64, (2, 8))
    drawn = set()
    for _ in range(8):
        sampler.step()
        (active,) = sampler.active_layers
        drawn.add(active)
        expected = head | {n for n in trainable if f".layers.{active}." in n}
        assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
        before = _snapshot(model)
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
        for n, p in model.named_parameters():
            assert torch.equal(p, before[n]) == (n not in expected), n
    assert len(drawn) > 1  # the test saw resampling
    for n, p in model.named_parameters():
        if n in frozen:
            assert not p.requires_grad and p.grad is None and torch.equal(p, frozen[n]), n

    # what trained is what PEFT saves: a reload onto a fresh seed-0 base equals the trained model
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    reloaded = peft.PeftModel.from_pretrained(tiny_llama(3, tie=False), tmp_path)
    got = dict(reloaded.named_parameters())
    assert got.keys() == dict(model.named_parameters()).keys()
    for n, p in model.named_parameters():
        assert torch.equal(got[n], p), n
    model.eval(), reloaded.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=batch).logits, reloaded(input_ids=batch).logits)


def test_peft_frozen_params_are_never_unfrozen_and_refused_as_always_train():
    _, model = _peft_llama(layers_to_transform=[0, 2])  # no adapter in block 1
    flags = _flags(model)
    with pytest.raises(ValueError, match=r"always_train=\['embed_tokens'\]: \['embed_tokens'\] match only "
                                         r"parameters that were frozen"):
        OwLoreSampler(model, None, gamma=1, interval=1, prob_mode="uniform", always_train=["embed_tokens"])
    assert _flags(model) == flags
    with pytest.warns(UserWarning, match=r"blocks \[1\] of 3 hold no trainable parameter"):
        sampler = OwLoreSampler(model, None, gamma=3, interval=1, prob_mode="uniform")
    sampler.step()  # all three blocks "active": only the adapters are trainable
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {n for n, f in flags.items() if f}

    plain = tiny_llama(2, tie=True)
    plain.model.layers.requires_grad_(False)
    with pytest.raises(ValueError, match=r"no parameter inside the 2 decoder blocks at 'model.layers' is trainable"):
        OwLoreSampler(plain, None, gamma=1, interval=1, prob_mode="uniform")


def test_keyword_only_arguments():
    model = PlainLM(n_blocks=2)
    with pytest.raises(TypeError):
        find_decoder_blocks(model, "blocks")
    with pytest.raises(TypeError):
        owlore_param_groups(model, 4, 200, 0.25, "std", ["fc1"])


# ------------------------------------------------------ the constructor's steps
def test_constructor_steps_alone():
    """Each step of the constructor (owlore_kernels.sampler) on its own: discover the blocks,
    check the arguments, decide what may train, check the optimizer, scores, probabilities."""
    from owlore_kernels import sampler as steps

    model = PlainLM(n_blocks=4, d=4)
    model.embed.requires_grad_(False)  # frozen before the sampler: neither always-trainable nor toggled
    path, blocks = steps.discover_blocks(model, None)
    assert path == "blocks" and blocks is model.blocks
    assert steps.check_arguments(4, 2, 1, 0, "owl", None, 3.0, None) == 3.0
    with pytest.raises(ValueError, match="gamma must be an int in \\[1, 4\\]"):
        steps.check_arguments(4, 5, 1, 0, "uniform", None, None, None)

    plan = steps.decide_trainable(model, path, blocks, None)
    assert [[id(p) for p in ps] for ps in plan.block_params] == [[id(p) for p in b.parameters()] for b in blocks]
    assert sorted(plan.always_names) == ["head", "norm"]  # the embedding is frozen: not listed
    assert {id(p) for p in plan.always_params} == {id(p) for n in ("head", "norm")
                                                   for p in model.get_submodule(n).parameters()}
    assert plan.frozen_by_sampler == []
    only_head = steps.decide_trainable(model, path, blocks, ["head"])
    assert only_head.always_names == ["head"]
    assert {id(p) for p in only_head.frozen_by_sampler} == {id(p) for p in model.norm.parameters()}
    assert all(p.requires_grad for p in model.norm.parameters())  # deciding froze nothing

    steps.check_optimizer_holds(None, plan)
    with pytest.raises(ValueError, match="optimizer does not hold 3 of"):
        steps.check_optimizer_holds(torch.optim.SGD(list(model.blocks.parameters()), lr=0.1), plan)

    assert steps.block_scores(model, path, 4, "uniform", None, None, None) is None
    np.testing.assert_array_equal(steps.block_scores(model, path, 4, "owl", [1, 2, 3, 4], None, None), [1, 2, 3, 4])
    np.testing.assert_allclose(steps.sampling_probabilities("owl", np.array([1.0, 2.0, 3.0, 4.0]), 4, 2),
                               [0.1, 0.2, 0.3, 0.4])
    with pytest.raises(ValueError, match="gamma=3 .* only 2 of 4"):
        steps.sampling_probabilities([1.0, 0.0, 0.0, 1.0], None, 4, 3)
