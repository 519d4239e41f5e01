"""Synthetic retrieval probes in the model's own tokenizer, deterministic by seed (nothing downloaded).

A probe is one token sequence holding its answers, with the [start, end) spans of those answers.
It is scored as greedy decoding would be, in one forward pass: greedy decoding reproduces an answer
exactly iff, at every answer position, the argmax given the answer's earlier tokens is the answer's
next token, which is what the teacher-forced argmax checks.

- passkey (Mohtashami & Jaggi 2023): a number hidden at a chosen depth of filler text, asked for at
  the end. With the byte tokenizer each digit is one token.
- MQAR (multi-query associative recall, Arora et al. 2023): key=value pairs, then the keys again in
  a shuffled order, each to be completed with its value.
"""

from __future__ import annotations

import dataclasses
import string

import numpy as np

from sparsetrain.data import Tokenizer
from sparsetrain.errors import InputError

PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the important information there.\n")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key.\n"
PASSKEY_QUESTION = "What is the pass key? The pass key is "
MQAR_INTRO = "Remember these pairs.\n"
MQAR_RECALL = "\nRecall them.\n"


@dataclasses.dataclass(frozen=True)
class Probe:
    tokens: np.ndarray                     # int32 [L]: prompt and answers, as the model reads them
    answers: tuple[tuple[int, int], ...]   # [start, end) token spans the model must produce
    info: dict                             # what was hidden where (key, depth, needle_start, ...)


def answers_correct(probe: Probe, predicted: np.ndarray) -> list[bool]:
    """Exact match per answer span; predicted [L] is the argmax at each position (the model's guess
    for the next token), from one forward pass over probe.tokens."""
    return [bool(np.array_equal(predicted[start - 1:end - 1], probe.tokens[start:end]))
            for start, end in probe.answers]


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


def _concat(pieces: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(p, np.int32) for p in pieces])


def passkey(tokenizer: Tokenizer, length: int, depth: float, *, seed: int, sample: int = 0,
            digits: int = 5) -> Probe:
    """A passkey probe of exactly `length` tokens whose needle starts at `depth` (0 = right after the
    intro, 1 = right before the question) of the filler, on a filler-sentence boundary."""
    if not 0.0 <= depth <= 1.0:
        raise InputError(f"passkey depth {depth} must be in [0, 1]")
    key = str(_rng(seed, length, round(depth * 1000), sample).integers(10 ** (digits - 1), 10 ** digits))
    intro, needle, question, answer = (tokenizer.encode(text) for text in (
        PASSKEY_INTRO, PASSKEY_NEEDLE.format(key=key), PASSKEY_QUESTION, key))
    unit = tokenizer.encode(PASSKEY_FILLER)
    budget = length - len(intro) - len(needle) - len(question) - len(answer)
    if budget < 0:
        raise InputError(f"passkey length {length} is shorter than its {length - budget} fixed tokens")
    filler = np.tile(unit, -(-budget // len(unit)))[:budget]
    insert = min(round(depth * budget / len(unit)) * len(unit), budget)
    tokens = _concat([intro, filler[:insert], needle, filler[insert:], question, answer])
    return Probe(tokens, ((length - len(answer), length),),
                 {"key": key, "depth": depth, "needle_start": len(intro) + insert})


def mqar(tokenizer: Tokenizer, num_pairs: int, *, seed: int, sample: int = 0) -> Probe:
    """An MQAR probe: `num_pairs` distinct three-letter keys with three-digit values, then every key
    once more in a shuffled order, each followed by its value (one answer span per query)."""
    if not 1 <= num_pairs <= 26 ** 3:
        raise InputError(f"mqar pairs {num_pairs} must be in [1, {26 ** 3}]")
    rng = _rng(seed, num_pairs, sample)
    codes = rng.choice(26 ** 3, num_pairs, replace=False)
    keys = ["".join(string.ascii_lowercase[c // 26 ** p % 26] for p in (2, 1, 0)) for c in codes]
    values = [str(v) for v in rng.integers(100, 1000, num_pairs)]
    facts = "; ".join(f"{k}={v}" for k, v in zip(keys, values))
    pieces = [tokenizer.encode(MQAR_INTRO + facts + MQAR_RECALL)]
    separator = tokenizer.encode("; ")
    spans, start = [], len(pieces[0])
    for i in rng.permutation(num_pairs):
        query, value = tokenizer.encode(f"{keys[i]}="), tokenizer.encode(values[i])
        spans.append((start + len(query), start + len(query) + len(value)))
        pieces += [query, value, separator]
        start += len(query) + len(value) + len(separator)
    return Probe(_concat(pieces), tuple(spans), {"pairs": num_pairs})
