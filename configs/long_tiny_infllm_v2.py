"""configs/long_infllm_v2.py at CPU size: blocks of 16, compressed keys 8/4 and 32/16, 4 blocks per
query (the sink and a 2-block window included), dense below the 128-token pretraining length."""

from configs._workflows import TINY_SHORT, long_context
from sparsetrain.sparse.infllm_v2 import InfllmV2Options


def get_config():
    return long_context("long_tiny_infllm_v2", (InfllmV2Options(
        block_size=16, kernel_size=8, kernel_stride=4, coarse_size=32, coarse_stride=16, topk=4, local_blocks=2,
        dense_len=TINY_SHORT, score_chunk=256),), tiny=True)
