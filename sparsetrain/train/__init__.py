"""Sharded training: mesh and rules, optimizer, train step, loop, checkpoints, metrics."""

from sparsetrain.train.loop import NonFiniteError, Trainer, train

__all__ = ["NonFiniteError", "Trainer", "train"]
