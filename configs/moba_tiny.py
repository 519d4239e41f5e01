"""configs/moba_125m.py at CPU size: the tiny model with MoBA routing (routing blocks of 64 tokens,
kernel tiles of 16, top-3 at T=256) and the last layer dense (MoBA's layer-wise hybrid). MoBA has no
parameters, so it trains from scratch like the dense tiny run (or `--init_from runs/tiny`)."""

import dataclasses

from configs.tiny import get_config as tiny
from sparsetrain.attention.spec import DenseOptions
from sparsetrain.sparse.moba import MobaOptions


def get_config():
    base = tiny()
    return dataclasses.replace(
        base, name="moba_tiny",
        model=dataclasses.replace(base.model, attention=(
            MobaOptions(block_size=16, moba_block=64, topk=3),
            DenseOptions(layers="-1:"))))
