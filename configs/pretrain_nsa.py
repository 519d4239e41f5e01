"""Pretraining workflow with NSA in every layer, the paper's sparse settings (compressed keys over 32
tokens at stride 16 with an MLP compressor, 16 selected blocks of 64 with the first and two local
ones forced, a 512-token window, own K/V projections for the compression and window branches).
Model, data, tokens and seed as configs/pretrain_dense.py (its GQA groups of 4 are a power of two,
as the token-level kernel needs).

    python train.py --config configs/pretrain_nsa.py
"""

from configs._workflows import pretrain
from sparsetrain.sparse.nsa import NsaOptions


def get_config():
    return pretrain("pretrain_nsa", (NsaOptions(),))
