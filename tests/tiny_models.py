"""Tiny random-init models for tests: a plain torch block-list LM, and small HF causal LMs.

The HF builders import transformers when called, so tests that need only ``PlainLM`` run
without it; callers skip with ``pytest.importorskip("transformers")`` first.
"""
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, d, hidden=None):
        super().__init__()
        hidden = 2 * d if hidden is None else hidden
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class PlainLM(nn.Module):
    """embed -> blocks -> norm -> head: the layout the sampler's discovery must handle without hints."""

    def __init__(self, n_blocks=6, d=8, vocab=16, hidden=None):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, hidden) for _ in range(n_blocks))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, input_ids):
        h = self.embed(input_ids)
        for b in self.blocks:
            h = b(h)
        return self.head(self.norm(h))


def tiny_llama(n_layers=4, *, tie=False):
    """LlamaForCausalLM with vocabulary 64, width 32, 4 heads (2 KV heads): 7 linears per block."""
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie,
    )
    return transformers.LlamaForCausalLM(cfg)


def tiny_gpt2(n_layers=3):
    """GPT2LMHeadModel with vocabulary 64, width 32: its linears are transformers' Conv1D."""
    import transformers

    # bos/eos inside the 64-token vocabulary (GPT-2's 50256 is not): no config warning
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=n_layers, n_head=4, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)
