"""OwLoreCallback with transformers.Trainer (tiny random-init Llama, in-memory data, CPU),
and the ImportError when transformers is missing."""
import importlib
import os
import sys

import pytest
import torch

from owlore_kernels import OwLoreAdamW, OwLoreSampler, owlore_param_groups

transformers = pytest.importorskip("transformers")


def tiny_llama(n_layers=4):
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(cfg)


def _dataset(n=16, seq=8):
    gen = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, 64, (seq,), generator=gen)
        rows.append({"input_ids": ids, "labels": ids.clone()})
    return rows


def _args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path), use_cpu=True, max_steps=6, per_device_train_batch_size=2,
        learning_rate=1e-2, lr_scheduler_type="constant", report_to=[], save_strategy="no",
        logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=0,
    )
    base.update(kw)
    return transformers.TrainingArguments(**base)


def test_trainer_with_callback_trains_only_sampled_blocks(tmp_path):
    from owlore_kernels.integrations.transformers import OwLoreCallback

    model = tiny_llama(4)
    opt = OwLoreAdamW(owlore_param_groups(model, rank=4, update_proj_gap=2), lr=1e-2)
    # one draw for the whole run (interval > max_steps), so the frozen blocks are known
    sampler = OwLoreSampler(model, opt, gamma=2, interval=100, prob_mode="owl", scores=[1, 2, 3, 4], seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = transformers.Trainer(
        model=model, args=_args(tmp_path, gradient_accumulation_steps=2), train_dataset=_dataset(),
        optimizers=(opt, None), callbacks=[OwLoreCallback(sampler)],
    )
    trainer.train()
    assert sampler.num_steps == 6  # once per optimizer step, not per micro-batch
    active = sampler.active_layers
    assert len(active) == 2
    for name, p in model.named_parameters():
        if name.startswith("model.layers."):
            changed = not torch.equal(p, before[name])
            assert changed == (int(name.split(".")[2]) in active), name
    assert not torch.equal(model.model.embed_tokens.weight, before["model.embed_tokens.weight"])
    assert opt.state_bytes() > 0


def test_trainer_resamples_and_saves_sampler_state(tmp_path):
    from owlore_kernels.integrations.transformers import SAMPLER_STATE_NAME, OwLoreCallback

    model = tiny_llama(4)
    opt = OwLoreAdamW(owlore_param_groups(model, rank=4), lr=1e-2)
    sampler = OwLoreSampler(model, opt, gamma=1, interval=2, prob_mode="uniform", seed=3)
    callback = OwLoreCallback(sampler)
    seen = []

    class Record(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.append(list(sampler.active_layers))

    trainer = transformers.Trainer(
        model=model, args=_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=4,
                                save_only_model=True),
        train_dataset=_dataset(), optimizers=(opt, None), callbacks=[callback, Record()],
    )
    trainer.train()
    assert len(seen) == 4 and seen[0] == seen[1] and seen[2] == seen[3]
    ckpt = os.path.join(str(tmp_path), "checkpoint-4")
    state = torch.load(os.path.join(ckpt, SAMPLER_STATE_NAME), weights_only=True)
    assert state["num_steps"] == 4 and state["active_layers"] == seen[-1]
    twin = OwLoreSampler(tiny_llama(4), None, gamma=1, interval=2, prob_mode="uniform", seed=99)
    OwLoreCallback(twin).load_checkpoint(ckpt)
    assert twin.num_steps == 4 and twin.resample() == sampler.resample()


def test_trainer_with_its_own_optimizer_is_refused(tmp_path):
    from owlore_kernels.integrations.transformers import OwLoreCallback

    model = tiny_llama(2)
    opt = OwLoreAdamW(owlore_param_groups(model, rank=4), lr=1e-2)
    sampler = OwLoreSampler(model, opt, gamma=1, interval=1, prob_mode="uniform")
    trainer = transformers.Trainer(model=model, args=_args(tmp_path, max_steps=1), train_dataset=_dataset(4),
                                   callbacks=[OwLoreCallback(sampler)])
    with pytest.raises(ValueError, match=r"optimizers=\(opt, None\)"):
        trainer.train()


def test_missing_transformers_gives_clear_import_error(monkeypatch):
    name = "owlore_kernels.integrations.transformers"
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now fails
    monkeypatch.delitem(sys.modules, name, raising=False)
    with pytest.raises(ImportError, match="pip install transformers"):
        importlib.import_module(name)
    import owlore_kernels.integrations as integrations

    with pytest.raises(ImportError, match="pip install transformers"):
        integrations.OwLoreCallback
    # the core package works without it
    import owlore_kernels

    assert owlore_kernels.OwLoreSampler is OwLoreSampler
