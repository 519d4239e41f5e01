"""MoBA (Mixture of Block Attention) for the 125M model at T=16384: routing blocks of 512 tokens,
top-3 (the current block included; about 15% of the causal attention work), the last 3 layers
dense (the paper's layer-wise hybrid). No parameters: train from scratch, or continue a dense run
(the paper's recipe) with `--init_from runs/dense_16k`.

    python train.py --config configs/moba_125m.py
    python train.py --config configs/moba_125m.py model.attention.0.dense_last_fraction=0.1   # token-wise hybrid
"""

import dataclasses

from configs.small_125m import get_config as small_125m
from sparsetrain.attention.spec import DenseOptions
from sparsetrain.sparse.moba import MobaOptions

SEQ = 16384


def get_config():
    cfg = small_125m()
    # Layers 0-8 MoBA, 9-11 dense: for a layer, the last rule that covers it wins.
    attention = (MobaOptions(moba_block=512, topk=3), DenseOptions(layers="-3:"))
    model = dataclasses.replace(cfg.model, max_seq_len=SEQ, attention=attention)
    data = dataclasses.replace(cfg.data, seq_len=SEQ, batch_size=4)
    return dataclasses.replace(cfg, name="moba_125m", model=model, data=data)
