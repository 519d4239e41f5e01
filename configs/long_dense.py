"""Short-to-long workflow, the dense adaptation (the baseline of the sparse ones, and where
configs/long_seer.py starts): runs/pretrain_short_dense with RoPE extended 8x by YaRN, trained dense
through the curriculum 2048 -> 8192 -> 16384 (configs/_workflows.py: 39.3M tokens, about 2.5
minutes on one H100 by its estimate).

    python train.py --config configs/long_dense.py      # --init_from another dense run
"""

from configs._workflows import long_context
from sparsetrain.attention.spec import DenseOptions


def get_config():
    return long_context("long_dense", (DenseOptions(),))
