"""The benchmark's embedded dataset: arithmetic questions with checkable answers.

Nothing is downloaded. ``What is 17+25? Answer: 42`` style examples are generated from a seed;
a question belongs to the held-out split by a fixed hash of its operands, so the two splits
never share a question. Examples are packed into fixed-length sequences; the loss (and the
accuracy) covers the answer tokens only, so both measure arithmetic, not the template.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

IGNORE = -100  # the label HF models skip in the loss
OPS = ("+", "-", "*")


def _answer(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def is_held_out(a: int, op: str, b: int) -> bool:
    """About one question in eight goes to the held-out split, by a fixed hash."""
    return (a * 31 + b * 17 + OPS.index(op) * 7) % 8 == 0


def questions(rng: random.Random, held_out: bool):
    """Endless (prompt, answer) pairs of one split."""
    while True:
        op = rng.choice(OPS)
        a = rng.randint(2, 12) if op == "*" else rng.randint(0, 99)
        b = rng.randint(0, 99)
        if is_held_out(a, op, b) == held_out:
            yield f"What is {a}{op}{b}? Answer:", f" {_answer(a, op, b)}\n"


class CharTokenizer:
    """Character tokenizer for random-init models (no vocabulary file to ship)."""

    SPECIALS = ("<pad>", "<bos>", "<eos>")
    CHARS = " \n0123456789+-*?:.AWaehinrstw"

    def __init__(self):
        self.vocab = {c: i + len(self.SPECIALS) for i, c in enumerate(self.CHARS)}
        self.pad_token_id, self.bos_token_id, self.eos_token_id = 0, 1, 2

    def __len__(self) -> int:
        return len(self.SPECIALS) + len(self.CHARS)

    def encode(self, text: str) -> list[int]:
        return [self.vocab[c] for c in text]


def hf_encoder(tokenizer) -> Callable[[str], list[int]]:
    return lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]


@dataclass
class PackedSplit:
    """``input_ids``/``labels``: [n_seq, seq_len]; ``example_ids``: answer positions -> example, else -1."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    example_ids: torch.Tensor
    n_examples: int


def pack(encode: Callable[[str], list[int]], pad_id: int, n_seq: int, seq_len: int, seed: int,
         held_out: bool) -> PackedSplit:
    """Pack whole examples into ``n_seq`` sequences of ``seq_len`` tokens, padding each tail."""
    rng = random.Random(seed)
    gen = questions(rng, held_out)
    ids = torch.full((n_seq, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((n_seq, seq_len), IGNORE, dtype=torch.long)
    example_ids = torch.full((n_seq, seq_len), -1, dtype=torch.long)
    n_examples = 0
    pending = None
    for row in range(n_seq):
        pos = 0
        while True:
            prompt, answer = pending or next(gen)
            p, a = encode(prompt), encode(answer)
            if len(p) + len(a) > seq_len:
                raise ValueError(f"--seq-len {seq_len} is too short for one example ({len(p) + len(a)} tokens)")
            if pos + len(p) + len(a) > seq_len:
                pending = (prompt, answer)  # starts the next sequence
                break
            pending = None
            ids[row, pos:pos + len(p)] = torch.tensor(p)
            pos += len(p)
            ids[row, pos:pos + len(a)] = torch.tensor(a)
            labels[row, pos:pos + len(a)] = torch.tensor(a)
            example_ids[row, pos:pos + len(a)] = n_examples
            pos += len(a)
            n_examples += 1
    return PackedSplit(ids, labels, example_ids, n_examples)


def answer_accuracy(logits: torch.Tensor, split_ids: torch.Tensor, example_ids: torch.Tensor) -> tuple[int, int]:
    """(examples whose every answer token is the argmax prediction, examples) -- teacher forced."""
    pred = logits[:, :-1].argmax(-1)
    target = split_ids[:, 1:]
    ex = example_ids[:, 1:]
    scored = ex >= 0
    wrong = scored & (pred != target)
    all_ids = set(ex[scored].tolist())
    wrong_ids = set(ex[wrong].tolist())
    return len(all_ids) - len(wrong_ids), len(all_ids)


def describe() -> str:
    return ("embedded arithmetic: 'What is a<op>b? Answer: c' with op in + - * (a,b < 100; * uses a <= 12); "
            "held-out split = questions with (31a + 17b + 7op) % 8 == 0; loss and accuracy on answer tokens; "
            "accuracy = all answer tokens argmax-correct, teacher forced")


def build_splits(encode, pad_id: int, steps: int, batch: int, seq_len: int, eval_seqs: int, seed: int):
    train = pack(encode, pad_id, steps * batch, seq_len, seed, held_out=False)
    held = pack(encode, pad_id, eval_seqs, seq_len, seed + 1, held_out=True)
    return train, held


__all__: Sequence[str] = ("CharTokenizer", "PackedSplit", "pack", "answer_accuracy", "build_splits", "describe")
