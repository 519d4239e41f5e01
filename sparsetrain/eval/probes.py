"""Scoring retrieval probes (`sparsetrain.data.retrieval_tasks.Instance`) from one forward pass.

A probe is scored as greedy decoding would be: greedy decoding reproduces an answer exactly iff, at
every answer position, the argmax given the answer's earlier tokens is the answer's next token,
which is what the teacher-forced argmax checks. Beside exact match, each answer gets its share of
correct tokens (per digit with the byte tokenizer: a near miss scores 0.8 of a 5-digit key, where
"no retrieval" scores about 0.1) and its mean negative log-likelihood per token (uniform guessing
over ten digits is ln 10 = 2.30 nats).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sparsetrain.data.retrieval_tasks import Instance


@dataclasses.dataclass(frozen=True)
class AnswerScore:
    exact: bool            # every token of the answer right
    token_accuracy: float  # share of its tokens right
    nll: float             # mean next-token loss over its tokens (nats)


def score_answers(probe: Instance, predicted: np.ndarray, nll: np.ndarray) -> list[AnswerScore]:
    """Per answer span. predicted [L]: the argmax at each position (the model's guess for the next
    token); nll [L-1]: the loss of token t+1 at position t; both from one pass over probe.tokens."""
    scores = []
    for start, end in probe.answers:
        right = predicted[start - 1:end - 1] == probe.tokens[start:end]
        scores.append(AnswerScore(bool(right.all()), float(right.mean()), float(nll[start - 1:end - 1].mean())))
    return scores

