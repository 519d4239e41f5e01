"""Attention rules (spec.py, light), the dispatcher, dense attention and the sparse-method base."""
