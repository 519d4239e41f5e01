"""configs/nosa_125m.py at CPU size: the tiny model (T=256) with NOSA scaled to its length, as
configs/infllm_v2_tiny.py scales InfLLM-V2: blocks of 16, compressed keys over 8 tokens (stride 4)
and 32 (stride 16), 6 blocks per query tile: the sink, a 2-block window and 1 block by query score
(query-aware), 2 by the learned eviction score (query-agnostic). Sparse at every length."""

import dataclasses

from configs.tiny import get_config as tiny
from sparsetrain.sparse.nosa import NosaOptions


def get_config():
    base = tiny()
    rule = NosaOptions(block_size=16, kernel_size=8, kernel_stride=4, coarse_size=32, coarse_stride=16,
                       topk=6, local_blocks=2, query_topk=1, score_chunk=256)
    return dataclasses.replace(base, name="nosa_tiny", model=dataclasses.replace(base.model, attention=(rule,)))
