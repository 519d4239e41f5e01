"""configs/nsa_125m.py at CPU size: the tiny model (T=256) with NSA scaled to its length: compressed
keys over 8 tokens at stride 4, 4 selected blocks of 16 per token (the first and two local ones
included), a 32-token window. Trains from scratch like configs/tiny.py:

    python train.py --config configs/nsa_tiny.py
"""

import dataclasses

from configs.tiny import get_config as tiny
from sparsetrain.sparse.nsa import NsaOptions


def get_config():
    base = tiny()
    rule = NsaOptions(block_size=16, kernel_size=8, kernel_stride=4, topk=4, window=32, compressor_hidden=64,
                      score_chunk=128)
    return dataclasses.replace(base, name="nsa_tiny", model=dataclasses.replace(base.model, attention=(rule,)))
