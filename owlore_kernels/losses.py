"""A causal-LM loss that never holds full-vocabulary logits for the whole batch.

A Hugging Face causal LM computes ``logits = lm_head(h)`` for every token, upcasts them to
fp32 and takes the cross-entropy: at LLaMA-2-7B's vocabulary (32000), batch 16 x 512 tokens,
that is 8192 x 32000 x (2 B bf16 logits + 4 B fp32 copy + 4 B fp32 log-softmax) = 2.4 GiB alive
at the loss, and the same again in fp32 gradients in backward. :func:`chunked_causal_lm_loss`
computes the same loss ``chunk_size`` tokens at a time, each chunk under
``torch.utils.checkpoint``: forward keeps only the per-chunk loss sums, and backward recomputes
one chunk's logits at a time, so at most ``chunk_size x V`` logits (and their gradient) exist
at once. The LM head's weight gradient is accumulated across chunks by autograd.

The value is the model's own loss (``transformers``' ``ForCausalLMLoss``)::

    shift:  y_t = labels_{t+1}, the last position of each sequence gets ignore_index
    loss  = sum_t CE(fp32(h_t W^T), y_t) / D,   over the tokens with y_t != ignore_index

with ``D`` = the number of such tokens (``reduction="mean"``), or ``num_items_in_batch`` when
given (what ``transformers.Trainer`` passes under gradient accumulation). Only the order of the
fp32 summation differs from the one-shot loss.

Plain loop::

    loss = causal_lm_loss(model, input_ids=ids, labels=labels)
    loss.backward()

``transformers.Trainer``::

    class ChunkedLossTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if return_outputs:  # evaluation wants the logits too
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            return causal_lm_loss(model, **inputs, num_items_in_batch=num_items_in_batch)
"""
from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["DEFAULT_CHUNK_SIZE", "chunked_causal_lm_loss", "causal_lm_loss"]

# 1024 tokens x 32000 (LLaMA-2) x 10 B (bf16 logits, fp32 copy, fp32 log-softmax) = 312 MiB per
# chunk in backward, against 2.4 GiB for 8192 tokens at once; 8 GEMMs of 1024 x 4096 x 32000 each
# still keep a GPU's tensor cores busy.
DEFAULT_CHUNK_SIZE = 1024


def _chunk_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """sum over the chunk's tokens of CE(fp32(h W^T + b), y); ignored tokens add 0."""
    logits = nn.functional.linear(hidden, weight, bias).float()
    return nn.functional.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")


def chunked_causal_lm_loss(hidden_states: torch.Tensor, lm_head: nn.Module, labels: torch.Tensor, *,
                           chunk_size: int = DEFAULT_CHUNK_SIZE, ignore_index: int = -100,
                           num_items_in_batch: Union[None, int, torch.Tensor] = None) -> torch.Tensor:
    """The causal-LM loss from the last hidden states ``[B, T, h]`` and the LM head (an ``nn.Linear``).

    ``labels`` ``[B, T]`` are unshifted, as given to the model. Returns the fp32 scalar loss
    (formula in the module docstring). Each chunk of ``chunk_size`` tokens (of the flattened
    ``B x T``) is checkpointed, so backward holds one chunk's logits at a time.
    """
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    if not isinstance(lm_head, nn.Linear):
        raise TypeError(f"lm_head must be an nn.Linear (the model's output embeddings), got {type(lm_head).__name__}")
    if hidden_states.dim() != 3 or labels.shape != hidden_states.shape[:2]:
        raise ValueError(f"hidden_states must be [B, T, h] and labels [B, T]; got {tuple(hidden_states.shape)} and "
                         f"{tuple(labels.shape)}")
    # ForCausalLMLoss's shift: position t predicts labels[t + 1]; the last position predicts nothing
    targets = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:].reshape(-1).to(hidden_states.device)
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        stop = start + chunk_size
        total = total + checkpoint(_chunk_loss_sum, hidden[start:stop], lm_head.weight, lm_head.bias,
                                   targets[start:stop], ignore_index, use_reentrant=False)
    if num_items_in_batch is None:
        # reduction="mean" over the counted tokens, read on the device: no host sync
        return total / (targets != ignore_index).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def causal_lm_loss(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, *,
                   chunk_size: int = DEFAULT_CHUNK_SIZE, num_items_in_batch: Union[None, int, torch.Tensor] = None,
                   **inputs: Any) -> torch.Tensor:
    """Run ``model``'s decoder (``model.get_decoder()``, a peft wrapper included) on ``input_ids`` and
    return :func:`chunked_causal_lm_loss` over its last hidden states and ``model.get_output_embeddings()``.

    Other keyword ``inputs`` (``attention_mask``, ``position_ids``) go to the decoder. Equal to
    ``model(input_ids=..., labels=...).loss`` up to the order of the fp32 summation.
    """
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    if decoder is None or head is None:
        raise ValueError(f"{type(model).__name__} has no get_decoder()/get_output_embeddings(); pass the last hidden "
                         "states and the LM head to chunked_causal_lm_loss instead")
    hidden = decoder(input_ids=input_ids, **inputs).last_hidden_state
    return chunked_causal_lm_loss(hidden, head, labels, chunk_size=chunk_size, num_items_in_batch=num_items_in_batch)
