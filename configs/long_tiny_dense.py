"""configs/long_dense.py at CPU size: runs/pretrain_tiny_short_dense, YaRN x4, 128 -> 256 -> 512."""

from configs._workflows import long_context
from sparsetrain.attention.spec import DenseOptions


def get_config():
    return long_context("long_tiny_dense", (DenseOptions(),), tiny=True)
