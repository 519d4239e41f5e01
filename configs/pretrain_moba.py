"""Pretraining workflow with MoBA, as the paper pretrains at 8k: routing blocks of 512 tokens, top-3
with the current block (at most 1536 of the 8192 keys per query, the paper's 81% sparsity; by the
density budget 29% of the causal work), per-token routing; the last 3 of 12 layers dense (the
paper's layer-wise hybrid). Model, data, tokens and seed as configs/pretrain_dense.py.

    python train.py --config configs/pretrain_moba.py
"""

from configs._workflows import pretrain
from sparsetrain.attention.spec import DenseOptions
from sparsetrain.sparse.moba import MobaOptions


def get_config():
    return pretrain("pretrain_moba", (MobaOptions(moba_block=512, topk=3), DenseOptions(layers="-3:")))
