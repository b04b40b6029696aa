"""Outlier scores against a numpy reference on heavy-tailed (Student-t) weights; the
activation-aware metric against a hand-written forward; hooks removed; weights untouched."""
import numpy as np
import pytest
import torch
from torch import nn

from owlore_kernels import block_outlier_ratios, outlier_ratio
from owlore_kernels.ops import backend_report
from owlore_kernels.outliers import DEFAULT_THRESHOLD
from tiny_models import PlainLM, tiny_gpt2, tiny_llama

# every backend that runs on CPU tensors here (the reference always; C++ when built)
CPU_BACKENDS = ["torch"] + (["cpp"] if backend_report()["cpu"]["outlier_count"] == "cpp" else [])


def student_t(shape, df=3.0, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).standard_t(df, size=shape)).float()


def reference_ratio(arrays, threshold, scales=None):
    """Fraction of entries with score > threshold * mean(score), one mean over all arrays (numpy, float64)."""
    scores = []
    for k, a in enumerate(arrays):
        a = np.abs(np.asarray(a, dtype=np.float64))
        if scales is not None and scales[k] is not None:
            a = a * np.asarray(scales[k], dtype=np.float64)[None, :]
        scores.append(a.ravel())
    s = np.concatenate(scores)
    return float((s > threshold * s.mean()).mean())


def _heavy_tailed_conv1d_(model, seed=0):
    with torch.no_grad():
        for k, m in enumerate(model.modules()):
            if type(m).__name__ == "Conv1D":
                m.weight.copy_(student_t(m.weight.shape, seed=seed + k) * 0.02)
    return model


def _heavy_tailed_(model, seed=0):
    with torch.no_grad():
        for k, m in enumerate(model.modules()):
            if isinstance(m, nn.Linear):
                m.weight.copy_(student_t(m.weight.shape, seed=seed + k) * 0.02)
    return model


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("threshold", [2.0, 5.0, 13.0])
def test_outlier_ratio_matches_numpy_on_student_t(threshold, backend):
    w = student_t((67, 131), df=2.5)
    assert outlier_ratio(w, threshold=threshold, backend=backend) == pytest.approx(reference_ratio([w.numpy()], threshold), abs=1e-12)
    parts = [student_t((67, 131), seed=1), student_t((131, 40), seed=2), student_t((7, 13), seed=3)]
    ref = reference_ratio([p.numpy() for p in parts], threshold)
    assert outlier_ratio(parts, threshold=threshold, backend=backend) == pytest.approx(ref, abs=1e-12)
    assert ref > 0  # heavy tails: the test is not vacuous
    scales = [torch.rand(131) + 0.1, None, torch.rand(13) * 3]
    ref = reference_ratio([p.numpy() for p in parts], threshold, [None if s is None else s.numpy() for s in scales])
    assert outlier_ratio(parts, threshold=threshold, col_scales=scales, backend=backend) == pytest.approx(ref, abs=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_scoring_leaves_weights_untouched(backend):
    w = student_t((33, 47))
    before = w.clone()
    outlier_ratio(w, threshold=2.0, backend=backend)
    outlier_ratio([w], threshold=2.0, col_scales=[torch.rand(47)], backend=backend)
    assert torch.equal(w, before)
    model = _heavy_tailed_(PlainLM(n_blocks=3, d=16, vocab=32))
    snap = {n: p.detach().clone() for n, p in model.named_parameters()}
    block_outlier_ratios(model, threshold=3.0, backend=backend)
    block_outlier_ratios(model, threshold=3.0, calibration=[torch.randint(0, 32, (2, 5))], backend=backend)
    assert all(torch.equal(p, snap[n]) for n, p in model.named_parameters())


def test_weight_only_block_ratios_match_numpy():
    model = _heavy_tailed_(PlainLM(n_blocks=3, d=16, vocab=32))
    for threshold in (3.0, DEFAULT_THRESHOLD):
        got = block_outlier_ratios(model, threshold=threshold)
        want = [reference_ratio([b.fc1.weight.detach().numpy(), b.fc2.weight.detach().numpy()], threshold)
                for b in model.blocks]
        assert got == pytest.approx(want, abs=1e-12)
    assert len(set(got)) > 1  # discriminative on heavy-tailed weights


def test_activation_aware_matches_hand_forward():
    model = _heavy_tailed_(PlainLM(n_blocks=3, d=16, vocab=32))
    calibration = [torch.randint(0, 32, (2, 7)), torch.randint(0, 32, (1, 5))]
    # ||X_j||_2 of each linear's input over every calibration token, by a hand-written forward
    sq = {}
    with torch.no_grad():
        for ids in calibration:
            h = model.embed(ids)
            for i, b in enumerate(model.blocks):
                z = torch.relu(b.fc1(h))
                for name, x in (("fc1", h), ("fc2", z)):
                    x2 = (x.reshape(-1, x.shape[-1]).double() ** 2).sum(0)
                    sq[i, name] = sq.get((i, name), 0) + x2
                h = h + b.fc2(z)
    for threshold in (2.0, 5.0):
        got = block_outlier_ratios(model, threshold=threshold, calibration=calibration)
        want = [
            reference_ratio([b.fc1.weight.detach().numpy(), b.fc2.weight.detach().numpy()], threshold,
                            [sq[i, "fc1"].sqrt().numpy(), sq[i, "fc2"].sqrt().numpy()])
            for i, b in enumerate(model.blocks)
        ]
        # the hook accumulates in fp32, the reference in fp64: a score within ~1e-6 of
        # the cut may flip, so allow one entry per block
        n = 2 * model.blocks[0].fc1.weight.numel()
        assert got == pytest.approx(want, abs=1.0 / n + 1e-12)
    assert got != block_outlier_ratios(model, threshold=5.0)  # activations matter


def test_hooks_removed_and_mode_restored_also_on_error():
    model = _heavy_tailed_(PlainLM(n_blocks=3, d=16, vocab=32))
    model.train()
    block_outlier_ratios(model, calibration=[torch.randint(0, 32, (1, 4))])
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in linears)
    assert model.training

    def batches():
        yield torch.randint(0, 32, (1, 4))
        yield torch.full((1, 4), 999)  # out of vocabulary: the forward raises

    with pytest.raises(IndexError):
        block_outlier_ratios(model, calibration=batches())
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in linears)
    assert model.training
    with pytest.raises(ValueError, match="at least one batch"):
        block_outlier_ratios(model, calibration=[])


def test_gpt2_conv1d_activation_aware_and_dict_batches():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    model = transformers.GPT2LMHeadModel(cfg)
    batch = {"input_ids": torch.randint(0, 64, (2, 6))}
    # reference norms: hooks on the Conv1D inputs (features along the last dim = weight dim 0)
    sq, handles = {}, []
    for name, m in model.named_modules():
        if type(m).__name__ == "Conv1D":
            handles.append(m.register_forward_pre_hook(
                lambda mod, args, name=name: sq.__setitem__(name, (args[0].reshape(-1, args[0].shape[-1]) ** 2).sum(0))))
    with torch.no_grad():
        model.eval()(**batch)
    for h in handles:
        h.remove()
    want = []
    for i, block in enumerate(model.transformer.h):
        names = [n for n, m in block.named_modules() if type(m).__name__ == "Conv1D"]
        mods = [block.get_submodule(n) for n in names]
        want.append(reference_ratio([m.weight.detach().t().numpy() for m in mods], 2.0,
                                    [sq[f"transformer.h.{i}.{n}"].sqrt().numpy() for n in names]))
    got = block_outlier_ratios(model, threshold=2.0, calibration=[batch])
    assert got == pytest.approx(want, abs=2e-4)


def test_bad_threshold_and_keyword_only_arguments():
    w = torch.randn(4, 4)
    for bad in (0, -1.0, float("nan"), float("inf"), "x"):
        with pytest.raises(ValueError, match="threshold must be a finite number > 0"):
            outlier_ratio(w, threshold=bad)
        with pytest.raises(ValueError, match="threshold must be a finite number > 0"):
            block_outlier_ratios(PlainLM(n_blocks=2), threshold=bad)
    with pytest.raises(ValueError, match="empty list"):
        outlier_ratio([], threshold=5.0)
    with pytest.raises(TypeError):
        outlier_ratio(w, 5.0)
    with pytest.raises(TypeError):
        block_outlier_ratios(PlainLM(n_blocks=2), 5.0)


def test_default_threshold_is_owls():
    assert DEFAULT_THRESHOLD == 5.0


def test_peft_model_scores_its_base_weights_not_the_adapters():
    pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    base = _heavy_tailed_(tiny_llama(3))
    calibration = [{"input_ids": torch.randint(0, 64, (2, 6))}]
    want = [block_outlier_ratios(base, threshold=t, calibration=c) for t in (3.0, 5.0) for c in (None, calibration)]
    # B stays zero (PEFT's default init), so the forward and the calibration activations
    # equal the base model's; A is made heavy-tailed, so scoring adapters would move the counts
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A." in name:
                p.copy_(student_t(p.shape, seed=7))  # heavy-tailed: would shift the counts if scored
    got = [block_outlier_ratios(model, threshold=t, calibration=c) for t in (3.0, 5.0) for c in (None, calibration)]
    assert got == want
    assert len(set(want[0])) > 1

    # GPT-2: PEFT wraps a Conv1D ((in, out) storage, fan_in_fan_out); the base weight is scored as before
    gpt2 = _heavy_tailed_conv1d_(tiny_gpt2(2))
    want = block_outlier_ratios(gpt2, threshold=3.0)
    wrapped = peft.get_peft_model(gpt2, peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    assert block_outlier_ratios(wrapped, threshold=3.0) == want


def test_sharded_weights_are_refused_with_what_to_do(tmp_path):
    """A rank of an FSDP2 model holds only shards: the block mean and count would be wrong, so
    scoring a DTensor raises and says to score before fully_shard."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from owlore_kernels import outlier_ratio

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        weight = distribute_tensor(torch.randn(8, 6), mesh, [Shard(0)])
        with pytest.raises(ValueError, match=r"sharded DTensors.*before fully_shard.*scores="):
            outlier_ratio(weight)
    finally:
        dist.destroy_process_group()
