"""InfLLM-V2 for the 125M model at T=16384, MiniCPM4's sparse settings: blocks of 64, fine compressed
keys over 32 tokens (stride 16), coarse over 128 (stride 64), 96 blocks per query (the sink block and
a 2048-token local window included), dense below 8192 tokens, selected per query tile: the 125M
model's GQA groups of 3 query heads are not the power of two the token-level kernel tiles (per-token
selection, the default, runs where they are). No parameters: the paper's recipe is a
dense run at a short length continued sparse at the long one:

    python train.py --config configs/infllm_v2_125m.py --init_from runs/small_125m
    python train.py --config configs/infllm_v2_125m.py model.attention.0.topk=48   # sparser
"""

import dataclasses

from configs.small_125m import get_config as small_125m
from sparsetrain.sparse.infllm_v2 import InfllmV2Options

SEQ = 16384


def get_config():
    cfg = small_125m()
    model = dataclasses.replace(cfg.model, max_seq_len=SEQ, attention=(InfllmV2Options(granularity="tile"),))
    data = dataclasses.replace(cfg.data, seq_len=SEQ, batch_size=4)
    return dataclasses.replace(cfg, name="infllm_v2_125m", model=model, data=data)
