"""configs/pretrain_infllm_v2.py at CPU size: blocks of 16, compressed keys 8/4 and 32/16, 6 blocks
per query (the sink and a 2-block window included), dense below 64 of the 256 tokens."""

from configs._workflows import pretrain
from sparsetrain.sparse.infllm_v2 import InfllmV2Options


def get_config():
    return pretrain("pretrain_tiny_infllm_v2", (InfllmV2Options(
        block_size=16, kernel_size=8, kernel_stride=4, coarse_size=32, coarse_stride=16, topk=6, local_blocks=2,
        dense_len=64, score_chunk=256),), tiny=True)
