"""Flax NNX models."""

from models.llama import Llama, count_params

__all__ = ["Llama", "count_params"]
