"""configs/long_seer.py at CPU size: from runs/long_tiny_dense, gates over blocks of 16 distilled at
512 tokens for 100 steps, then 100 sparse steps keeping 25% of each row's causal blocks."""

from configs._workflows import distill_then_sparse
from sparsetrain.sparse.seer import SeerOptions


def get_config():
    return distill_then_sparse("long_tiny_seer", SeerOptions(block_size=16, mode="distill", select="density",
                                                             target_density=0.25), tiny=True)
