"""configs/infllm_v2_125m.py at CPU size: the tiny model (T=256) with InfLLM-V2 scaled to its length:
blocks of 16, compressed keys over 8 tokens (stride 4) and 32 (stride 16), 6 blocks per query (the
sink and a 2-block window included), dense below 128 tokens, so a run sees both regimes. No
parameters: train from scratch, or continue a dense run with `--init_from runs/tiny`."""

import dataclasses

from configs.tiny import get_config as tiny
from sparsetrain.sparse.infllm_v2 import InfllmV2Options


def get_config():
    base = tiny()
    rule = InfllmV2Options(block_size=16, kernel_size=8, kernel_stride=4, coarse_size=32, coarse_stride=16,
                           topk=6, local_blocks=2, dense_len=128, score_chunk=256)
    return dataclasses.replace(base, name="infllm_v2_tiny",
                               model=dataclasses.replace(base.model, attention=(rule,)))
