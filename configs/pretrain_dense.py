"""Pretraining workflow, the dense baseline: the 36.5M-parameter model at T=8192 for 39.3M tokens
(configs/_workflows.py: sizes and the H100 estimate, about 2 minutes).

    python train.py --config configs/pretrain_dense.py
"""

from configs._workflows import pretrain
from sparsetrain.attention.spec import DenseOptions


def get_config():
    return pretrain("pretrain_dense", (DenseOptions(),))
