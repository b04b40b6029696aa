"""The chunked causal-LM loss against the model's own loss, and the memory it saves.

Tolerances. Both losses sum the same fp32 per-token cross-entropies divided by the same count;
only the order of the summation differs (chunk by chunk, then across chunks). For N = 48 terms
of size ~log(64) ~ 4, reordering changes the sum by at most about N * 2**-24 * sum|terms|
(~ 48 * 6e-8 * 200 = 6e-4 absolute on a sum of ~200, i.e. ~3e-6 relative); rtol 1e-5. The
gradients are the same per-token softmax - onehot terms, scaled by the same 1/count; the head's
weight gradient sums N outer products in another order: same bound, rtol 1e-5, atol 1e-7 for
entries that cancel to ~0.
"""
import pytest
import torch

from owlore_kernels.estimate import MemoryTracker
from owlore_kernels.losses import causal_lm_loss, chunked_causal_lm_loss

transformers = pytest.importorskip("transformers")


def _model(tie=False, vocab=64):
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(config).train()


def _batch(vocab=64, batch=3, seq=16):
    ids = torch.randint(0, vocab, (batch, seq))
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt that is not scored
    labels[2, 9:] = -100  # padding
    return ids, labels


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("chunk_size", [5, 48, 1000])  # ragged, exactly B*T, larger than B*T
def test_equals_the_models_own_loss_and_gradients(tie, chunk_size):
    model = _model(tie)
    ids, labels = _batch()
    reference = model(input_ids=ids, labels=labels).loss
    reference.backward()
    expected = _grads(model)
    model.zero_grad(set_to_none=True)
    loss = causal_lm_loss(model, ids, labels, chunk_size=chunk_size)
    loss.backward()
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=0)
    got = _grads(model)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)


def test_num_items_in_batch_is_the_divisor_as_in_trainer():
    model = _model()
    ids, labels = _batch()
    reference = model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(100)).loss
    loss = causal_lm_loss(model, ids, labels, chunk_size=5, num_items_in_batch=torch.tensor(100))
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=0)


def test_hidden_states_and_head_directly_with_bf16_weights():
    model = _model().to(torch.bfloat16)
    ids, labels = _batch()
    reference = model(input_ids=ids, labels=labels).loss
    hidden = model.get_decoder()(input_ids=ids).last_hidden_state
    loss = chunked_causal_lm_loss(hidden, model.lm_head, labels, chunk_size=10)
    # bf16 logits are the same GEMM per row whatever the chunking; the fp32 sums differ in order only
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=0)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(chunk_size=0), ValueError, "chunk_size must be an int >= 1, got 0"),
    (dict(chunk_size=2.5), ValueError, "chunk_size must be an int >= 1, got 2.5"),
    (dict(lm_head=torch.nn.Embedding(4, 4)), TypeError, "lm_head must be an nn.Linear"),
    (dict(labels=torch.zeros(3, 5, dtype=torch.long)), ValueError, r"labels \[B, T\]"),
])
def test_bad_arguments_name_themselves(kwargs, error, match):
    args = dict(hidden_states=torch.zeros(3, 4, 8), lm_head=torch.nn.Linear(8, 16), labels=torch.zeros(3, 4).long())
    args.update(kwargs)
    with pytest.raises(error, match=match):
        chunked_causal_lm_loss(args.pop("hidden_states"), args.pop("lm_head"), args.pop("labels"), **args)


def test_never_holds_the_whole_batchs_logits():
    """Traced on real tensors, above the decoder alone (``hidden.sum()`` as the loss): the chunked loss
    adds at most the head's weight gradient and its accumulation buffer (2 x V h x 4 B) and four
    chunk-sized fp32 tensors (logits, log-softmax and their gradients: 4 x chunk x V x 4 B); the
    model's own loss holds several whole-batch logits (B T x V x 4 B each)."""
    vocab, hidden, batch, seq, chunk = 4096, 32, 4, 32, 16
    model = _model(vocab=vocab)
    ids, labels = _batch(vocab, batch, seq)
    losses = {
        "decoder only": lambda: model.get_decoder()(input_ids=ids).last_hidden_state.sum(),
        "model": lambda: model(input_ids=ids, labels=labels).loss,
        "chunked": lambda: causal_lm_loss(model, ids, labels, chunk_size=chunk),
    }
    peaks = {}
    for name, loss_fn in losses.items():
        tracker = MemoryTracker()
        with tracker:
            loss = loss_fn()
            loss.backward()
            del loss
        model.zero_grad(set_to_none=True)
        peaks[name] = tracker.replay()["peak"]
    added = {name: peak - peaks["decoder only"] for name, peak in peaks.items()}
    assert added["chunked"] <= 2 * vocab * hidden * 4 + 4 * chunk * vocab * 4, added
    assert added["model"] >= 3 * batch * seq * vocab * 4, added
