"""Short-to-long workflow (a), SeerAttention: start from the dense adaptation (runs/long_dense:
runs/pretrain_short_dense with YaRN x8 through 2048 -> 8192 -> 16384), distill the gates at 16384
(250 steps, base frozen), then train sparse at 16384 keeping 10% of each row's causal blocks of 64
(150 steps, gates frozen): 26.2M tokens, about 1.2 minutes on one H100 by configs/_workflows.py's
estimate with the distill and sparse steps at 0.57x a dense step, as measured on the 125M model.

    python train.py --config configs/long_seer.py
    python train.py --config configs/long_seer.py name=long_seer_direct --init_from runs/pretrain_short_dense
"""

from configs._workflows import distill_then_sparse
from sparsetrain.sparse.seer import SeerOptions


def get_config():
    return distill_then_sparse("long_seer", SeerOptions(mode="distill", select="density", target_density=0.1))
