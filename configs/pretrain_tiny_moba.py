"""configs/pretrain_moba.py at CPU size: routing blocks of 64 tokens over tiles of 16, top-3, the
last of 4 layers dense."""

from configs._workflows import pretrain
from sparsetrain.attention.spec import DenseOptions
from sparsetrain.sparse.moba import MobaOptions


def get_config():
    return pretrain("pretrain_tiny_moba", (MobaOptions(block_size=16, moba_block=64, topk=3),
                                           DenseOptions(layers="-1:")), tiny=True)
