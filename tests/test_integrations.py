"""OwLoreCallback with transformers.Trainer (tiny random-init Llama, in-memory data, CPU):
sampling per optimizer step, checkpoints, resume matching an uninterrupted run, and the
ImportError when transformers is missing."""
import importlib
import os
import sys
import warnings

import pytest
import torch

from owlore_kernels import OwLoreAdamW, OwLoreSampler, owlore_param_groups
from tiny_models import tiny_llama

transformers = pytest.importorskip("transformers")


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


def _resumable_run(tmp_path, name, init_seed, **train_kw):
    """A 5-step Trainer run with OwLore that checkpoints at step 3 (mid-interval: interval=2).

    Returns the trainer, the sampler and the active blocks seen at the end of each step."""
    from owlore_kernels.integrations.transformers import OwLoreCallback

    torch.manual_seed(init_seed)
    model = tiny_llama(4)
    opt = OwLoreAdamW(owlore_param_groups(model, rank=4, update_proj_gap=3), lr=1e-2)
    sampler = OwLoreSampler(model, opt, gamma=2, interval=2, prob_mode="owl", scores=[1, 2, 3, 4], seed=7)
    seen = {}

    class Record(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen[state.global_step] = list(sampler.active_layers)

    args = _args(tmp_path / name, max_steps=5, save_strategy="steps", save_steps=3,
                 restore_callback_states_from_checkpoint=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_dataset(), optimizers=(opt, None),
                                   callbacks=[OwLoreCallback(sampler), Record()])
    trainer.train(**train_kw)
    return model, sampler, seen


def test_trainer_resume_restores_the_sampler_by_itself(tmp_path):
    full_model, full_sampler, full_seen = _resumable_run(tmp_path, "full", init_seed=0)
    assert len({tuple(v) for v in full_seen.values()}) > 1  # blocks were redrawn along the way
    ckpt = tmp_path / "full" / "checkpoint-3"
    # a different init and no load_checkpoint call: everything must come from the checkpoint
    model, sampler, seen = _resumable_run(tmp_path, "resumed", init_seed=123, resume_from_checkpoint=str(ckpt))
    assert sorted(seen) == [4, 5]  # step 5 redraws (calls 0, 2, 4 do): the restored generator is used
    assert seen == {k: v for k, v in full_seen.items() if k > 3}
    assert sampler.num_steps == full_sampler.num_steps == 5
    assert sampler.state_dict() == full_sampler.state_dict()
    full = dict(full_model.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, full[name]), name



def test_resume_without_sampler_state_warns(tmp_path):
    # what on_train_begin sees when the Trainer resumed from a checkpoint saved without the
    # callback: a restored global step and no sampler entry in the Trainer's state
    from owlore_kernels.integrations.transformers import OwLoreCallback

    model = tiny_llama(2)
    sampler = OwLoreSampler(model, None, gamma=1, interval=2, prob_mode="uniform", seed=0)
    callback = OwLoreCallback(sampler)
    args, control = _args(tmp_path), transformers.TrainerControl()
    with pytest.warns(UserWarning, match="resumed at step 3 from a checkpoint that holds no OwLoreSampler state"):
        callback.on_train_begin(args, transformers.TrainerState(global_step=3), control)
    # restored by hand beforehand (load_checkpoint): nothing to warn about
    for _ in range(3):
        sampler.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        callback.on_train_begin(args, transformers.TrainerState(global_step=3), control)
    # a saved state whose schedule differs from the sampler's is refused, naming both
    saved = transformers.TrainerState(global_step=3)
    saved.stateful_callbacks["OwLoreSampler"] = {**sampler.state_dict(), "interval": 5}
    with pytest.raises(ValueError, match="saved with gamma=1, interval=5 but this sampler has gamma=1, interval=2"):
        callback.on_train_begin(args, saved, control)


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
