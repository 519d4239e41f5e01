"""Short-to-long workflow, step 1: the pretraining model trained dense at 2048 tokens (batch 32,
600 steps, 39.3M tokens; about 1.2 minutes on one H100 by configs/_workflows.py's estimate). The
long_*.py runs start from it.

    python train.py --config configs/pretrain_short_dense.py
"""

from configs._workflows import short_dense


def get_config():
    return short_dense()
