"""Evaluation of a checkpoint: loss against context length (dense and sparse), RULER-style retrieval
(passkey, NIAH, MQAR, variable tracking, copy) and per-layer density/recall, written as JSON,
Markdown and PNG plots. Command line:
`python -m sparsetrain.eval RUN_OR_CHECKPOINT` (see `__main__.py` and docs/eval.md)."""

from sparsetrain.eval.measure import Subject, load_subject
from sparsetrain.eval.suite import EvalOptions, evaluate, powers_of_two

__all__ = ["EvalOptions", "Subject", "evaluate", "load_subject", "powers_of_two"]
