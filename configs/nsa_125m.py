"""NSA for pretraining the 125M model from scratch at T=8192, with the paper's sparse settings:
compressed keys over 32 tokens at stride 16 (an MLP compressor), 16 selected blocks of 64 per token
(the first block and the two local ones included), a 512-token sliding window, own K/V projections
for the compression and window branches, and sigmoid gates per head.

The 125M model's 12 query heads run in 3 GQA groups of 4 here (small_125m has 4 groups of 3): the
token-level kernel tiles groups of a power of two. Longer context: `data.seq_len=16384
model.max_seq_len=16384` (or 32768, as the benchmark in docs/benchmarks.md).

    python train.py --config configs/nsa_125m.py
"""

import dataclasses

from configs.small_125m import get_config as small_125m
from sparsetrain.sparse.nsa import NsaOptions

SEQ = 8192


def get_config():
    cfg = small_125m()
    model = dataclasses.replace(cfg.model, num_kv_heads=3, max_seq_len=SEQ, attention=(NsaOptions(),))
    data = dataclasses.replace(cfg.data, seq_len=SEQ, batch_size=8)
    return dataclasses.replace(cfg, name="nsa_125m", model=model, data=data)
