"""configs/pretrain_dense.py at CPU size: the tiny model (3.1M parameters, T=256, 300 steps)."""

from configs._workflows import pretrain
from sparsetrain.attention.spec import DenseOptions


def get_config():
    return pretrain("pretrain_tiny_dense", (DenseOptions(),), tiny=True)
